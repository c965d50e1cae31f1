"""What every role's wiring shares: the app, settings, store, counters, topics and tally's stored input positions."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import faust
from faust.types import TP

from streams.metrics import Check, Heartbeat, WorkerMetrics
from streams.positions import PositionGuard, StallWatch, is_meta_key, meta_partition
from streams.records import Source
from streams.sink_columns import is_arrow
from tally.config import Settings
from tally.failpoints import Failpoints
from tally.partitioning import partition_for_bytes
from tally.sdk.batching import pack_ndjson
from tally.store import Store

log = logging.getLogger("tally.worker")
# Debug level: per batch, the input offsets it covers and the outputs it produced, logged once its position is stored.
audit = logging.getLogger("tally.offsets")

# Output messages stay well under the producer's max request size (and Kafka's default 1 MiB message limit).
OUTPUT_MESSAGE_BYTES = 900 * 1024
EXIT_SINK_GAVE_UP = 70
EXIT_AGENT_FAILED = 71

Batch = list[tuple[bytes | None, Source]]
T = TypeVar("T")
StoredPositions = Callable[[], Awaitable[dict[int, int]]]  # → {partition: last offset whose effects are durable}


def stop_hard(code: int, message: str, *args: Any) -> None:
    """Stop the worker at once, committing nothing more: the batch in hand is processed again after a restart.

    Faust would restart a crashed agent in place and could then commit offsets of a batch never written.
    """
    log.critical(message, *args, exc_info=code == EXIT_AGENT_FAILED)
    logging.shutdown()
    os._exit(code)


# An Arrow hand-off message counts as this many bytes a row when a batch is cut into runs: compressed, an attempt
# takes ~253 B and a logical request ~255 B (20,000 events of tests.bench's pool through process_messages), so a
# run of estimated rows is close to a run of real ones.
ARROW_BYTES_PER_ROW = 250


def lines_in(value: bytes | None) -> int:
    """How many rows a message holds, for bounding work: NDJSON lines, or an Arrow message's size estimate."""
    if not value:
        return 1
    if is_arrow(value):
        return max(1, len(value) // ARROW_BYTES_PER_ROW)
    return value.count(b"\n") + 1


def line_runs(batch: Batch, max_lines: int, lines_of: Callable[[bytes | None], int] = lines_in) -> list[Batch]:
    """The batch in consecutive runs of whole messages holding at most `max_lines` lines (rows) each, in order.

    A message with more lines than `max_lines` is a run of its own. Handling one run at a time bounds the Python
    objects a batch holds at once (settings.batch_max_lines). `lines_of` counts a message's lines (rows, spans).
    """
    runs: list[Batch] = []
    run: Batch = []
    lines = 0
    for value, source in batch:
        n = lines_of(value)
        if run and lines + n > max_lines:
            runs.append(run)
            run, lines = [], 0
        run.append((value, source))
        lines += n
    if run:
        runs.append(run)
    return runs


async def gathered(batches: AsyncIterable[Sequence[T]], max_lines: int, within_s: float,
                   lines_of: Callable[[T], int]) -> AsyncIterator[list[T]]:
    """Batches from `batches` (stream.take_events), gathered until they hold `max_lines` lines or `within_s` passed.

    A take of one-event messages holds 100 lines; handled alone, its outputs are a few messages of ~25 rows, and
    the sink pays one ClickHouse insert per message. Gathering takes that come in quick succession makes outputs of
    thousands of rows. It never waits for data that is not there: once `within_s` has passed since the first take
    of a gathered batch, what is held is yielded, and the take still in flight is awaited for the next one.
    Faust acks a take's events when the next take starts, before they are processed here: tally's positions, not
    Kafka's committed offsets, decide where a worker resumes (streams.positions), so nothing is lost by it.
    """
    loop = asyncio.get_running_loop()
    it = batches.__aiter__()
    ahead: asyncio.Future[Sequence[T]] | None = None
    try:
        while True:
            if ahead is None:
                ahead = asyncio.ensure_future(it.__anext__())
            try:
                first = await ahead
            except StopAsyncIteration:
                return
            ahead = None
            held = list(first)
            lines = sum(map(lines_of, held))
            deadline = loop.time() + within_s
            while lines < max_lines and loop.time() < deadline:
                ahead = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({ahead}, timeout=deadline - loop.time())
                if not done:
                    break  # nothing more in time: `ahead` stays in flight for the next gathered batch
                try:
                    more = ahead.result()
                except StopAsyncIteration:
                    yield held
                    return
                ahead = None
                held.extend(more)
                lines += sum(map(lines_of, more))
            yield held
    finally:
        if ahead is not None:  # the worker is stopping: the take in flight goes with it
            ahead.cancel()


def agent_name(fun: str) -> str:
    """The name Faust gave the agent `fun` when create_app declared every agent in streams.app (its logs say it)."""
    return f"streams.app.{fun}"


def timer_name(fun: str) -> str:
    """The name Faust gave the timer `fun` when create_app declared every timer in streams.app (its logs say it)."""
    return f"streams.app.create_app.<locals>.{fun}"


def batch_of(events: Iterable[Any]) -> Batch:
    """A batch from `stream.take_events`: each message's value and where it was read."""
    return [(e.message.value, Source(e.message.topic, e.message.partition, e.message.offset)) for e in events]


def _process(default: Any = 0) -> Any:
    """A WorkerStats counter only the process role moves (validate, fold, detect)."""
    return field(default=default, metadata={"role": "process"})


@dataclass
class WorkerStats:
    """Counters a worker serves on /api/status (and `tally status` / `tally run` print)."""

    role: str
    started_at: float = field(default_factory=time.time)
    messages: int = 0
    events_accepted: int = _process()
    events_rejected: int = 0
    reference_ready: bool = False
    requests_emitted: int = _process()
    fold_state_writes: int = _process()
    budget_alerts: int = 0
    detect_requests: int = _process()
    detect_errors: int = _process()
    anomaly_alerts: int = _process()
    detect_snapshots: int = _process()
    detect_late: int = _process()  # requests older than their feature's current window (counted in ratios, not rates)
    detect_duplicates: int = _process()  # re-emitted requests already counted
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)  # what events_rejected holds, by reason

    def dead_lettered(self, reasons: Iterable[str]) -> None:
        """Count dead letters by reason code (events_rejected counts them all)."""
        for reason in reasons:
            self.dead_letters_by_reason[reason] = self.dead_letters_by_reason.get(reason, 0) + 1

    def served(self) -> dict[str, Any]:
        """The counters this worker's role moves: a sink does not serve the process role's, which would read 0."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if self.role != "sink" or f.metadata.get("role") != "process"}


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


@dataclass
class RoleContext:
    """One worker's app and what its roles share; each role's wiring (streams.roles.*) declares its part on it.

    `partitions` is the input topic's real partition count, `req_partitions` llm.cost.requests.v1's (see create_app).
    """

    app: faust.App
    settings: Settings
    stats: WorkerStats
    store: Store | None
    partitions: int
    req_partitions: int
    usage_topic: faust.TopicT
    attempts_topic: faust.TopicT
    dlq_topic: faust.TopicT
    requests_topic: faust.TopicT
    alerts_topic: faust.TopicT
    crash: Failpoints  # tests only: named crash points, inert unless armed
    clickhouse: ThreadPoolExecutor | None = None  # the sink's ClickHouse executor, in roles sink and all
    # Input positions tally owns, per (topic, stage): the guard of the stage that consumes the topic and where its
    # position is stored. Two stages can read one topic in one worker (role all: the detectors and the sink both
    # read the requests topic); the topic then resumes from the lower of their positions and each guard passes
    # over what its stage has already saved.
    guards: dict[tuple[str, str], PositionGuard] = field(default_factory=dict)
    stored: dict[tuple[str, str], StoredPositions] = field(default_factory=dict)
    stalls: StallWatch = field(default_factory=StallWatch)  # partitions fetched but not delivered (unstall)
    # /metrics, /livez and /readyz (streams.roles.health): the registry, the loop's pulse, the readiness checks.
    metrics: WorkerMetrics = field(default_factory=lambda: WorkerMetrics("worker"))
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    ready: list[Callable[[], Check]] = field(default_factory=list)

    def own_positions(self, topic: str, stage: str, stored: StoredPositions) -> None:
        """The stage reads `topic` from the positions `stored` returns, behind a guard that drops replayed input."""
        self.guards[(topic, stage)] = PositionGuard(topic)
        self.stored[(topic, stage)] = stored

    async def fail_at(self, name: str) -> None:
        """Crash at a named point (tests only), between two calls of this process's ClickHouse writer, if any.

        So the crash lands on the boundary it names, not inside another agent's insert (a kill inside an insert is
        the kill -9 test's and the fault suite's case).
        """
        if not self.crash.armed(name):
            return
        if self.clickhouse is not None:
            await asyncio.get_running_loop().run_in_executor(self.clickhouse, self.crash.hit, name)
        else:
            self.crash.hit(name)

    async def unstall(self, now: float) -> None:
        """Seek again every owned partition whose input waits undelivered (StallWatch); a timer calls this."""
        consumer: Any = self.app.consumer
        read = getattr(consumer, "_read_offset", None)
        if read is None or getattr(self.app, "rebalancing", False):
            return
        wants: dict[TP, int] = {}
        for (topic, _), guard in self.guards.items():
            if guard.open:
                for p, want in guard.expected.items():
                    tp = TP(topic, p)
                    wants[tp] = min(want, wants.get(tp, want))
        for tp, want in wants.items():
            try:
                high = consumer.highwater(tp)
            except Exception:  # noqa: S112 - not fetched yet, or between assignments: nothing to judge yet
                continue
            if not self.stalls.suspect(tp, want, high, read.get(tp), now):
                continue
            position = await consumer.position(tp)
            if position is None or position <= want:
                continue  # the fetch has not passed it: it is coming
            log.warning("%s[%d]: input waits at %d (fetched to %d, high watermark %d) but none was delivered for "
                        "%.0f s; seeking it again", tp.topic, tp.partition, want, position, high,
                        self.stalls.after_s)
            seek = getattr(consumer, "seek_owned", consumer.seek)
            await seek(tp, want)

    def hold_positions(self) -> None:
        """An assignment starts: every stage holds its input back until recover_positions has read its positions."""
        for guard in self.guards.values():
            guard.hold()

    async def recover_positions(self, assigned: set[TP]) -> dict[TP, int]:
        """After an assignment: the offset to resume each owned partition from; opens the stages' guards.

        Each stage resumes after its stored position. With none stored, nothing of the partition is known to be
        saved, whatever Kafka's committed offset says (it can run past input whose outputs never landed): it is
        read from the first offset its log holds. Every stage is idempotent, so a replay costs time, never money.
        Two stages on one topic resume it from the lower of their offsets. The guards open together, after every
        position is read (PositionGuard: input that arrived before is held back, and the seek delivers it again).
        """
        out: dict[TP, int] = {}
        found: list[tuple[PositionGuard, dict[int, int], set[int]]] = []
        for (topic, stage), guard in self.guards.items():
            partitions = {tp.partition for tp in assigned if tp.topic == topic}
            if partitions:
                found.append((guard, await self.stored[(topic, stage)](), partitions))
        await self.fail_at("rebalance")
        unstored = {TP(guard.topic, p) for guard, positions, partitions in found for p in partitions
                    if p not in positions}
        starts = dict(await self.app.consumer.earliest_offsets(*unstored)) if unstored else {}
        for guard, positions, partitions in found:
            begin = {p: int(starts.get(TP(guard.topic, p)) or 0) for p in partitions if p not in positions}
            for p, at in guard.reset(positions, partitions, begin).items():
                tp = TP(guard.topic, p)
                out[tp] = min(at, out.get(tp, at))
        if out:
            log.info("resuming from stored positions: %s",
                     ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(out.items())))
        return out

    async def admit(self, batch: Batch, topic: str, stage: str) -> Batch:
        """The batch without replayed input; a partition with skipped input is rewound to its stored position."""
        admitted = self.guards[(topic, stage)].admit(batch)
        if (admitted.replayed or admitted.held) and self.settings.audit_offsets:
            audit.info("%s: passed over %d replayed messages of %s (at or below the stored position), held back %d "
                       "(before its positions were read)", stage, admitted.replayed, topic, admitted.held)
        consumer = self.app.consumer
        seek = getattr(consumer, "seek_owned", consumer.seek)  # PositionedConsumer drops what it fetched before
        for partition, offset in admitted.rewind.items():
            await seek(TP(topic, partition), offset)
        return admitted.messages

    async def publish_messages(self, topic: faust.TopicT, messages_by_partition: dict[int, list[bytes]]) -> list[Any]:
        """Hand whole messages to the producer; returns their delivery futures (await them before the batch ends)."""
        return [await topic.send(value=message, partition=partition, force=True)
                for partition, messages in messages_by_partition.items() for message in messages]

    async def publish(self, topic: faust.TopicT, lines_by_partition: dict[int, list[bytes]]) -> list[Any]:
        """Hand batch messages to the producer; returns their delivery futures (await them before the batch ends)."""
        pending = []
        for partition, lines in lines_by_partition.items():
            for chunk in pack_ndjson(lines, OUTPUT_MESSAGE_BYTES):
                pending.append(await topic.send(value=chunk, partition=partition, force=True))
        return pending
