"""`tally tail`: a topic as JSON lines, NDJSON and Arrow attempts messages alike, against the real broker."""

from __future__ import annotations

import base64
import random
from decimal import Decimal

import orjson
import pytest
from confluent_kafka import Producer

from ops.tail import tail
from streams.records import COST_COLUMNS, encode_row
from streams.sink_columns import encode_attempt_rows
from tally.config import Settings
from tests.unit.test_sink_columns import attempt

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, values: list[tuple[int, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for partition, value in values:
        producer.produce(topic, value=value, partition=partition)
    assert producer.flush(30) == 0


def test_tail_prints_arrow_and_ndjson_messages_as_the_same_json_lines(kafka_settings: Settings) -> None:
    s = kafka_settings
    rng = random.Random(5)
    rows = [attempt(n, rng) for n in range(30)]
    for row in rows:  # DateTime64(3) and the Arrow hand-off keep milliseconds
        for c in ("ts", "ingested_at"):
            row[c] = row[c].replace(microsecond=row[c].microsecond // 1000 * 1000)
    (arrow,) = encode_attempt_rows(rows[:20], 10**6)
    ndjson = b"\n".join(encode_row(r) for r in rows[20:])
    _produce(s.kafka_bootstrap, s.topics.attempts, [(0, arrow), (0, ndjson), (1, b"\xff\xff\xff\xffnot arrow")])
    lines: list[bytes] = []
    assert tail(s.kafka_bootstrap, s.topics.attempts, 0, False, lines.append) == 31
    got = [orjson.loads(x) for x in lines]
    by_id = {r["event_id"]: r for r in got if "event_id" in r}
    assert len(by_id) == 30
    for row in rows:  # every value as the NDJSON hand-off prints it (money as exact decimal strings)
        want = orjson.loads(encode_row(row))
        mine = by_id[row["event_id"]]
        for c in ("ts", "ingested_at"):
            assert mine.pop(c)[:23] == want.pop(c)[:23]
        for c in COST_COLUMNS:
            assert Decimal(mine.pop(c)) == Decimal(want.pop(c))  # exact: compared as decimals, never floats
        assert mine == want
    (bad,) = [r for r in got if "tail_error" in r]
    assert bad["partition"] == 1 and bad["offset"] == 0
    assert base64.b64decode(bad["value_b64"]) == b"\xff\xff\xff\xffnot arrow"
    # the last message of each partition only
    lines.clear()
    assert tail(s.kafka_bootstrap, s.topics.attempts, 1, False, lines.append) == 11
    assert tail(s.kafka_bootstrap, s.topics.usage, 1, False, lines.append) == 0  # an empty topic ends at once
