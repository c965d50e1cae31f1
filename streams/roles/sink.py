"""Role "sink": attempts, requests and alerts → ClickHouse (usage_events, logical_requests, anomalies), each once."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faust
import orjson
from prometheus_client.core import Metric

from streams.decisions import DecisionWriter, decode_decisions
from streams.metrics import counter, gauge
from streams.positions import audit_line, last_offsets
from streams.roles.context import (
    EXIT_AGENT_FAILED,
    EXIT_SINK_GAVE_UP,
    Batch,
    RoleContext,
    StoredPositions,
    agent_name,
    audit,
    batch_of,
    line_runs,
    stop_hard,
)
from streams.sink import (
    ATTEMPT_ROWS,
    REQUEST_ROWS,
    AnomalyWriter,
    RequestWriter,
    SinkStats,
    SinkWriter,
    decode_anomalies,
    decode_batch,
    run_with_retry,
    write_with_retry,
)
from tally.errors import SinkGaveUp
from tally.store import Store

log = logging.getLogger(__name__)
JOURNAL_CLEANUP_S = 300.0  # how often the sink drops the journal's completed ten-minute partitions


@dataclass
class SinkWiring:
    """What the sink's neighbours in its worker use: the store, its writers' counters and the ClickHouse thread."""

    store: Store
    writer: SinkWriter
    request_writer: RequestWriter
    executor: ThreadPoolExecutor  # owns the ClickHouse client: inserts (and budget reads) are serialized on it


def dead_letter_reason(record: bytes) -> str:
    """The reason code of an encoded dead letter (they are few: read back for the metrics)."""
    try:
        reason = orjson.loads(record).get("reason")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return reason if isinstance(reason, str) else "unknown"


def wire_sink(ctx: RoleContext) -> SinkWiring:
    """The three sink agents; their input positions live in ClickHouse (sink_offsets)."""
    app, settings, topics = ctx.app, ctx.settings, ctx.settings.topics
    if ctx.store is None:
        raise ValueError("the sink role needs a Store")
    writer = SinkWriter(ctx.store)
    anomaly_writer = AnomalyWriter(ctx.store, SinkStats())
    decision_writer = DecisionWriter(ctx.store, SinkStats())
    decisions_topic = app.topic(topics.budget_decisions, value_type=bytes)
    # One thread owns the ClickHouse client: the attempts and anomalies sinks' statements (and the budget reads) are
    # serialized on it, and the event loop (Faust's consumer) keeps running while an insert is in flight.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
    ctx.clickhouse = executor
    # The logical-request sink has a lane of its own (a connection and a thread): its inserts, as costly as the
    # attempts' (the views they feed), run beside them instead of after them.
    request_store = ctx.store.lane()
    request_writer = RequestWriter(request_store, SinkStats())
    insert_seconds = ctx.metrics.insert_seconds
    for stats_ in (writer.stats, request_writer.stats, anomaly_writer.stats, decision_writer.stats):
        stats_.observe = lambda table, seconds: insert_seconds.labels(table=table).observe(seconds)
    batch_seconds = ctx.metrics.batch_seconds

    def sink_metrics() -> list[Metric]:
        tables = (("usage_events", writer.stats), ("logical_requests", request_writer.stats),
                  ("anomalies", anomaly_writer.stats), ("budget_decisions", decision_writer.stats))
        return [
            counter("tally_sink_rows_inserted", "Rows the sink inserted into ClickHouse, by table",
                    [({"table": t}, float(st.rows_inserted)) for t, st in tables], ("table",)),
            counter("tally_sink_duplicates_skipped", "Rows not inserted: already saved or repeated in the batch",
                    [({"table": t}, float(st.already_saved + st.duplicates_in_batch)) for t, st in tables],
                    ("table",)),
            counter("tally_sink_retries", "ClickHouse statements retried after a failure",
                    [({"table": t}, float(st.retries)) for t, st in tables], ("table",)),
            gauge("tally_sink_last_insert_timestamp_seconds", "When the sink's last insert into the table was "
                  "acknowledged (Unix time; 0 before the first)",
                  [({"table": t}, st.last_insert_at) for t, st in tables], ("table",)),
        ]
    ctx.metrics.add(sink_metrics)
    request_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse-requests")
    lanes = {topics.requests: (request_store, request_executor)}

    def lane_of(topic: str) -> tuple[Store, ThreadPoolExecutor]:
        return lanes.get(topic, (ctx.store, executor))  # type: ignore[arg-type]

    # The sink's input positions live in ClickHouse (sink_offsets), under one name whatever the role.
    sink_consumer = settings.group_id("sink")

    def sink_positions(topic: str) -> StoredPositions:
        store, thread = lane_of(topic)

        async def read() -> dict[int, int]:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(thread, store.stored_offsets, sink_consumer, topic)
        return read

    for topic in (topics.attempts, topics.requests, topics.alerts, topics.budget_decisions):
        ctx.own_positions(topic, "sink", sink_positions(topic))

    @app.timer(interval=JOURNAL_CLEANUP_S, name="tally.sink_journal_cleanup")
    async def drop_completed_plans() -> None:
        """The journaled plans of batches whose positions are stored are never replayed: drop their partitions."""
        loop = asyncio.get_running_loop()
        try:
            dropped = await loop.run_in_executor(executor, writer.store.drop_completed_journal, sink_consumer)
        except Exception as exc:  # the next round tries again; the TTL is the backstop
            log.warning("sink: dropping completed journal partitions failed: %s", exc)
            return
        if dropped:
            log.info("sink: dropped %d completed journal partitions (%s … %s)", len(dropped), dropped[0], dropped[-1])

    async def sink_run(batch: Batch, topic: str, write: Any, decode: Callable[..., Any], sink_stats: SinkStats,
                       loop: asyncio.AbstractEventLoop) -> None:
        """One run of messages: decoded, written, its refused lines dead-lettered, then its position stored."""
        store, thread = lane_of(topic)
        started = time.perf_counter()
        # Decoding is CPU work: off the event loop, so heartbeats, commits and the API stay responsive.
        rows, bad_lines = await loop.run_in_executor(thread, decode, batch)
        await ctx.fail_at("sink.after_decode")
        resent_before = sink_stats.resent
        written = await write_with_retry(write, rows, thread, settings.sink_retry_s, sink_stats)
        await ctx.fail_at("sink.after_insert")
        for partition, lines in written.dead_letters().items():
            bad_lines.setdefault(partition, []).extend(lines)
        await asyncio.gather(*await ctx.publish(ctx.dlq_topic, bad_lines))  # delivered before the position
        ctx.stats.events_rejected += sum(len(v) for v in bad_lines.values())
        ctx.stats.dead_lettered(dead_letter_reason(line) for lines in bad_lines.values() for line in lines)
        await run_with_retry(functools.partial(store.record_offsets, sink_consumer, topic,
                                               last_offsets(src for _, src in batch)),
                             thread, settings.sink_retry_s, sink_stats, f"storing the {topic} position")
        batch_seconds.labels(role=ctx.stats.role, stage=f"sink:{topic.rsplit('.', 2)[-2]}").observe(
            time.perf_counter() - started)
        if settings.audit_offsets:
            audit.info(audit_line(topic, [src for _, src in batch], {
                "rows": len(rows), "inserted": written.inserted, "resent": sink_stats.resent - resent_before,
                "dead_letters": sum(len(v) for v in bad_lines.values())}))

    async def sink_batches(stream: faust.StreamT, write: Any, decode: Callable[..., Any],
                           sink_stats: SinkStats) -> None:
        """Admit → decode → write with retry → dead-letter bad lines and refused rows → store the position.

        The position (sink_offsets) is written only after ClickHouse acknowledged the rows and the dead letters
        were delivered; every assignment resumes from it, so Kafka's committed offsets never decide what is saved.
        """
        loop = asyncio.get_running_loop()
        try:
            async for events in stream.take_events(  # type: ignore[attr-defined]
                    settings.sink_batch_messages, settings.batch_within_s):
                batch = batch_of(events)
                topic = batch[0][1].topic if batch else ""
                batch = await ctx.admit(batch, topic, "sink") if batch else batch
                for run in line_runs(batch, settings.batch_max_lines):
                    await sink_run(run, topic, write, decode, sink_stats, loop)
        except SinkGaveUp as exc:
            # Going on would let Faust commit offsets of unsaved rows: stop hard, commit nothing.
            stop_hard(EXIT_SINK_GAVE_UP, "sink gave up, stopping the worker without committing: %s", exc)
        except Exception:
            stop_hard(EXIT_AGENT_FAILED, "a sink agent failed; stopping without committing its batch")

    @app.agent(ctx.attempts_topic, name=agent_name("sink"))
    async def sink(stream: faust.StreamT) -> None:
        """llm.cost.attempts.v1 → usage_events (each event_id once)."""
        await sink_batches(stream, writer, functools.partial(decode_batch, shape=ATTEMPT_ROWS),
                           writer.stats)

    @app.agent(ctx.requests_topic, name=agent_name("sink_requests"))
    async def sink_requests(stream: faust.StreamT) -> None:
        """llm.cost.requests.v1 → logical_requests (each request once, at its latest revision)."""
        await sink_batches(stream, request_writer, functools.partial(decode_batch, shape=REQUEST_ROWS),
                           request_writer.stats)

    @app.agent(ctx.alerts_topic, name=agent_name("sink_anomalies"))
    async def sink_anomalies(stream: faust.StreamT) -> None:
        """llm.cost.alerts.v1 → anomalies (anomaly records; budget alerts are passed over)."""
        await sink_batches(stream, anomaly_writer, decode_anomalies, anomaly_writer.stats)

    @app.agent(decisions_topic, name=agent_name("sink_decisions"))
    async def sink_decisions(stream: faust.StreamT) -> None:
        """llm.budget.decisions.v1 → budget_decisions (the gateways' admission records, each once)."""
        await sink_batches(stream, decision_writer, decode_decisions, decision_writer.stats)

    return SinkWiring(ctx.store, writer, request_writer, executor)
