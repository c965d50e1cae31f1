"""The Faust app: the only place that creates it and composes its roles' wiring (streams.roles), role by role."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from confluent_kafka import Consumer, KafkaException
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP

from streams.metrics import WorkerMetrics
from streams.positions import SoughtOffsets
from streams.roles.budget import read_compacted, wire_budget
from streams.roles.context import OUTPUT_MESSAGE_BYTES, RoleContext, WorkerStats, log
from streams.roles.detect import detect_config, wire_detect
from streams.roles.health import wire_health
from streams.roles.otlp import wire_otlp
from streams.roles.process import wire_process
from streams.roles.sink import wire_sink
from streams.roles.web import wire_web
from tally.config import Settings
from tally.errors import TallyError
from tally.failpoints import Failpoints
from tally.kafka_auth import KafkaAuth, metadata, watched
from tally.logs import demote_routine_library_logs, dump_worker
from tally.store import Store

# Re-exported: ops and tests import read_compacted from here; the benches' comments name OUTPUT_MESSAGE_BYTES and
# detect_config as streams.app's.
__all__ = ["OUTPUT_MESSAGE_BYTES", "TallyApp", "create_app", "detect_config", "read_compacted", "run_worker"]


class PositionedConsumer(aiokafka_driver.Consumer):  # type: ignore[misc]
    """Faust's consumer, but every seek to the committed offsets ends at the positions tally stored.

    Faust seeks to the committed offsets after every assignment (start, rebalance, restart) and when its flow was
    stopped; tally then moves each partition it owns a position for to that position + 1. Kafka's committed offsets
    are only a lag hint: a commit past unprocessed input cannot lose it.

    After tally seeks a partition it owns (`seek_owned`: those moves, and a stage's rewind), Faust's read offset
    is moved before the seek, and the records of it fetched before the seek are passed over until the sought one
    arrives (streams.positions.SoughtOffsets). Either gap can let Faust drop the records the seek fetched, leaving
    the partition's input fetched but never processed (not shown to cause the stalls seen; RoleContext.unstall
    heals those).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sought = SoughtOffsets()

    async def _seek(self, partition: TP, offset: int) -> None:
        # On the consumer's own thread, as Faust's seek_to_committed runs: a seek from the event loop's thread
        # races the fetcher there (seen: KeyError in aiokafka's fetched_records right after a restart).
        await self._thread.call_thread(self._thread.seek, partition, offset)  # type: ignore[arg-type]

    async def seek_owned(self, partition: TP, offset: int) -> None:
        """Seek a partition tally owns a position for; what was fetched before is passed over (see the class).

        Faust's own seek notes the new read offset only after the seek returned from the consumer's thread: a record
        the seek fetched in between can meet the old read offset and be dropped, leaving the partition's records
        fetched but never delivered (a stalled partition looked like that under `kill -USR1`: the fetch position at
        the end of the log, the read offset at the sought one). Here the read offset is moved first; stalls went on
        without this being shown to be their cause, and RoleContext.unstall heals them.
        """
        self._sought.seek(partition, offset)
        self._read_offset[partition] = offset if offset else None
        await self._seek(partition, offset)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        sought = self._sought
        async for tp, message in super().getmany(timeout):
            if not sought.sought or sought.deliver(tp, message.offset):
                yield tp, message

    async def seek_to_committed(self) -> Any:
        hold = getattr(self.app, "hold_positions", None)
        if hold is not None:
            hold()  # no stage admits input until its positions are read (streams.positions.PositionGuard)
        committed = dict(await super().seek_to_committed())
        recover = getattr(self.app, "recover_positions", None)
        if recover is not None:
            for tp, offset in (await recover(self.assignment())).items():
                await self.seek_owned(tp, offset)
                committed[tp] = offset
        return committed


class TallyApp(faust.App):  # type: ignore[misc]
    """The Faust app with tally's positioned consumer (see PositionedConsumer)."""

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        """On a rebalance, Faust's wait for the streams to finish; on the way out (SIGTERM, `tally down`), none.

        Stopping, Faust waited for every message in flight to be acked and committed offsets while it did; a commit
        that met a rebalance rejoined the group and the worker never exited (seen: a clean leave during another
        worker's restart, `tests/e2e/test_roles.py`). tally resumes from its own stored positions, so what the
        streams had not finished is replayed by the next owner, as after a kill -9.
        """
        if self.should_stop:
            logger.info("stopping: not waiting for the streams (the next owner resumes from the stored positions)")
            return
        await super()._consumer_wait_empty(consumer, logger)

    def _new_transport(self) -> Any:
        transport = super()._new_transport()
        transport.Consumer = PositionedConsumer  # type: ignore[misc]  # this app's transport only
        return transport


def create_app(settings: Settings, role: str, store: Store | None = None,
               input_partitions: int | None = None, request_partitions: int | None = None,
               otlp_partitions: int | None = None) -> faust.App:
    """Build the worker for a role: "process" (validate, enrich, price), "sink" (ClickHouse) or "all".

    Topics: in llm.usage.v1; out llm.cost.attempts.v1, llm.cost.requests.v1 and llm.usage.dlq.v1 (process); in
    llm.cost.attempts.v1 and llm.cost.requests.v1 (sink).
    Guarantees: at-least-once from Kafka, exactly-once effect in ClickHouse (see streams.sink.SinkWriter);
    per-partition order is kept from input to output. Faust's exactly_once mode and agent concurrency > 1 are not
    used (open upstream bugs). `input_partitions` is the input topic's real partition count (the wrong_partition
    check hashes logical ids over it, and the fold state is partitioned like it); it defaults to
    settings.partitions, as does `request_partitions` (llm.cost.requests.v1, keyed by feature_id) and
    `otlp_partitions` (the OTLP traces topic, when settings.otlp_topic names one: streams.roles.otlp).
    """
    topics = settings.topics
    serves_web = role in ("sink", "all")
    process_http = role == "process" and settings.process_web_port > 0  # /metrics and the probes only
    datadir = settings.data_dir / "faust" / role
    datadir.mkdir(parents=True, exist_ok=True)
    app = TallyApp(
        settings.group_id(role),
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=settings.kafka.faust_credentials(),  # TLS and SASL (tally.kafka_auth); None: PLAINTEXT
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
        web_enabled=serves_web or process_http,
        # Only tally's own pages: Faust's built-in /table, /router, /graph and statistics pages would serve the
        # workers' state (open logical requests, detector snapshots) to anyone who reaches the port.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.process_web_port if process_http else settings.web_port,  # (unused when disabled)
        datadir=str(datadir),
    )
    ctx = RoleContext(
        app, settings, WorkerStats(role), store,
        partitions=input_partitions or settings.partitions,
        req_partitions=request_partitions or settings.partitions,
        usage_topic=app.topic(topics.usage, value_type=bytes),
        attempts_topic=app.topic(topics.attempts, value_type=bytes),
        dlq_topic=app.topic(topics.dlq, value_type=bytes),
        requests_topic=app.topic(topics.requests, value_type=bytes),
        alerts_topic=app.topic(topics.alerts, value_type=bytes),
        crash=Failpoints(settings.failpoint),
        metrics=WorkerMetrics(role),
    )
    app.recover_positions = ctx.recover_positions  # type: ignore[attr-defined]  # PositionedConsumer calls it
    app.hold_positions = ctx.hold_positions  # type: ignore[attr-defined]

    @app.timer(interval=5.0, name="tally.watch_positions")
    async def watch_positions() -> None:
        """Input fetched but never handed to its stage is sought again (streams.positions.StallWatch)."""
        await ctx.unstall(time.monotonic())

    @app.task
    async def tasks_on_sigusr1() -> None:
        """`kill -USR1 <pid>` logs where each asyncio task waits, and the consumer's state.

        A stuck worker's first question. It replaces mode's own SIGUSR1 handler, which prints the tasks' frames
        without their await chains.
        """
        loop = asyncio.get_running_loop()

        def dump() -> None:
            try:
                dump_worker(app, loop, log)
            except Exception:  # the framework's internals moved: say so, keep the worker running
                log.exception("SIGUSR1: the state dump failed")

        loop.add_signal_handler(signal.SIGUSR1, dump)

    if role in ("process", "all"):
        # Validation, pricing, folding and the detectors are CPU work: one thread keeps the event loop (heartbeats,
        # commits) responsive.
        cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="process")
        wire_process(ctx, cpu)
        wire_detect(ctx, cpu)
        if topics.otlp:
            wire_otlp(ctx, cpu, otlp_partitions or settings.partitions)
    if role in ("sink", "all"):
        sink = wire_sink(ctx)
        budget_states = wire_budget(ctx, sink)
        wire_web(ctx, sink, budget_states)  # serves_web: the pages read ClickHouse, which the sink owns

    wire_health(ctx)  # /metrics, /livez, /readyz: on the worker's HTTP port, where it has one

    app.tally_stats = ctx.stats  # type: ignore[attr-defined]
    app.tally_metrics = ctx.metrics  # type: ignore[attr-defined]
    return app


def _partition_count(bootstrap: str | KafkaAuth, topic: str) -> int:
    """The topic's partition count from broker metadata: the one the producers hash over, whatever config says."""
    conf, errors = watched(bootstrap, {"group.id": "tally-metadata"})
    consumer = Consumer(conf)
    try:
        meta = metadata(consumer, errors, bootstrap, 30.0, topic).topics.get(topic)
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
    topics = settings.topics
    otlp = _partition_count(settings.kafka, topics.otlp) if topics.otlp and role in ("process", "all") else None
    app = create_app(settings, role, store, _partition_count(settings.kafka, topics.usage),
                     _partition_count(settings.kafka, topics.requests), otlp)
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
