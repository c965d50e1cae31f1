"""Role "process": llm.usage.v1 → validate → enrich → fold → attempts, requests and dead letters; the fold timer."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from faust.types import TP

from streams.fold import FoldConfig, Folder
from streams.metrics import gauge
from streams.pipeline import FoldStep, group_requests, process_messages, request_messages
from streams.positions import audit_line, encode_offset, last_offsets, position_key, positions_in_state
from streams.reference_feed import ReferenceFeed
from streams.roles.context import (
    EXIT_AGENT_FAILED,
    OUTPUT_MESSAGE_BYTES,
    Batch,
    KeyedTable,
    RoleContext,
    agent_name,
    audit,
    batch_of,
    gathered,
    line_runs,
    lines_in,
    stop_hard,
    timer_name,
)
from streams.validate import Validator
from streams.watermarks import InputProgress, encode_watermarks
from tally.config import Settings
from tally.reference import ReferenceStore


def fold_config(settings: Settings) -> FoldConfig:
    """The fold's durations, from seconds in settings to event-time milliseconds."""
    return FoldConfig(settle_ms=int(settings.fold_settle_s * 1000),
                      inactivity_ms=int(settings.fold_inactivity_s * 1000),
                      grace_ms=int(settings.fold_grace_s * 1000), idle_s=settings.fold_idle_s)


def wire_process(ctx: RoleContext, cpu: ThreadPoolExecutor) -> None:
    """The process agent, the fold timer and the reference data follower; validation, pricing, folding run on `cpu`.

    Out: llm.cost.attempts.v1 and llm.usage.dlq.v1 on the input's partition; llm.cost.requests.v1 (emitted logical
    requests, then a watermark message to every partition); the fold state and input positions in fold-state.
    """
    app, settings, stats, topics = ctx.app, ctx.settings, ctx.stats, ctx.settings.topics
    partitions, req_partitions = ctx.partitions, ctx.req_partitions
    refs = ReferenceStore()
    feed = ReferenceFeed(settings.kafka, topics.reference(), refs)
    validator = Validator(settings.max_line_bytes, settings.max_message_bytes,
                          max_future_skew=timedelta(seconds=settings.max_future_skew_s),
                          redact=settings.dlq_redact)
    # Fold state: one entry per open (or recently emitted) logical request, keyed by its id. The changelog is
    # partitioned like llm.usage.v1 and written with the same murmur2 partitioner, so an entry lives on the
    # partition of its attempts and moves with it on a rebalance (Faust restores it before the agent resumes).
    # acks=False as on Faust's own changelogs: no stream reads it, so an acking changelog makes Faust's livelock
    # check log "Stream has not started processing" as an ERROR for every partition the worker writes to.
    fold_table = KeyedTable(
        app, name="fold-state", beacon=app.tables.beacon, partitions=partitions,
        changelog_topic=app.topic(topics.fold_state, partitions=partitions, compacting=True, acks=False,
                                  key_serializer="raw", value_serializer="raw"))
    app.tables.add(fold_table)
    folder = Folder(fold_config(settings), partitions)
    batch_seconds = ctx.metrics.batch_seconds.labels(role=ctx.stats.role, stage="process")
    ctx.metrics.add(lambda: [gauge(
        "tally_fold_state_entries", "Entries of the fold's state held by this worker: its open logical requests, "
        "plus one stored position per owned input partition", [({}, float(len(fold_table.data)))])])
    # Event-time progress per input partition, published to every requests partition (streams.watermarks).
    progress = InputProgress(settle_ms=int(settings.fold_settle_s * 1000), idle_s=settings.fold_idle_s)
    fold_lock = asyncio.Lock()
    # Attempts go to the sink as Arrow IPC messages (thousands of rows each) unless settings say NDJSON.
    arrow_bytes = OUTPUT_MESSAGE_BYTES if settings.handoff_format == "arrow" else None
    rebalanced = [False]

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _forget_fold_index(sender: Any, **kwargs: Any) -> None:
        rebalanced[0] = True  # the folder rebuilds its clocks and heaps from the restored state

    async def commit_fold(requests: dict[int, list[bytes]], messages: dict[int, list[bytes]], rows: int,
                          writes: dict[bytes, bytes | None], positions: dict[int, int] | None = None) -> None:
        """Deliver emitted requests, then the state saying so and the input positions it covers; await both.

        A crash between the steps replays the batch against the last state whose position was written: the
        same revisions are emitted again and the sink skips them. The other order could lose an emission. A
        position entry is written on the changelog partition of its input partition after that partition's state
        writes (one producer, in order), so a restored state and its recovered position always agree.
        """
        if requests or messages:  # NDJSON lines, or Arrow messages (settings.handoff_format)
            await asyncio.gather(*await ctx.publish(ctx.requests_topic, requests),
                                 *await ctx.publish_messages(ctx.requests_topic, messages))
            stats.requests_emitted += rows
        stats.fold_state_writes += len(writes)
        for key, value in writes.items():
            if value is not None:
                fold_table[key] = value
            elif key in fold_table.data:
                del fold_table[key]
        if positions:
            await ctx.fail_at("process.mid_state")
        for partition, offset in (positions or {}).items():
            fold_table[position_key(partition)] = encode_offset(offset)
        await fold_table.written()

    async def fold_positions() -> dict[int, int]:
        return positions_in_state(fold_table.data)

    async def publish_watermarks(moved: dict[int, int]) -> None:
        """Every input partition this worker owns, as one watermark message to each requests partition.

        Sent after the batch's requests, state and position are durable (streams.watermarks, rule 4).
        """
        if not moved:
            return
        value = encode_watermarks(progress.marks, partitions)
        sent = [await ctx.requests_topic.send(value=value, partition=r, force=True) for r in range(req_partitions)]
        await asyncio.gather(*sent)

    def caught_up(assigned: list[int]) -> list[int]:
        """Input partitions whose every message up to the broker's high watermark is processed (lag 0)."""
        guard = ctx.guards[(topics.usage, "fold")]
        out = []
        for p in assigned:
            try:
                high = app.consumer.highwater(TP(topics.usage, p))
            except Exception:  # not fetched yet, or the consumer is between assignments: not known caught up
                high = None
            if high is not None and guard.expected.get(p, 0) >= high:
                out.append(p)
        return out

    def forget_if_rebalanced() -> None:
        if rebalanced[0]:
            folder.forget()
            rebalanced[0] = False

    ctx.own_positions(topics.usage, "fold", fold_positions)

    @app.task
    async def follow_reference_data() -> None:
        await feed.run()

    async def process_run(batch: Batch, step: FoldStep, loop: asyncio.AbstractEventLoop) -> None:
        """One run of messages: processed, its outputs delivered, then its fold state and input positions stored."""
        forget_if_rebalanced()
        started = time.perf_counter()
        out = await loop.run_in_executor(cpu, process_messages, batch, validator, refs.snapshot(),
                                         partitions, datetime.now(UTC), step, time.time(), arrow_bytes)
        await ctx.fail_at("process.after_decode")
        # Outputs delivered, then state and position: the position never runs ahead of either.
        sent = await ctx.publish(ctx.attempts_topic, out.attempts)
        sent += await ctx.publish_messages(ctx.attempts_topic, out.attempt_messages)
        sent += await ctx.publish(ctx.dlq_topic, out.dead_letters)
        await ctx.fail_at("process.before_delivery")
        await asyncio.gather(*sent)
        await ctx.fail_at("process.after_delivery")
        done = last_offsets(src for _, src in batch)
        await commit_fold(out.requests, out.request_messages, out.request_rows, out.fold_writes, done)
        finished = time.time()
        folder.finished(done, finished)
        await publish_watermarks(progress.after_batch(
            done, {p: c.now_ms for p, c in folder.clocks.items()}, finished))
        if settings.audit_offsets:
            audit.info(audit_line(topics.usage, [src for _, src in batch], {
                "attempt_lines": out.accepted, "dead_letters": out.rejected,
                "request_rows": out.request_rows,
                "state_writes": len(out.fold_writes)}))
        stats.events_accepted += out.accepted
        stats.events_rejected += out.rejected
        stats.dead_lettered(out.reasons)
        batch_seconds.observe(time.perf_counter() - started)

    @app.agent(ctx.usage_topic, name=agent_name("process"))
    async def process(stream: faust.StreamT) -> None:
        """llm.usage.v1 → validate → enrich → fold → llm.cost.attempts.v1, llm.cost.requests.v1, DLQ."""
        await feed.ready.wait()
        stats.reference_ready = True
        loop = asyncio.get_running_loop()
        step = FoldStep(folder, fold_table.data, req_partitions)
        try:
            takes = stream.take_events(  # type: ignore[attr-defined]
                settings.process_batch_messages, settings.batch_within_s)
            async for events in gathered(takes, settings.batch_max_lines, settings.batch_within_s,
                                         lambda e: lines_in(e.message.value)):
                async with fold_lock:
                    batch = await ctx.admit(batch_of(events), topics.usage, "fold")
                    for run in line_runs(batch, settings.batch_max_lines):
                        await process_run(run, step, loop)
                    stats.messages += len(batch)
        except Exception:
            stop_hard(EXIT_AGENT_FAILED, "the process agent failed; stopping without committing its batch")

    @app.timer(interval=1.0, name=timer_name("fold_tick"))
    async def fold_tick() -> None:
        """Event time runs on for caught-up, silent partitions: settle and inactivity decisions still fall due."""
        if not stats.reference_ready or app.rebalancing:
            return
        assigned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == topics.usage)
        if not assigned:
            return
        loop = asyncio.get_running_loop()
        async with fold_lock:
            forget_if_rebalanced()
            progress.forget(set(progress.marks) - set(assigned))
            try:
                # Only caught-up, silent partitions: a backlog or a slow batch never moves a clock.
                wall = time.time()
                silent = progress.silent(assigned, caught_up(assigned), wall)
                result = await loop.run_in_executor(cpu, folder.tick, silent, fold_table.data, wall,
                                                    datetime.now(UTC))
                lines = group_requests(result.emitted, req_partitions) if arrow_bytes is None else {}
                messages = {} if arrow_bytes is None else request_messages(result.emitted, req_partitions,
                                                                             arrow_bytes)
                await commit_fold(lines, messages, len(result.emitted), result.writes)
                await publish_watermarks(progress.idle(silent, wall))
            except Exception:
                stop_hard(EXIT_AGENT_FAILED, "the fold timer failed; stopping")
