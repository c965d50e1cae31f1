"""The Faust app: the only place that creates it and declares its topics and agents."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.web import Request, Response, View

from streams.auth import UNAUTHORIZED, authorized
from streams.budget import evaluate, read_spend
from streams.detect import DetectConfig, Detector
from streams.fold import FoldConfig, Folder
from streams.pipeline import FoldStep, group_requests, process_messages
from streams.positions import (
    PositionGuard,
    audit_line,
    encode_offset,
    is_meta_key,
    last_offsets,
    meta_partition,
    position_key,
    positions_in_state,
    watermarks_key,
)
from streams.records import Source, encode_record
from streams.reference_feed import ReferenceFeed
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
from streams.validate import Validator
from streams.watermarks import InputProgress, decode_watermarks, encode_watermarks, is_watermark
from tally.config import Settings
from tally.errors import SinkGaveUp, StoreError, TallyError
from tally.failpoints import Failpoints
from tally.logs import demote_routine_library_logs
from tally.partitioning import partition_for_bytes
from tally.reference import ReferenceStore
from tally.sdk.batching import pack_ndjson
from tally.store import Store

log = logging.getLogger("tally.worker")
# Debug level: per batch, the input offsets it covers and the outputs it produced, logged once its position is stored.
audit = logging.getLogger("tally.offsets")

# Output messages stay well under the producer's max request size (and Kafka's default 1 MiB message limit).
OUTPUT_MESSAGE_BYTES = 900 * 1024
EXIT_SINK_GAVE_UP = 70
EXIT_AGENT_FAILED = 71


def _stop_hard(code: int, message: str, *args: Any) -> None:
    """Stop the worker at once, committing nothing more: the batch in hand is processed again after a restart.

    Faust would restart a crashed agent in place and could then commit offsets of a batch never written.
    """
    log.critical(message, *args, exc_info=code == EXIT_AGENT_FAILED)
    logging.shutdown()
    os._exit(code)


@dataclass
class WorkerStats:
    """Counters a worker serves on /api/status (and `tally status` / `tally run` print)."""

    role: str
    started_at: float = field(default_factory=time.time)
    messages: int = 0
    events_accepted: int = 0
    events_rejected: int = 0
    reference_ready: bool = False
    requests_emitted: int = 0
    fold_state_writes: int = 0
    budget_alerts: int = 0
    detect_requests: int = 0
    detect_errors: int = 0
    anomaly_alerts: int = 0
    detect_snapshots: int = 0
    detect_late: int = 0  # requests older than their feature's current window (counted in ratios, not rates)
    detect_duplicates: int = 0  # re-emitted requests already counted


def _json_response(web: Any, payload: Any, status: int = 200) -> Response:
    body = orjson.dumps(payload, default=str)
    return web.bytes(body, content_type="application/json", status=status)  # type: ignore[no-any-return]


class KeyedTable(faust.Table):  # type: ignore[misc]
    """A state table whose entry lives on the murmur2 partition of its key, like the topic it follows.

    Fold state: the key is a logical id, the partition of its attempts on llm.usage.v1 (the validate stage refuses
    any other). Detect state: the key is a feature_id, the partition of its requests on llm.cost.requests.v1. So an
    entry moves with its input partition on a rebalance. Keys and values are raw bytes. A position entry
    (streams.positions) lives on the partition its key names. Every changelog write is remembered until `written`
    awaits its delivery: state is durable before the position that produced it moves.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unconfirmed: list[Any] = []

    def partition_for_key(self, key: Any) -> int:
        if is_meta_key(key):
            return meta_partition(key)
        return partition_for_bytes(key, self.partitions or 1)

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        self._unconfirmed.append(fut)
        return fut

    async def written(self) -> None:
        """Wait until every changelog write made so far is delivered (acks = all)."""
        pending, self._unconfirmed = self._unconfirmed, []
        if pending:
            await asyncio.gather(*pending)


class PositionedConsumer(aiokafka_driver.Consumer):  # type: ignore[misc]
    """Faust's consumer, but every seek to the committed offsets ends at the positions tally stored.

    Faust seeks to the committed offsets after every assignment (start, rebalance, restart) and when its flow was
    stopped; tally then moves each partition it owns a position for to that position + 1. Kafka's committed offsets
    are only a lag hint: a commit past unprocessed input cannot lose it.
    """

    async def _seek(self, partition: TP, offset: int) -> None:
        # On the consumer's own thread, as Faust's seek_to_committed runs: a seek from the event loop's thread
        # races the fetcher there (seen: KeyError in aiokafka's fetched_records right after a restart).
        await self._thread.call_thread(self._thread.seek, partition, offset)  # type: ignore[arg-type]

    async def seek_to_committed(self) -> Any:
        committed = dict(await super().seek_to_committed())
        recover = getattr(self.app, "recover_positions", None)
        if recover is not None:
            for tp, offset in (await recover(self.assignment())).items():
                await self._seek(tp, offset)
                committed[tp] = offset
        return committed


class TallyApp(faust.App):  # type: ignore[misc]
    """The Faust app with tally's positioned consumer (see PositionedConsumer)."""

    def _new_transport(self) -> Any:
        transport = super()._new_transport()
        transport.Consumer = PositionedConsumer  # type: ignore[misc]  # this app's transport only
        return transport


def detect_config(settings: Settings) -> DetectConfig:
    """The detectors' windows and warm-up, from settings."""
    return DetectConfig(window_s=settings.detect_window_s, lateness_s=settings.detect_lateness_s,
                        min_requests=settings.detect_min_requests, warmup_windows=settings.detect_warmup_windows)


def fold_config(settings: Settings) -> FoldConfig:
    """The fold's durations, from seconds in settings to event-time milliseconds."""
    return FoldConfig(settle_ms=int(settings.fold_settle_s * 1000),
                      inactivity_ms=int(settings.fold_inactivity_s * 1000),
                      grace_ms=int(settings.fold_grace_s * 1000), idle_s=settings.fold_idle_s)


def create_app(settings: Settings, role: str, store: Store | None = None,
               input_partitions: int | None = None, request_partitions: int | None = None) -> faust.App:
    """Build the worker for a role: "process" (validate, enrich, price), "sink" (ClickHouse) or "all".

    Topics: in llm.usage.v1; out llm.cost.attempts.v1, llm.cost.requests.v1 and llm.usage.dlq.v1 (process); in
    llm.cost.attempts.v1 and llm.cost.requests.v1 (sink).
    Guarantees: at-least-once from Kafka, exactly-once effect in ClickHouse (see streams.sink.SinkWriter);
    per-partition order is kept from input to output. Faust's exactly_once mode and agent concurrency > 1 are not
    used (open upstream bugs). `input_partitions` is the input topic's real partition count (the wrong_partition
    check hashes logical ids over it, and the fold state is partitioned like it); it defaults to
    settings.partitions, as does `request_partitions` (llm.cost.requests.v1, keyed by feature_id).
    """
    topics = settings.topics
    partitions = input_partitions or settings.partitions
    req_partitions = request_partitions or settings.partitions
    serves_web = role in ("sink", "all")
    datadir = settings.data_dir / "faust" / role
    datadir.mkdir(parents=True, exist_ok=True)
    app = TallyApp(
        settings.group_id(role),
        broker=f"kafka://{settings.kafka_bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.session_timeout_s / 5),
        producer_max_request_size=4 * 1024 * 1024,
        producer_linger_ms=5,
        producer_acks=-1,
        table_standby_replicas=0,
        stream_buffer_maxsize=settings.process_batch_messages * 4,
        web_enabled=serves_web,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        datadir=str(datadir),
    )
    stats = WorkerStats(role)
    usage_topic = app.topic(topics.usage, value_type=bytes)
    attempts_topic = app.topic(topics.attempts, value_type=bytes)
    dlq_topic = app.topic(topics.dlq, value_type=bytes)
    requests_topic = app.topic(topics.requests, value_type=bytes)
    alerts_topic = app.topic(topics.alerts, value_type=bytes)
    crash = Failpoints(settings.failpoint)  # tests only: named crash points, inert unless armed
    clickhouse_thread: list[ThreadPoolExecutor] = []  # the sink's ClickHouse executor, in roles sink and all

    async def fail_at(name: str) -> None:
        """Crash at a named point (tests only), between two calls of this process's ClickHouse writer, if any.

        So the crash lands on the boundary it names, not inside another agent's insert (a kill inside an insert is
        the kill -9 test's and the fault suite's case).
        """
        if not crash.armed(name):
            return
        if clickhouse_thread:
            await asyncio.get_running_loop().run_in_executor(clickhouse_thread[0], crash.hit, name)
        else:
            crash.hit(name)

    # Input positions tally owns, per (topic, stage): the guard of the stage that consumes the topic and where its
    # position is stored. Two stages can read one topic in one worker (role all: the detectors and the sink both
    # read the requests topic); the topic then resumes from the lower of their positions and each guard passes
    # over what its stage has already saved.
    guards: dict[tuple[str, str], PositionGuard] = {}
    stored: dict[tuple[str, str], Any] = {}  # → async () -> {partition: last offset whose effects are durable}

    async def recover_positions(assigned: set[TP]) -> dict[TP, int]:
        """After an assignment: the offset to resume each owned partition from (stored position + 1, else 0)."""
        out: dict[TP, int] = {}
        for (topic, stage), guard in guards.items():
            partitions = {tp.partition for tp in assigned if tp.topic == topic}
            if not partitions:
                continue
            positions = await stored[(topic, stage)]()
            await fail_at("rebalance")
            guard.reset(positions, partitions)
            # No stored position: nothing of this partition is known to be saved, whatever Kafka's committed offset
            # says (it can run past input whose outputs never landed). Read it from its beginning: every stage is
            # idempotent, so a replay costs time, never money.
            for p in partitions:
                at = positions[p] + 1 if p in positions else 0
                out[TP(topic, p)] = min(at, out.get(TP(topic, p), at))
        if out:
            log.info("resuming from stored positions: %s",
                     ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(out.items())))
        return out

    async def admit(batch: list[tuple[bytes | None, Source]], topic: str,
                    stage: str) -> list[tuple[bytes | None, Source]]:
        """The batch without replayed input; a partition with skipped input is rewound to its stored position."""
        admitted = guards[(topic, stage)].admit(batch)
        for partition, offset in admitted.rewind.items():
            await app.consumer.seek(TP(topic, partition), offset)
        return admitted.messages

    app.recover_positions = recover_positions  # type: ignore[attr-defined]

    async def publish(topic: faust.TopicT, lines_by_partition: dict[int, list[bytes]]) -> list[Any]:
        """Hand batch messages to the producer; returns their delivery futures (await them before the batch ends)."""
        pending = []
        for partition, lines in lines_by_partition.items():
            for chunk in pack_ndjson(lines, OUTPUT_MESSAGE_BYTES):
                pending.append(await topic.send(value=chunk, partition=partition, force=True))
        return pending

    if role in ("process", "all"):
        refs = ReferenceStore()
        feed = ReferenceFeed(settings.kafka_bootstrap, topics.reference(), refs)
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
        # Event-time progress per input partition, published to every requests partition (streams.watermarks).
        progress = InputProgress(settle_ms=int(settings.fold_settle_s * 1000), idle_s=settings.fold_idle_s)
        fold_lock = asyncio.Lock()
        rebalanced = [False]
        # Validation, pricing and folding are CPU work: a thread keeps the event loop (heartbeats, commits) responsive.
        cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="process")

        @app.on_rebalance_complete.connect  # type: ignore[arg-type]
        async def _forget_fold_index(sender: Any, **kwargs: Any) -> None:
            rebalanced[0] = True  # the folder rebuilds its clocks and heaps from the restored state

        async def commit_fold(requests: dict[int, list[bytes]], writes: dict[bytes, bytes | None],
                              positions: dict[int, int] | None = None) -> None:
            """Deliver emitted requests, then the state saying so and the input positions it covers; await both.

            A crash between the steps replays the batch against the last state whose position was written: the
            same revisions are emitted again and the sink skips them. The other order could lose an emission. A
            position entry is written on the changelog partition of its input partition after that partition's state
            writes (one producer, in order), so a restored state and its recovered position always agree.
            """
            if requests:
                await asyncio.gather(*await publish(requests_topic, requests))
                stats.requests_emitted += sum(len(v) for v in requests.values())
            stats.fold_state_writes += len(writes)
            for key, value in writes.items():
                if value is not None:
                    fold_table[key] = value
                elif key in fold_table.data:
                    del fold_table[key]
            if positions:
                await fail_at("process.mid_state")
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
            sent = [await requests_topic.send(value=value, partition=r, force=True) for r in range(req_partitions)]
            await asyncio.gather(*sent)

        def caught_up(assigned: list[int]) -> list[int]:
            """Input partitions whose every message up to the broker's high watermark is processed (lag 0)."""
            guard = guards[(topics.usage, "fold")]
            out = []
            for p in assigned:
                try:
                    high = app.consumer.highwater(TP(topics.usage, p))
                except Exception:  # not fetched yet, or the consumer is between assignments: not known caught up
                    high = None
                if high is not None and guard.expected.get(p, 0) >= high:
                    out.append(p)
            return out

        guards[(topics.usage, "fold")] = PositionGuard(topics.usage)
        stored[(topics.usage, "fold")] = fold_positions

        @app.task
        async def follow_reference_data() -> None:
            await feed.run()

        @app.agent(usage_topic)
        async def process(stream: faust.StreamT) -> None:
            """llm.usage.v1 → validate → enrich → fold → llm.cost.attempts.v1, llm.cost.requests.v1, DLQ."""
            await feed.ready.wait()
            stats.reference_ready = True
            loop = asyncio.get_running_loop()
            step = FoldStep(folder, fold_table.data, req_partitions)
            try:
                async for events in stream.take_events(  # type: ignore[attr-defined]
                        settings.process_batch_messages, settings.batch_within_s):
                    batch = [(e.message.value, Source(e.message.topic, e.message.partition, e.message.offset))
                             for e in events]
                    async with fold_lock:
                        batch = await admit(batch, topics.usage, "fold")
                        if not batch:
                            continue
                        if rebalanced[0]:
                            folder.forget()
                            rebalanced[0] = False
                        out = await loop.run_in_executor(cpu, process_messages, batch, validator, refs.snapshot(),
                                                         partitions, datetime.now(UTC), step, time.time())
                        await fail_at("process.after_decode")
                        # Outputs delivered, then state and position: the position never runs ahead of either.
                        sent = await publish(attempts_topic, out.attempts)
                        sent += await publish(dlq_topic, out.dead_letters)
                        await fail_at("process.before_delivery")
                        await asyncio.gather(*sent)
                        await fail_at("process.after_delivery")
                        done = last_offsets(src for _, src in batch)
                        await commit_fold(out.requests, out.fold_writes, done)
                        finished = time.time()
                        folder.finished(done, finished)
                        await publish_watermarks(progress.after_batch(
                            done, {p: c.now_ms for p, c in folder.clocks.items()}, finished))
                        if audit.isEnabledFor(logging.DEBUG):
                            audit.debug(audit_line(topics.usage, [src for _, src in batch], {
                                "attempt_lines": out.accepted, "dead_letters": out.rejected,
                                "request_rows": sum(len(v) for v in out.requests.values()),
                                "state_writes": len(out.fold_writes)}))
                    stats.messages += len(events)
                    stats.events_accepted += out.accepted
                    stats.events_rejected += out.rejected
            except Exception:
                _stop_hard(EXIT_AGENT_FAILED, "the process agent failed; stopping without committing its batch")

        @app.timer(interval=1.0)
        async def fold_tick() -> None:
            """Event time runs on for caught-up, silent partitions: settle and inactivity decisions still fall due."""
            if not stats.reference_ready or app.rebalancing:
                return
            assigned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == topics.usage)
            if not assigned:
                return
            loop = asyncio.get_running_loop()
            async with fold_lock:
                if rebalanced[0]:
                    folder.forget()
                    rebalanced[0] = False
                progress.forget(set(progress.marks) - set(assigned))
                try:
                    # Only caught-up, silent partitions: a backlog or a slow batch never moves a clock.
                    wall = time.time()
                    silent = progress.silent(assigned, caught_up(assigned), wall)
                    result = await loop.run_in_executor(cpu, folder.tick, silent, fold_table.data, wall,
                                                        datetime.now(UTC))
                    await commit_fold(group_requests(result.emitted, req_partitions), result.writes)
                    await publish_watermarks(progress.idle(silent, wall))
                except Exception:
                    _stop_hard(EXIT_AGENT_FAILED, "the fold timer failed; stopping")

        # Detect: per-feature detectors over llm.cost.requests.v1 (keyed by feature_id). Their durable state is one
        # snapshot per feature in a table partitioned like that topic, written at most every detect_snapshot_s.
        detector = Detector(detect_config(settings))
        detect_table = KeyedTable(
            app, name="detect-state", beacon=app.tables.beacon, partitions=req_partitions,
            changelog_topic=app.topic(topics.detect_state, partitions=req_partitions, compacting=True, acks=False,
                                      key_serializer="raw", value_serializer="raw"))
        app.tables.add(detect_table)
        detect_lock = asyncio.Lock()
        detect_restore = [True]
        detect_done: dict[int, int] = {}  # requests partition → last offset observed since the last snapshot
        last_snapshot = [0.0]

        @app.on_rebalance_complete.connect  # type: ignore[arg-type]
        async def _restore_detectors(sender: Any, **kwargs: Any) -> None:
            detect_restore[0] = True

        async def detect_positions() -> dict[int, int]:
            return positions_in_state(detect_table.data)

        guards[(topics.requests, "detect")] = PositionGuard(topics.requests)
        stored[(topics.requests, "detect")] = detect_positions

        def restore_detectors() -> None:
            """After an assignment: the owned partitions' snapshots and watermarks, as of their stored positions."""
            if not detect_restore[0]:
                return
            assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.requests}
            data = dict(detect_table.data)
            features = {key: blob for key, blob in data.items() if not is_meta_key(key) and blob is not None}
            where = {key: partition_for_bytes(key, req_partitions) for key in features}
            owned = {key.decode(): blob for key, blob in features.items() if where[key] in assigned}
            marks = {r: data[watermarks_key(r)] for r in assigned if data.get(watermarks_key(r))}
            detector.restore(owned, {fid: where[fid.encode()] for fid in owned}, marks, time.time())
            detect_done.clear()
            detect_restore[0] = False

        async def publish_detected(alerts: list[dict[str, Any]], force_snapshot: bool = False) -> None:
            """Deliver alerts, then snapshots, watermarks and positions (every detect_snapshot_s), awaited.

            Alerts are keyed by incident; then the changed features' snapshots, the partitions' watermarks and
            positions are written and awaited: a position never runs ahead of the state it covers.

            A crash replays the requests after the stored positions against the stored snapshots; the detectors are
            deterministic in their input, so the same alerts are raised again, with the same incident ids, which the
            alert consumer pages once.
            """
            sent = [await alerts_topic.send(key=a["incident_key"].encode(), value=encode_record(a), force=True)
                    for a in alerts]
            await asyncio.gather(*sent)
            stats.anomaly_alerts += len(alerts)
            if force_snapshot or time.time() - last_snapshot[0] >= settings.detect_snapshot_s:
                snapshots = detector.take_dirty()
                for fid, blob in snapshots.items():
                    detect_table[fid.encode()] = blob
                for r, offset in detect_done.items():
                    detect_table[watermarks_key(r)] = detector.marks_of(r)
                    detect_table[position_key(r)] = encode_offset(offset)
                detect_done.clear()
                await detect_table.written()
                stats.detect_snapshots += len(snapshots)
                last_snapshot[0] = time.time()

        def observe(batch: list[tuple[bytes | None, Source]]) -> list[dict[str, Any]]:
            """The batch in offset order per partition: rows fill windows, watermarks close them."""
            alerts: list[dict[str, Any]] = []
            for value, src in batch:
                if is_watermark(value):
                    marks, sources = decode_watermarks(value or b"")
                    alerts.extend(detector.watermark(src.partition, marks, sources))
                    continue
                rows = [orjson.loads(line) for line in (value or b"").split(b"\n") if line]
                stats.detect_requests += len(rows)
                detector.observe(rows, src.partition)
            stats.detect_late = detector.late_rows
            stats.detect_duplicates = detector.duplicate_rows
            return alerts

        @app.agent(requests_topic)
        async def detect(stream: faust.StreamT) -> None:
            """llm.cost.requests.v1 → per-feature detectors → llm.cost.alerts.v1 (anomaly records)."""
            loop = asyncio.get_running_loop()
            try:
                async for events in stream.take_events(  # type: ignore[attr-defined]
                        settings.process_batch_messages, settings.batch_within_s):
                    batch = [(e.message.value, Source(e.message.topic, e.message.partition, e.message.offset))
                             for e in events]
                    async with detect_lock:
                        restore_detectors()
                        batch = await admit(batch, topics.requests, "detect")
                        if not batch:
                            continue
                        try:
                            alerts = await loop.run_in_executor(cpu, observe, batch)
                        except Exception:  # a detector bug must not stop pricing: the requests are saved anyway
                            stats.detect_errors += 1
                            log.exception("detect: a batch of %d messages was not scored", len(events))
                            alerts = []
                        detect_done.update(last_offsets(src for _, src in batch))
                        await publish_detected(alerts)
            except Exception:
                _stop_hard(EXIT_AGENT_FAILED, "the detect agent failed; stopping without committing its batch")

        @app.timer(interval=1.0)
        async def detect_tick() -> None:
            """Snapshots and positions of a partition that went quiet are written within detect_snapshot_s.

            No clock moves here: event time reaches the detectors only in watermark messages (streams.watermarks).
            """
            if app.rebalancing or not detect_done:
                return
            async with detect_lock:
                restore_detectors()  # after a rebalance: nothing of a partition given away is written
                try:
                    await publish_detected([])
                except Exception:
                    _stop_hard(EXIT_AGENT_FAILED, "the detect timer failed; stopping")

    if role in ("sink", "all"):
        if store is None:
            raise ValueError("the sink role needs a Store")
        writer = SinkWriter(store)
        request_writer = RequestWriter(store, SinkStats())
        anomaly_writer = AnomalyWriter(store, SinkStats())
        # One thread owns the ClickHouse client: inserts and API queries are serialized on it, and the event loop
        # (Faust's consumer) keeps running while an insert is in flight.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        clickhouse_thread.append(executor)

        # The sink's input positions live in ClickHouse (sink_offsets), under one name whatever the role.
        sink_consumer = settings.group_id("sink")

        def sink_positions(topic: str) -> Any:
            async def read() -> dict[int, int]:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(executor, writer.store.stored_offsets, sink_consumer, topic)
            return read

        for topic in (topics.attempts, topics.requests, topics.alerts):
            guards[(topic, "sink")] = PositionGuard(topic)
            stored[(topic, "sink")] = sink_positions(topic)

        async def sink_batches(stream: faust.StreamT, write: Any, decode: Any, sink_stats: SinkStats) -> None:
            """Admit → decode → write with retry → dead-letter bad lines and refused rows → store the position.

            The position (sink_offsets) is written only after ClickHouse acknowledged the rows and the dead letters
            were delivered; every assignment resumes from it, so Kafka's committed offsets never decide what is saved.
            """
            loop = asyncio.get_running_loop()
            try:
                async for events in stream.take_events(  # type: ignore[attr-defined]
                        settings.sink_batch_messages, settings.batch_within_s):
                    batch = [(e.message.value, Source(e.message.topic, e.message.partition, e.message.offset))
                             for e in events]
                    topic = batch[0][1].topic if batch else ""
                    batch = await admit(batch, topic, "sink") if batch else batch
                    if not batch:
                        continue
                    # Decoding is CPU work: off the event loop, so heartbeats, commits and the API stay responsive.
                    rows, bad_lines = await loop.run_in_executor(executor, decode, batch)
                    await fail_at("sink.after_decode")
                    written = await write_with_retry(write, rows, executor, settings.sink_retry_s, sink_stats)
                    await fail_at("sink.after_insert")
                    for partition, lines in written.dead_letters().items():
                        bad_lines.setdefault(partition, []).extend(lines)
                    await asyncio.gather(*await publish(dlq_topic, bad_lines))  # delivered before the position
                    stats.events_rejected += sum(len(v) for v in bad_lines.values())
                    await run_with_retry(functools.partial(writer.store.record_offsets, sink_consumer, topic,
                                                           last_offsets(src for _, src in batch)),
                                         executor, settings.sink_retry_s, sink_stats, f"storing the {topic} position")
                    if audit.isEnabledFor(logging.DEBUG):
                        audit.debug(audit_line(topic, [src for _, src in batch], {
                            "rows": len(rows), "inserted": written.inserted,
                            "dead_letters": sum(len(v) for v in bad_lines.values())}))
            except SinkGaveUp as exc:
                # Going on would let Faust commit offsets of unsaved rows: stop hard, commit nothing.
                _stop_hard(EXIT_SINK_GAVE_UP, "sink gave up, stopping the worker without committing: %s", exc)
            except Exception:
                _stop_hard(EXIT_AGENT_FAILED, "a sink agent failed; stopping without committing its batch")

        budget_refs = ReferenceStore()
        budget_feed = ReferenceFeed(settings.kafka_bootstrap, (topics.budgets,), budget_refs)
        budget_topic = app.topic(topics.budget_state, value_type=bytes)
        budget_states: dict[str, dict[str, Any]] = {}

        @app.task
        async def follow_budgets() -> None:
            loop = asyncio.get_running_loop()
            # The last published states remember which thresholds already alerted in this period.
            budget_states.update(await loop.run_in_executor(None, read_compacted, settings.kafka_bootstrap,
                                                            topics.budget_state))
            await budget_feed.run()

        @app.timer(interval=settings.budget_interval_s)
        async def budget_tick() -> None:
            """Spend to date (rollups) against budgets → llm.budget.state.v1 and budget alerts."""
            if not budget_feed.ready.is_set():
                return
            loop = asyncio.get_running_loop()
            now = datetime.now(UTC)
            budgets = budget_refs.snapshot().budgets_at(now)
            if budgets is None:
                return
            try:
                spend, recent = await loop.run_in_executor(
                    executor, read_spend, lambda sql: store.query(sql).rows, budgets, now, settings.budget_window_s)
            except StoreError as exc:
                log.warning("budget: cannot read spend (%s); next try in %.0fs", exc, settings.budget_interval_s)
                return
            ev = evaluate(budgets, spend, recent, settings.budget_window_s, now, budget_states)
            sent = [await alerts_topic.send(key=a["incident_key"].encode(), value=encode_record(a), force=True)
                    for a in ev.alerts]
            sent += [await budget_topic.send(key=k.encode(), value=encode_record(v), force=True)
                     for k, v in ev.states.items()]
            await asyncio.gather(*sent)
            budget_states.update({k: orjson.loads(encode_record(v)) for k, v in ev.states.items()})
            stats.budget_alerts += len(ev.alerts)

        @app.agent(attempts_topic)
        async def sink(stream: faust.StreamT) -> None:
            """llm.cost.attempts.v1 → usage_events (each event_id once)."""
            await sink_batches(stream, writer, functools.partial(decode_batch, shape=ATTEMPT_ROWS),
                               writer.stats)

        @app.agent(requests_topic)
        async def sink_requests(stream: faust.StreamT) -> None:
            """llm.cost.requests.v1 → logical_requests (each request once, at its latest revision)."""
            await sink_batches(stream, request_writer, functools.partial(decode_batch, shape=REQUEST_ROWS),
                               request_writer.stats)

        @app.agent(alerts_topic)
        async def sink_anomalies(stream: faust.StreamT) -> None:
            """llm.cost.alerts.v1 → anomalies (anomaly records; budget alerts are passed over)."""
            await sink_batches(stream, anomaly_writer, decode_anomalies, anomaly_writer.stats)

        # API queries: their own connections and threads (Store.api_query), never the sink's executor.
        query_slots = asyncio.Semaphore(settings.query_max_concurrent)
        query_executor = ThreadPoolExecutor(max_workers=settings.query_max_concurrent, thread_name_prefix="query")

        @app.page("/api/query")
        class QueryView(View):
            """Read-only SQL (what `tally query` sends): one SELECT over tally's tables, capped, beside the sink.

            400: refused by the allow-list or cut by a limit (the message says which); 401: no valid token;
            429: `query_max_concurrent` queries already run.
            """

            async def post(self, request: Request) -> Response:
                if not authorized(request, settings):
                    return _json_response(self, UNAUTHORIZED, status=401)
                body = await request.json()
                sql = body.get("sql") if isinstance(body, dict) else None
                if not isinstance(sql, str) or not sql.strip():
                    return _json_response(self, {"error": "POST {\"sql\": \"SELECT …\"}"}, status=400)
                if query_slots.locked():
                    return _json_response(self, {"error": f"{settings.query_max_concurrent} queries already run; "
                                                          "try again later"}, status=429)
                loop = asyncio.get_running_loop()
                async with query_slots:
                    try:
                        res = await loop.run_in_executor(query_executor, writer.store.api_query, sql)
                    except StoreError as exc:
                        return _json_response(self, {"error": str(exc)}, status=400)
                return _json_response(self, {"columns": res.columns, "rows": res.rows})

    if serves_web:
        @app.page("/api/status")
        class StatusView(View):
            """Worker counters as JSON."""

            async def get(self, request: Request) -> Response:
                if not authorized(request, settings):
                    return _json_response(self, UNAUTHORIZED, status=401)
                sink = writer.stats  # only sink and all roles serve the web API
                return _json_response(self, {**asdict(stats), "sink_rows_inserted": sink.rows_inserted,
                                             "sink_duplicates_skipped": sink.duplicates_in_batch + sink.already_saved,
                                             "sink_retries": sink.retries,
                                             "sink_conflicting_duplicates": sink.conflicting_duplicates,
                                             "sink_rows_superseded": sink.superseded,
                                             "sink_request_rows_inserted": request_writer.stats.rows_inserted,
                                             "sink_request_revisions_skipped": request_writer.stats.already_saved,
                                             "pid": os.getpid(),
                                             "uptime_s": round(time.time() - stats.started_at, 1)})

        from streams.dashboard import register_dashboard  # the live page: /dashboard/ and /api/panels
        register_dashboard(app, writer.store, executor, budget_states, settings)

    app.tally_stats = stats  # type: ignore[attr-defined]
    return app


def read_compacted(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The latest JSON value per key of a compacted topic, read from the beginning to the current end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "tally-compacted-reader",
                         "enable.auto.commit": False})
    out: dict[str, dict[str, Any]] = {}
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            return out
        ends = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            key, value, offset = (msg.key() or b"").decode(), msg.value(), msg.offset() or 0
            if value is None:
                out.pop(key, None)
            else:
                out[key] = orjson.loads(value)
            if offset + 1 >= ends.get(msg.partition() or 0, 0):
                ends.pop(msg.partition() or 0, None)
        if ends:
            raise TallyError(f"could not read {topic} to its end within {timeout_s:.0f}s")
    except KafkaException as exc:
        raise TallyError(f"cannot read {topic} from {bootstrap}: {exc}") from exc
    finally:
        consumer.close()
    return out


def _partition_count(bootstrap: str, topic: str) -> int:
    """The topic's partition count from broker metadata: the one the producers hash over, whatever config says."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "tally-metadata"})
    try:
        meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
    except KafkaException as exc:
        raise TallyError(f"cannot read metadata of {topic} from {bootstrap}: {exc}") from exc
    finally:
        consumer.close()
    if meta is None or meta.error is not None or not meta.partitions:
        raise TallyError(f"topic {topic} does not exist on {bootstrap}: create it (`tally up` or `tally kafka start`)")
    return len(meta.partitions)


def run_worker(settings: Settings, role: str) -> None:
    """Run a worker in the foreground until SIGTERM/SIGINT. The sink role applies migrations first."""
    store: Store | None = None
    if role in ("sink", "all"):
        store = Store(settings)
        applied = store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
    app = create_app(settings, role, store, _partition_count(settings.kafka_bootstrap, settings.topics.usage),
                     _partition_count(settings.kafka_bootstrap, settings.topics.requests))
    # A batch holds ~100k short-lived objects that are all alive at once; with the default thresholds the cyclic
    # collector walks them (and every import) many times per batch. Start-up objects are frozen out of it and
    # young-generation collections are rarer. Measured: tests/bench (validate+enrich per event).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    demote_routine_library_logs()  # an ERROR or WARNING in the worker log means an operator has to act
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if store is not None:
            store.close()
