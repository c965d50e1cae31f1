"""Routing lines to partitions, packing NDJSON messages, and the Publisher's buffering (fake producer)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tally.sdk.publisher as publisher_module
from tally.errors import PublishError
from tally.partitioning import partition_for, partition_for_bytes
from tally.sdk.batching import pack_ndjson, partition_of_line, route_event, route_line, strip_line
from tally.sdk.publisher import Publisher

# ---------------------------------------------------------------- partition_of_line / route_line


def _line(**fields: Any) -> bytes:
    return orjson.dumps({"schema_version": 1, "event_id": "e", **fields})


@pytest.mark.parametrize("partitions", [1, 4, 7, 64])
def test_line_routes_by_request_id(partitions: int) -> None:
    line = _line(request_id="req-42")
    assert partition_of_line(line, partitions) == partition_for("req-42", partitions)
    assert route_line(line, partitions) == (partition_for("req-42", partitions), "req-42")


def test_line_routes_by_parent_request_id_first() -> None:
    line = _line(request_id="attempt-2", parent_request_id="logical-1")
    assert route_line(line, 16) == (partition_for("logical-1", 16), "logical-1")


@pytest.mark.parametrize("parent", [None, ""])
def test_null_or_empty_parent_falls_back_to_request_id(parent: str | None) -> None:
    line = _line(request_id="r-7", parent_request_id=parent)
    assert route_line(line, 16) == (partition_for("r-7", 16), "r-7")


@pytest.mark.parametrize("line", [
    b"not json at all",
    b'{"request_id": "unterminated',
    b"[1, 2, 3]",
    b'"just a string"',
    b"42",
    b"{}",
    b'{"request_id": ""}',
    b'{"request_id": 17}',
    b'{"parent_request_id": ["x"]}',
    b"\xff\xfe\x00",
])
def test_unroutable_lines_go_to_a_deterministic_partition(line: bytes) -> None:
    assert route_line(line, 12) == (partition_for_bytes(line, 12), None)
    assert partition_of_line(line, 12) == partition_of_line(line, 12)


def test_route_event_matches_route_line() -> None:
    event = {"request_id": "a", "parent_request_id": "b"}
    line = orjson.dumps(event)
    assert route_event(event, line, 8) == route_line(line, 8)


def test_unroutable_lines_spread_over_partitions() -> None:
    seen = {partition_of_line(f"garbage {i}".encode(), 4) for i in range(64)}
    assert seen == {0, 1, 2, 3}


@given(st.text(min_size=1, max_size=40), st.integers(1, 256))
def test_any_request_id_routes_like_partition_for(request_id: str, partitions: int) -> None:
    assert partition_of_line(orjson.dumps({"request_id": request_id}), partitions) == partition_for(
        request_id, partitions)


# ---------------------------------------------------------------- strip_line


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"a":1}\n', b'{"a":1}'),
    (b'{"a":1}\r\n', b'{"a":1}'),
    (b'{"a":1}', b'{"a":1}'),
    (b"\n", b""),
    (b"x\r", b"x\r"),  # a lone CR is content, not a terminator
])
def test_strip_line(raw: bytes, expected: bytes) -> None:
    assert strip_line(raw) == expected


@pytest.mark.parametrize("raw", [b"a\nb", b"a\n\n", b"\na"])
def test_inner_newline_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="newline"):
        strip_line(raw)


# ---------------------------------------------------------------- pack_ndjson


def test_pack_joins_lines_up_to_the_limit() -> None:
    lines = [b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10]
    assert list(pack_ndjson(lines, 21)) == [b"a" * 10 + b"\n" + b"b" * 10, b"c" * 10 + b"\n" + b"d" * 10]
    assert list(pack_ndjson(lines, 20)) == lines
    assert list(pack_ndjson(lines, 1000)) == [b"\n".join(lines)]


def test_pack_sends_an_oversized_line_alone_and_unchanged() -> None:
    big = b"x" * 50
    assert list(pack_ndjson([b"a", big, b"b", b"c"], 10)) == [b"a", big, b"b\nc"]


def test_pack_strips_terminators_and_skips_blank_lines() -> None:
    assert list(pack_ndjson([b"a\n", b"\n", b"  \r\n", b"b\r\n", b""], 100)) == [b"a\nb"]


def test_pack_of_nothing_is_nothing() -> None:
    assert list(pack_ndjson([], 10)) == []
    assert list(pack_ndjson([b"\n", b"\r\n"], 10)) == []


def test_pack_refuses_inner_newlines_and_bad_limits() -> None:
    with pytest.raises(ValueError, match="newline"):
        list(pack_ndjson([b"a\nb"], 10))
    with pytest.raises(ValueError, match="max_bytes"):
        list(pack_ndjson([b"a"], 0))


ndjson_lines = st.lists(
    st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b and b.strip() != b""), max_size=60)


@given(ndjson_lines, st.integers(1, 400), st.sampled_from([b"", b"\n", b"\r\n"]))
def test_pack_roundtrip_and_limits(lines: list[bytes], max_bytes: int, terminator: bytes) -> None:
    # A line ending in CR followed by a CRLF terminator would lose its CR: keep lines without a trailing CR.
    lines = [line.rstrip(b"\r") or b"x" for line in lines]
    messages = list(pack_ndjson([line + terminator for line in lines], max_bytes))
    assert [part for m in messages for part in m.split(b"\n")] == lines
    for m in messages:
        assert len(m) <= max_bytes or b"\n" not in m
    # Greedy: no message could have taken the first line of the next one.
    for current, following in zip(messages, messages[1:], strict=False):
        assert len(current) + 1 + len(following.split(b"\n")[0]) > max_bytes


# ---------------------------------------------------------------- Publisher, with a fake producer


class FakeMessage:
    def __init__(self, topic: str, partition: int) -> None:
        self._topic, self._partition = topic, partition

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition


class FakeError:
    def str(self) -> str:
        return "Local: Message timed out"


class FakeProducer:
    """Records produce() calls; delivery reports are served by poll()/flush(), failing when told to."""

    instances: list[FakeProducer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.produced: list[dict[str, Any]] = []
        self.pending: list[tuple[Callable[..., None], FakeMessage]] = []
        self.fail_deliveries = False
        self.queue_full_for = 0
        FakeProducer.instances.append(self)

    def produce(self, topic: str, *, value: bytes, key: str | None, partition: int,
                on_delivery: Callable[..., None]) -> None:
        if self.queue_full_for:
            self.queue_full_for -= 1
            raise BufferError("Local: Queue full")
        self.produced.append({"topic": topic, "value": value, "key": key, "partition": partition})
        self.pending.append((on_delivery, FakeMessage(topic, partition)))

    def poll(self, timeout: float = 0) -> int:
        served, self.pending = self.pending, []
        for callback, msg in served:
            callback(FakeError() if self.fail_deliveries else None, msg)
        return len(served)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    FakeProducer.instances = []
    monkeypatch.setattr(publisher_module, "Producer", FakeProducer)
    return FakeProducer


def _event(request_id: str, parent: str | None = None, pad: int = 0) -> dict[str, Any]:
    event: dict[str, Any] = {"schema_version": 1, "event_id": f"e-{request_id}", "request_id": request_id,
                             "tags": {"pad": "x" * pad}}
    if parent is not None:
        event["parent_request_id"] = parent
    return event


def test_publisher_config(fake_producer: type[FakeProducer]) -> None:
    Publisher("h:9092", "t", partitions=4, linger_ms=7, extra_config={"client.id": "gw"})
    config = fake_producer.instances[0].config
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["compression.type"] == "lz4"
    assert config["linger.ms"] == 7
    assert config["partitioner"] == "murmur2_random"
    assert config["client.id"] == "gw"


def test_publisher_groups_by_partition_and_keys_single_event_messages(fake_producer: type[FakeProducer]
                                                                      ) -> None:
    with Publisher("h:9092", "t", partitions=4) as pub:
        for i in range(40):
            pub.publish(_event(f"attempt-{i}", parent=f"logical-{i % 5}"))
        pub.publish(_event("alone"))
        # Nothing sent before the buffers are full or flushed.
        assert fake_producer.instances[0].produced == []
        assert pub.stats.buffered_events == 41
    produced = fake_producer.instances[0].produced
    events = 0
    for m in produced:
        lines = m["value"].split(b"\n")
        events += len(lines)
        for line in lines:
            assert partition_of_line(line, 4) == m["partition"]
        if len(lines) == 1:
            assert m["key"] == route_line(lines[0], 4)[1]
        else:
            assert m["key"] is None
    assert events == 41
    assert pub.stats.delivered_events == 41
    assert pub.stats.delivered_messages == len(produced)
    assert pub.stats.buffered_events == 0


def test_publisher_keeps_order_within_a_partition(fake_producer: type[FakeProducer]) -> None:
    with Publisher("h:9092", "t", partitions=1, max_message_events=7) as pub:
        for i in range(30):
            pub.publish(_event(f"r{i}"))
    ids = [orjson.loads(line)["request_id"] for m in fake_producer.instances[0].produced
           for line in m["value"].split(b"\n")]
    assert ids == [f"r{i}" for i in range(30)]
    assert [len(m["value"].split(b"\n")) for m in fake_producer.instances[0].produced] == [7, 7, 7, 7, 2]


def test_publisher_respects_max_message_bytes(fake_producer: type[FakeProducer]) -> None:
    with Publisher("h:9092", "t", partitions=1, max_message_bytes=1000) as pub:
        for i in range(50):
            pub.publish(_event(f"r{i}", pad=100))
        pub.publish(_event("huge", pad=5000))
        pub.publish(_event("after"))
    produced = fake_producer.instances[0].produced
    sizes = [len(m["value"]) for m in produced]
    assert all(size <= 1000 for size, m in zip(sizes, produced, strict=True) if b"huge" not in m["value"])
    huge = next(m for m in produced if b"huge" in m["value"])
    assert b"\n" not in huge["value"] and huge["key"] == "huge"
    assert sum(len(m["value"].split(b"\n")) for m in produced) == 52


def test_publish_line_passes_bytes_unchanged(fake_producer: type[FakeProducer]) -> None:
    raw = b'{"request_id":"r1","weird":  [1, 2]}'
    with Publisher("h:9092", "t", partitions=3) as pub:
        pub.publish_line(raw + b"\r\n")
        pub.publish_line(b"\n")  # blank: ignored
        pub.publish_line(b"not json")
    produced = fake_producer.instances[0].produced
    sent = {line: m["partition"] for m in produced for line in m["value"].split(b"\n")}
    assert sent == {raw: partition_for("r1", 3), b"not json": partition_for_bytes(b"not json", 3)}
    with pytest.raises(ValueError, match="newline"):
        Publisher("h:9092", "t", partitions=3).publish_line(b"a\nb")


def test_delivery_failure_is_raised_on_flush_not_dropped(fake_producer: type[FakeProducer]) -> None:
    pub = Publisher("h:9092", "t", partitions=2)
    fake_producer.instances[0].fail_deliveries = True
    pub.publish(_event("r1"))
    with pytest.raises(PublishError, match=r"1 message\(s\) were not delivered: t\[\d\]: 1 events: Local: "):
        pub.flush()
    assert pub.stats.failed_events == 1
    assert pub.stats.delivered_events == 0
    pub.flush()  # reported once; nothing new failed


def test_delivery_failure_is_raised_on_the_next_publish(fake_producer: type[FakeProducer]) -> None:
    pub = Publisher("h:9092", "t", partitions=1, max_message_events=1)
    fake_producer.instances[0].fail_deliveries = True
    pub.publish(_event("r1"))  # sent at once (1 event per message); the fake reports on the next poll
    fake_producer.instances[0].poll()
    with pytest.raises(PublishError, match="not delivered"):
        pub.publish(_event("r2"))


def test_close_raises_delivery_failures_and_refuses_more(fake_producer: type[FakeProducer]) -> None:
    pub = Publisher("h:9092", "t", partitions=1)
    fake_producer.instances[0].fail_deliveries = True
    pub.publish(_event("r1"))
    with pytest.raises(PublishError, match="not delivered"):
        pub.close()
    with pytest.raises(PublishError, match="closed"):
        pub.publish(_event("r2"))


def test_queue_full_is_retried_then_bounded(fake_producer: type[FakeProducer]) -> None:
    pub = Publisher("h:9092", "t", partitions=1, max_message_events=1, queue_full_timeout_s=5)
    fake_producer.instances[0].queue_full_for = 3
    pub.publish(_event("r1"))
    assert len(fake_producer.instances[0].produced) == 1
    pub = Publisher("h:9092", "t", partitions=1, max_message_events=1, queue_full_timeout_s=0.1)
    fake_producer.instances[1].queue_full_for = 10**9
    with pytest.raises(PublishError, match="queue stayed full"):
        pub.publish(_event("r2"))
    assert pub.stats.failed_events == 1


def test_old_buffers_are_sent_on_the_next_publish(fake_producer: type[FakeProducer],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(publisher_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    pub = Publisher("h:9092", "t", partitions=4, max_buffer_ms=200)
    pub.publish(_event("r1"))
    now[0] += 0.1
    pub.publish(_event("r2"))
    assert fake_producer.instances[0].produced == []
    now[0] += 0.15
    pub.publish(_event("r3"))
    assert sum(len(m["value"].split(b"\n")) for m in fake_producer.instances[0].produced) == 3
    assert pub.stats.buffered_events == 0


def test_bad_event_still_published(fake_producer: type[FakeProducer]) -> None:
    with Publisher("h:9092", "t", partitions=8) as pub:
        pub.publish({"no": "ids"})
    (m,) = fake_producer.instances[0].produced
    assert m["key"] is None
    assert m["partition"] == partition_for_bytes(m["value"], 8)


# ---------------------------------------------------------------- line_runs (a worker's batch, bounded in lines)


def _message(lines: int, offset: int, partition: int = 0) -> tuple[bytes | None, Any]:
    from streams.records import Source

    return b"\n".join(b'{"n":%d}' % i for i in range(lines)), Source("llm.usage.v1", partition, offset)


def test_line_runs_bound_lines_and_never_split_a_message() -> None:
    from streams.roles.context import line_runs

    batch = [_message(n, i) for i, n in enumerate([4, 3, 5, 1, 12, 2])]
    runs = line_runs(batch, 8)
    assert [[src.offset for _, src in run] for run in runs] == [[0, 1], [2, 3], [4], [5]]
    assert [m for run in runs for m in run] == batch  # every message once, in order
    assert line_runs([], 8) == []
    assert line_runs([(None, batch[0][1])], 8) == [[(None, batch[0][1])]]  # a tombstone counts as one line


@given(st.lists(st.integers(1, 30), max_size=40), st.integers(1, 50))
def test_line_runs_keep_order_and_bound(sizes: list[int], limit: int) -> None:
    from streams.roles.context import line_runs

    batch = [_message(n, i, partition=i % 3) for i, n in enumerate(sizes)]
    runs = line_runs(batch, limit)
    assert [m for run in runs for m in run] == batch
    for run in runs:
        lines = sum(v.count(b"\n") + 1 for v, _ in run if v)
        assert lines <= limit or len(run) == 1


def test_an_arrow_message_counts_as_its_estimated_rows() -> None:
    from streams.records import Source
    from streams.roles.context import ARROW_BYTES_PER_ROW, line_runs, lines_in

    arrow = b"\xff\xff\xff\xff" + b"\n" * (ARROW_BYTES_PER_ROW * 40 - 4)  # newlines inside binary count for nothing
    assert lines_in(arrow) == 40
    batch = [(arrow, Source("llm.cost.attempts.v1", 0, i)) for i in range(5)]
    assert [len(r) for r in line_runs(batch, 100)] == [2, 2, 1]


# ---------------------------------------------------------------- gathered (takes joined into larger batches)


async def _takes(plan: list[tuple[float, list[int]]]):  # type: ignore[no-untyped-def]
    """A stand-in for stream.take_events: after each delay, a take of messages (each an int: its lines)."""
    import asyncio

    for delay, take in plan:
        await asyncio.sleep(delay)
        yield take


def _gather(plan: list[tuple[float, list[int]]], max_lines: int, within_s: float) -> list[list[int]]:
    import asyncio

    from streams.roles.context import gathered

    async def run() -> list[list[int]]:
        return [b async for b in gathered(_takes(plan), max_lines, within_s, lambda n: n)]

    return asyncio.run(run())


def test_quick_takes_are_gathered_up_to_the_line_bound() -> None:
    plan = [(0.0, [1] * 100)] * 5  # five takes of 100 one-line messages, back to back
    assert [len(b) for b in _gather(plan, max_lines=250, within_s=5.0)] == [300, 200]  # bound reached, then the end


def test_a_gathered_batch_never_waits_past_its_time_for_data_that_is_not_there() -> None:
    import time

    plan = [(0.0, [1, 1]), (0.0, [1]), (0.6, [1, 1, 1])]  # the third take comes long after
    started = time.monotonic()
    got = _gather(plan, max_lines=10_000, within_s=0.1)
    assert got == [[1, 1, 1], [1, 1, 1]]  # the first two gathered, yielded once 0.1 s passed; the late one alone
    assert time.monotonic() - started < 2.0


def test_a_large_take_is_yielded_at_once_and_order_is_kept() -> None:
    plan = [(0.0, [5000, 7000]), (0.0, [1, 2]), (0.0, [3])]
    got = _gather(plan, max_lines=10_000, within_s=5.0)
    assert got == [[5000, 7000], [1, 2, 3]]
