from datetime import timedelta
from decimal import Decimal

import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from streams.pieces import insert_token
from streams.pipeline import process_messages
from streams.records import Source
from streams.sink import SinkWriter, decode_rows
from streams.validate import Validator
from tally.config import load_settings
from tally.errors import StoreError, StoreLockedError
from tally.reference import snapshot_of
from tally.store import Store, string_array
from tests.factories import in_message

pytestmark = pytest.mark.integration


def priced_rows(docs, now, n=300, seed=5):
    """N simulated events from an hour before `now`, priced and ingested at `now` (inside the dedup window)."""
    gen = TrafficGenerator(catalog_from_reference(docs), seed=seed, bad_rate=0.0, start=now - timedelta(hours=1))
    msg = b"\n".join(gen.lines(n))
    out = process_messages([(msg, Source("llm.usage.v1", 0, 7))], Validator(), snapshot_of(docs), None, now)
    rows = []
    for lines in out.attempts.values():
        got, bad = decode_rows(b"\n".join(lines), Source("llm.cost.attempts.v1", 0, 1))
        assert not bad
        rows.extend(got)
    return rows


def totals(store):
    r = store.query("SELECT count(), uniqExact(event_id), sum(cost_total_usd) FROM {db}.usage_events").rows[0]
    return r[0], r[1], r[2]


def test_migrations_are_idempotent(store):
    assert store.migrate() == []
    names = {r[0] for r in store.query("SELECT name FROM system.tables WHERE database = 'tally'").rows}
    assert {"usage_events", "event_ids", "event_ids_mv", "schema_migrations"} <= names


def test_a_journal_partition_is_dropped_once_every_plan_in_it_is_complete(store, now):
    attempts, requests = "llm.cost.attempts.v1", "llm.cost.requests.v1"
    store.journal_plan("p1", [f"{attempts}[0]@5", f"{attempts}[1]@0"], "pieces of p1")
    store.journal_plan("p2", [f"{requests}[2]@7"], "pieces of p2")
    store.journal_plan("p3", [f"{requests}[3]@0"], "pieces of p3")  # offset 0 of a partition with no position
    later = now + timedelta(days=2)  # every partition written so far has ended by then, whatever the wall clock
    assert store.drop_completed_journal("sink", later) == []  # no position stored: both plans may be replayed
    assert store.drop_completed_journal("sink") == []  # by default only partitions ended 20 minutes ago count
    store.record_offsets("sink", attempts, {0: 5, 1: 0})
    store.record_offsets("other-group", requests, {2: 7})  # another consumer's position says nothing of this one
    assert store.drop_completed_journal("sink", later) == []  # p2's message is not stored yet
    assert store.journaled_plans([f"{requests}[2]@7"])[1] == {"p2": "pieces of p2"}
    store.record_offsets("sink", requests, {2: 9})
    assert store.drop_completed_journal("sink", later) == []  # p3: nothing of partition 3 is stored
    store.record_offsets("sink", requests, {3: 0})
    dropped = store.drop_completed_journal("sink", later)
    assert len(dropped) >= 1
    assert store.journaled_plans([f"{attempts}[0]@5", f"{requests}[2]@7"]) == ({}, {})


def test_lookups_read_their_ids_in_binary_and_find_what_the_literal_finds(store, now):
    odd = ["ev-plain", "ev-'quoted'", "ev-{brace}", "ev-back\\slash", "ev-tab\tnew\nline", "ev-ünï"]
    store.insert_columns("event_ids", [odd[:4], [now] * 4, ["h"] * 4, ["o"] * 4],
                         ("event_id", "ingested_at", "content_hash", "origin"), "t:odd")
    asked = [*odd, "ev-absent"]
    assert set(store.saved_events(asked)) == set(odd[:4])
    assert store.id_set([]) == "(SELECT id FROM lookup_ids)" and store.saved_events([]) == {}
    literal = store.query(f"SELECT event_id FROM {{db}}.event_ids WHERE event_id IN (SELECT arrayJoin("
                          f"{string_array(asked)}))", lookup=True).rows
    assert sorted(r[0] for r in literal) == sorted(odd[:4])
    lane = store.lane()  # another connection: its own table, untouched by this one's lookups
    assert lane.saved_events(["ev-plain"]) == {"ev-plain": ("h", "o")}
    assert set(store.saved_events(asked)) == set(odd[:4])
    assert lane.query("SELECT id FROM lookup_ids").rows == [("ev-plain",)]


def test_writer_inserts_each_event_once_whatever_is_replayed(store, docs, now):
    rows = priced_rows(docs, now)
    expected = sum((r["cost_total_usd"] for r in rows), Decimal(0))
    w = SinkWriter(store)
    assert w.write(rows + rows[:40]) == len(rows)  # in-batch duplicates collapse
    assert w.stats.duplicates_in_batch == 40
    assert w.write(rows) == 0 and w.stats.resent == len(rows)  # its message replayed: the journaled pieces re-sent
    copies = in_message([dict(r) for r in rows[100:]], Source("llm.cost.attempts.v1", 0, 2))
    assert w.write(copies) == 0  # the same events published again in a later message: already saved
    assert w.stats.already_saved == len(rows) - 100
    count, unique, total = totals(store)
    assert count == unique == len(rows)
    assert total == expected


def test_same_insert_token_is_absorbed_by_clickhouse(store, docs, now):
    from streams.records import ATTEMPT_COLUMNS

    rows = priced_rows(docs, now, 50)
    cols = [[r[c] for r in rows] for c in ATTEMPT_COLUMNS]
    token = insert_token("usage_events", (r["event_id"] for r in rows))
    store.insert_columns("usage_events", cols, ATTEMPT_COLUMNS, token)
    store.insert_columns("usage_events", cols, ATTEMPT_COLUMNS, token)  # a retry after a timeout
    assert totals(store)[0] == len(rows)
    ids = store.query("SELECT count() FROM {db}.event_ids").rows[0][0]
    assert ids == len(rows)  # the view target deduplicated too


def test_the_same_token_is_absorbed_whatever_chunks_the_table_arrives_in(store, docs, now):
    """ClickHouse's block id depends on the token and the insert's chunks: Store.insert_arrow sends one batch."""
    import pyarrow as pa

    from streams.sink_columns import SINK_SCHEMA, rows_table

    rows = [{**r, "content_hash": "h"} for r in priced_rows(docs, now, 60)]
    whole = rows_table(rows, SINK_SCHEMA)
    pieces = pa.concat_tables([whole.slice(0, 20), whole.slice(20, 25), whole.slice(45)])
    assert whole.column(0).num_chunks == 1 and pieces.column(0).num_chunks == 3
    token = insert_token("usage_events", (r["event_id"] for r in rows))
    store.insert_arrow("usage_events", pieces, token)
    store.insert_arrow("usage_events", whole, token)  # the replay, chunked otherwise
    assert totals(store)[0] == len(rows)
    assert store.query("SELECT sum(attempts) FROM {db}.rollup_minute").rows[0][0] == len(rows)


def test_money_is_exact_in_clickhouse(store, docs, now):
    rows = priced_rows(docs, now, 200)
    SinkWriter(store).write(rows)
    by_id = {r["event_id"]: r for r in rows}
    got = store.query("SELECT event_id, cost_input_usd, cost_output_usd, cost_reasoning_usd, cost_cache_read_usd, "
                      "cost_cache_write_usd, cost_tools_usd, cost_total_usd FROM {db}.usage_events").rows
    for eid, *costs in got:
        r = by_id[eid]
        assert costs == [r["cost_input_usd"], r["cost_output_usd"], r["cost_reasoning_usd"],
                         r["cost_cache_read_usd"], r["cost_cache_write_usd"], r["cost_tools_usd"],
                         r["cost_total_usd"]]
        assert all(isinstance(c, Decimal) for c in costs)


def test_second_process_gets_a_clear_error(tmp_path):
    s = load_settings(env={}, data_dir=tmp_path)
    with Store(s) as first:
        first.migrate()
        with pytest.raises(StoreLockedError, match="in use by process"):
            Store(s).client  # noqa: B018


def test_query_is_read_only(store):
    with pytest.raises(StoreError, match="readonly"):
        store.query("INSERT INTO {db}.event_ids VALUES ('x', now64(3))")
    with pytest.raises(StoreError):
        store.query("DROP TABLE {db}.usage_events")


def test_an_injected_outage_fails_every_call_until_lifted_and_the_sink_lands_each_row_once(tmp_path, docs, now):
    """The fault suite's ClickHouse outage: armed by a flag file, every store call fails as an unreachable server's
    would; the sink's retry carries the batch over the outage and each row lands once."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from streams.sink import write_with_retry

    flag = tmp_path / "outage"
    store = Store(load_settings(env={}, data_dir=tmp_path / "db", store_outage_flag=str(flag)))
    try:
        store.migrate()
        rows = priced_rows(docs, now, 200)
        flag.touch()
        with pytest.raises(StoreError, match="injected outage"):
            store.query("SELECT 1")
        with pytest.raises(StoreError, match="injected outage"):
            store.record_offsets("sink", "attempts", {0: 5})
        lifted = threading.Timer(1.5, flag.unlink)
        lifted.start()
        with ThreadPoolExecutor(max_workers=1) as ex:
            writer = SinkWriter(store)
            written = asyncio.run(write_with_retry(writer, rows, ex, retry_for_s=30))
        lifted.join()
        assert written.inserted == len(rows) and writer.stats.retries >= 1
        count, unique, total = totals(store)
        assert count == unique == len(rows)
        assert total == sum((r["cost_total_usd"] for r in rows), Decimal(0))
    finally:
        store.close()


def test_a_string_array_literal_reads_back_every_value_as_it_was(store):
    """Ids written into a lookup's text come back byte for byte, whatever they hold (quotes, braces, escapes)."""
    odd = ["plain-id_1.2:3", "it's", "back\\slash", "{db}", "{ids:Array(String)}", "%(x)s %s", "new\nline",
           "tab\there", "nul\0byte", "ünïcødé ✓", "", "'; DROP TABLE x; --", "\\'"]
    for values in (odd, ["only-plain", "ids"], []):
        rows = store.query(f"SELECT arrayJoin({string_array(values)}) AS v").rows
        assert [r[0] for r in rows] == values
    saved = store.saved_events(odd)
    assert saved == {}
