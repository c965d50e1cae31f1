"""`tally tail TOPIC`: any tally topic as JSON lines, for humans and scripts, whatever its wire format.

NDJSON messages (usage events, logical requests, dead letters, alerts, budget states, watermark messages) are
printed line by line as they are. Arrow messages (llm.cost.attempts.v1 from the process role, see
streams.sink_columns) are printed one priced attempt per line, as the NDJSON hand-off would have carried it
(money as exact decimal strings, times in RFC 3339). A message that is neither is printed as one JSON object naming
its offset and why it could not be read, with its bytes in base64.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import orjson
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from ops.kafka_admin import partitions_of
from streams.records import encode_row
from streams.sink_columns import Refused, decode_attempt_message, is_arrow, table_rows
from tally.errors import TallyError
from tally.kafka_auth import KafkaAuth, rdkafka_conf


def message_lines(value: bytes | None) -> list[bytes]:
    """One message's content as JSON lines; Refused for an Arrow message that is not a table of attempts."""
    if not value:
        return []
    if is_arrow(value):
        table = decode_attempt_message(value)
        return [encode_row(row) for row in table_rows(table, plain=True)]
    return [line for line in value.split(b"\n") if line.strip()]


def unreadable(partition: int, offset: int, value: bytes, why: str) -> bytes:
    """The JSON line printed for a message that cannot be read: where it is, why, and its bytes."""
    return orjson.dumps({"tail_error": why, "partition": partition, "offset": offset,
                         "value_b64": base64.b64encode(value).decode("ascii")})


def tail(bootstrap: str | KafkaAuth, topic: str, messages: int, follow: bool, write: Callable[[bytes], None],
         partitions: list[int] | None = None, idle_s: float = 2.0) -> int:
    """Print the last `messages` messages of each partition (all with messages = 0) as JSON lines; returns lines.

    Without `follow` it stops once every partition is read up to the end it had when the command started; with it,
    it goes on printing new messages until interrupted.
    """
    consumer = Consumer(rdkafka_conf(bootstrap, {"group.id": "tally-tail", "enable.auto.commit": False,
                                                 "enable.partition.eof": True, "socket.timeout.ms": 10000}))
    written = 0
    try:
        chosen = partitions if partitions is not None else partitions_of(bootstrap, topic)
        ends: dict[int, int] = {}
        starts = []
        for p in chosen:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
            start = low if messages <= 0 else max(low, high - messages)
            if high > start or follow:
                starts.append(TopicPartition(topic, p, start if high > start else OFFSET_END))
        pending = {tp.partition for tp in starts if ends[tp.partition] > tp.offset >= 0}
        if not starts:
            return 0
        consumer.assign(starts)
        for line in _lines(consumer, pending, ends, follow, idle_s):
            write(line)
            written += 1
    except KafkaException as exc:
        raise TallyError(f"cannot read {topic} from Kafka at {bootstrap}: {exc}") from exc
    finally:
        consumer.close()
    return written


def _lines(consumer: Consumer, pending: set[int], ends: dict[int, int], follow: bool,
           idle_s: float) -> Iterator[bytes]:
    while follow or pending:
        msg = consumer.poll(idle_s)
        if msg is None:
            continue
        err = msg.error()
        p, offset = msg.partition() or 0, msg.offset() or 0
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                pending.discard(p)
                continue
            raise KafkaException(err)
        if not follow and offset >= ends[p]:
            pending.discard(p)
            continue
        value = msg.value()
        try:
            yield from message_lines(value)
        except Refused as exc:
            yield unreadable(p, offset, value or b"", str(exc))
        if not follow and offset + 1 >= ends[p]:
            pending.discard(p)
