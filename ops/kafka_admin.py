"""Read-only Kafka bookkeeping for operators: end offsets, committed offsets, lag."""

from __future__ import annotations

import time
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaException, TopicPartition

from tally.errors import TallyError
from tally.kafka_auth import KafkaAuth, metadata, rdkafka_conf, watched


def _consumer(bootstrap: str | KafkaAuth, group: str = "tally-ops-readonly") -> Consumer:
    return Consumer(rdkafka_conf(bootstrap, {"group.id": group, "enable.auto.commit": False,
                                             "socket.timeout.ms": 10000, "session.timeout.ms": 10000}))


def partitions_of(bootstrap: str | KafkaAuth, topic: str, timeout: float = 10.0) -> list[int]:
    """The partition numbers of a topic; TallyError if it does not exist, KafkaRefused on wrong credentials."""
    conf, errors = watched(bootstrap, {"group.id": "tally-ops-readonly", "enable.auto.commit": False,
                                       "socket.timeout.ms": 10000})
    c = Consumer(conf)
    try:
        md = metadata(c, errors, bootstrap, timeout, topic)
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            raise TallyError(f"topic {topic} does not exist on {bootstrap}")
        return sorted(t.partitions)
    except KafkaException as exc:
        raise TallyError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    finally:
        c.close()


def end_offsets(bootstrap: str | KafkaAuth, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """High watermark per partition (the offset the next message will get)."""
    c = _consumer(bootstrap)
    try:
        out: dict[int, int] = {}
        for p in partitions_of(bootstrap, topic, timeout):
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            out[p] = high
        return out
    finally:
        c.close()


class GroupOffsets:
    """Reads one consumer group's committed offsets, over one connection for as long as it is open."""

    def __init__(self, bootstrap: str | KafkaAuth, group: str) -> None:
        self._consumer = _consumer(bootstrap, group)

    def committed(self, topic: str, partitions: Sequence[int], timeout: float = 10.0) -> dict[int, int]:
        """The committed offset per partition (-1 where the group has committed nothing)."""
        got = self._consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
        return {tp.partition: (tp.offset if tp.offset >= 0 else -1) for tp in got}

    def close(self) -> None:
        self._consumer.close()


def committed_offsets(bootstrap: str | KafkaAuth, group: str, topic: str, partitions: Sequence[int],
                      timeout: float = 10.0) -> dict[int, int]:
    """A consumer group's committed offset per partition (-1 where it has committed nothing); one-off."""
    reader = GroupOffsets(bootstrap, group)
    try:
        return reader.committed(topic, partitions, timeout)
    finally:
        reader.close()


def covered(ends: dict[int, int], committed: dict[int, int]) -> bool:
    """True when every partition's committed offset has reached the given end offset."""
    return all(end == 0 or committed.get(p, -1) >= end for p, end in ends.items())


def lag(ends: dict[int, int], committed: dict[int, int]) -> int:
    """Messages not yet committed, summed over partitions."""
    return sum(max(0, end - max(committed.get(p, -1), 0)) for p, end in ends.items())


def latest_positions(bootstrap: str | KafkaAuth, changelog: str, window: int = 2000,
                     timeout: float = 30.0) -> dict[int, int]:
    """Input partition → last offset, from the newest position entry on each partition of a state changelog.

    The process role writes a position entry on the changelog partition of each input partition it covers after
    every batch, so the newest one is near the end: each partition is read backwards in windows of `window`
    messages until one is found. Partitions without any are absent.
    """
    from streams.positions import decode_offset, is_position_key, position_partition

    c = _consumer(bootstrap)
    out: dict[int, int] = {}
    try:
        deadline = time.monotonic() + timeout
        for p in partitions_of(bootstrap, changelog, timeout):
            low, high = c.get_watermark_offsets(TopicPartition(changelog, p), timeout=timeout)
            stop = high
            while stop > low and p not in out:
                start = max(low, stop - window)
                c.assign([TopicPartition(changelog, p, start)])
                offset = start
                while offset < stop:
                    if time.monotonic() > deadline:
                        raise TallyError(f"could not read {changelog}[{p}] within {timeout:.0f}s")
                    msg = c.poll(0.5)
                    if msg is None or msg.error() is not None:
                        continue
                    at = msg.offset() or 0
                    offset = at + 1
                    key, value = msg.key() or b"", msg.value()
                    if at < stop and is_position_key(key) and value:
                        out[position_partition(key)] = decode_offset(value)
                stop = start
        return out
    except KafkaException as exc:
        raise TallyError(f"cannot read {changelog} from {bootstrap}: {exc}") from exc
    finally:
        c.close()
