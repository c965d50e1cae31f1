"""The columnar sink path into ClickHouse: the same rows, money and rollups as the row path; replays absorbed."""

import random
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from streams.records import Source
from streams.sink import ATTEMPT_ROWS, SinkWriter, decode_batch
from streams.sink_columns import ArrowPart, AttemptBatch, DictPart
from tally.config import Settings
from tally.store import Store
from tests.factories import clock
from tests.unit.test_sink_columns import attempt, message

pytestmark = pytest.mark.integration

TOPIC = "llm.cost.attempts.v1"
ROLLUP_KEY = "bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment"
ROLLUP_SUMS = ("attempts", "requests", "input_tokens", "output_tokens", "reasoning_tokens", "cache_read_tokens",
               "cache_write_tokens", "cache_write_1h_tokens", "cost_input_usd", "cost_output_usd",
               "cost_reasoning_usd", "cost_cache_read_usd", "cost_cache_write_usd", "cost_tools_usd",
               "cost_total_usd", "cost_wasted_usd", "cost_unattributed_usd")


def contents(store: Store) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]:
    """usage_events (every column), event_ids and the minute rollup's sums by key (merges change its rows)."""
    usage = store.query("SELECT * FROM {db}.usage_events ORDER BY event_id").rows
    ids = store.query("SELECT event_id, content_hash, origin FROM {db}.event_ids ORDER BY event_id").rows
    sums = ", ".join(f"toString(sum({c}))" for c in ROLLUP_SUMS)
    rollup = store.query(f"SELECT {ROLLUP_KEY}, {sums} FROM {{db}}.rollup_minute GROUP BY {ROLLUP_KEY} "
                         f"ORDER BY {ROLLUP_KEY}").rows
    return usage, ids, rollup


def test_the_columnar_path_stores_what_the_row_path_stores(tmp_path: Path):
    rng = random.Random(23)
    rows = [attempt(n, rng, days=10) for n in range(600)]  # within rollup_minute's retention (14 days)
    bad = orjson.loads(message(rows[500:501]))
    # naive (no offset): the precise path takes it, the fast path does not; two hours before the suite's clock
    bad["ts"] = (clock() - timedelta(hours=2)).replace(tzinfo=None).isoformat(timespec="seconds")
    mixed = message(rows[500:520]).replace(message(rows[500:501]), orjson.dumps(bad) + b"\n", 1)
    messages = [(message(rows[i:i + 100]), Source(TOPIC, 0, i)) for i in range(0, 500, 100)]
    messages += [(mixed, Source(TOPIC, 1, 7)), (message(rows[520:]), Source(TOPIC, 1, 8))]
    got = {}
    for columnar in (True, False):
        with Store(Settings(data_dir=tmp_path / f"columnar-{columnar}")) as store:
            store.migrate()
            batch, dead = decode_batch(messages, ATTEMPT_ROWS, columnar=columnar)
            assert not dead
            if columnar:
                assert isinstance(batch, AttemptBatch)
                assert [type(p) for p in batch.parts] == [ArrowPart] * 5 + [DictPart, ArrowPart]
            writer = SinkWriter(store)
            assert writer.write(batch) == 600
            got[columnar] = contents(store)
            again, _ = decode_batch(messages, ATTEMPT_ROWS, columnar=columnar)
            assert writer.write(again) == 0  # a replay: the journaled pieces re-sent, absorbed in every table
            assert writer.stats.resent == 600
            assert contents(store) == got[columnar]
    assert got[True] == got[False]
    usage = got[True][0]
    assert len(usage) == 600 and len({r[0] for r in usage}) == 600


def test_a_later_copy_in_columns_is_a_duplicate_or_a_conflict(store: Store):
    rng = random.Random(29)
    rows = [attempt(n, rng, days=10) for n in range(50)]
    writer = SinkWriter(store)
    assert writer.write(decode_batch([(message(rows), Source(TOPIC, 0, 1))], ATTEMPT_ROWS)[0]) == 50
    changed = dict(rows[3], payload=orjson.dumps({"event_id": rows[3]["event_id"], "other": 1}).decode())
    later = message([*rows[:10], changed])
    batch, _ = decode_batch([(later, Source(TOPIC, 0, 2))], ATTEMPT_ROWS)
    plan = writer.plan(batch)
    assert plan.pieces == [] and writer.stats.already_saved == 10
    [conflict] = plan.rejections
    assert conflict.reason == "conflicting_duplicate" and conflict.raw == changed["payload"].encode()
    assert conflict.source == Source(changed["source_topic"], changed["source_partition"], changed["source_offset"])
