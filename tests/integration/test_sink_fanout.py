"""The sink reports success only when every table its insert reaches has the rows; `verify` proves it (real chDB)."""

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from ops.verify import verify
from streams.fold import FoldConfig, Folder
from streams.pipeline import FoldStep, process_messages
from streams.records import ATTEMPT_COLUMNS, ATTEMPT_COLUMNS_ADDED, Source
from streams.sink import (
    ATTEMPT_ROWS,
    REQUEST_ROWS,
    RequestWriter,
    SinkWriter,
    content_hash,
    decode_batch,
    decode_rows,
    origin_of,
    write_with_retry,
)
from streams.sink_columns import REQUEST_SCHEMA, AttemptBatch, encode_rows
from streams.validate import Validator
from tally import store as store_module
from tally.config import load_settings
from tally.partitioning import partition_for
from tally.reference import snapshot_of
from tally.store import Store
from tests.factories import attempt_row_factory, clock, event_factory, in_message

pytestmark = pytest.mark.integration
OFFSETS = itertools.count()  # each sink input message of these tests at its own offset

NOW = clock()  # the one clock: every date below, and verify's retention windows, derive from it
GRAINS = ("minute", "hour", "day")


def retention(store):
    s = store.settings
    return {"minute": s.rollup_minute_retention_days, "hour": s.rollup_hour_retention_days,
            "day": s.rollup_day_retention_days}


def audit(store, since, until=None):
    def query(sql):
        r = store.query(sql)
        return r.columns, [list(row) for row in r.rows]

    return verify(query, since, until or NOW.date(), NOW, retention(store))


def write(writer, rows, retry_for_s=30.0):
    with ThreadPoolExecutor(1) as ex:
        return asyncio.run(write_with_retry(writer, rows, ex, retry_for_s))


def pipeline_batch(events, docs):
    """Events through validate → enrich → fold, decoded as the sinks decode them: (attempt rows, request rows)."""
    by_partition: dict[int, list[bytes]] = {}
    for e in events:
        by_partition.setdefault(partition_for(e.get("parent_request_id") or e["request_id"], 4), []).append(
            orjson.dumps(e))
    messages = [(b"\n".join(lines), Source("llm.usage.v1", p, 0)) for p, lines in by_partition.items()]
    out = process_messages(messages, Validator(), snapshot_of(docs), 4, NOW,
                           FoldStep(Folder(FoldConfig(), 4), {}, 4), 0.0)
    attempts = [r for lines in out.attempts.values()
                for r in decode_rows(b"\n".join(lines), Source("a", 0, next(OFFSETS)), ATTEMPT_ROWS)[0]]
    requests = [r for lines in out.requests.values()
                for r in decode_rows(b"\n".join(lines), Source("r", 0, next(OFFSETS)), REQUEST_ROWS)[0]]
    return attempts, requests


def grain_totals(store, grain):
    return store.query(f"SELECT sum(attempts), sum(requests), sum(cost_total_usd) FROM {{db}}.rollup_{grain}").rows[0]


def arm_failpoint(store):
    """A test-only view on rollup_minute that throws while {db}.failpoint holds a row: a view failing mid-insert,
    after usage_events, event_ids and rollup_minute took the block and before rollup_hour and rollup_day did."""
    store.command("CREATE TABLE {db}.failpoint (armed UInt8) ENGINE = Memory")
    store.command("CREATE TABLE {db}.failpoint_hits (n UInt8) ENGINE = Null")
    store.command("CREATE MATERIALIZED VIEW {db}.a_failpoint_mv TO {db}.failpoint_hits AS SELECT "
                  "throwIf((SELECT count() FROM {db}.failpoint) > 0, 'failpoint: view refused the block') AS n "
                  "FROM {db}.rollup_minute")
    store.command("INSERT INTO {db}.failpoint VALUES (1)")


def test_a_view_failure_mid_insert_is_repaired_by_resending_the_same_piece(store, docs):
    gen = TrafficGenerator(catalog_from_reference(docs), seed=31, bad_rate=0.0, start=NOW - timedelta(hours=3))
    attempts, requests = pipeline_batch([e for _ in range(300) for e in gen.logical_request()], docs)
    arm_failpoint(store)
    real_insert, seen = store.insert_arrow, []

    def insert_then_disarm(table, data, token):
        try:
            real_insert(table, data, token)
        except Exception as exc:
            # The source and event_ids took the block, a view refused it: the grains disagree now.
            ids = store.query("SELECT count() FROM {db}.event_ids").rows[0][0]
            seen.append((table, str(exc), ids - data.num_rows, [grain_totals(store, g) for g in GRAINS]))
            store.command("TRUNCATE TABLE {db}.failpoint")  # the cause goes away; the retry must fill the view
            raise

    store.insert_arrow = insert_then_disarm
    attempt_writer, request_writer = SinkWriter(store), RequestWriter(store)
    assert write(attempt_writer, attempts).inserted == len(attempts)
    store.command("INSERT INTO {db}.failpoint VALUES (1)")
    assert write(request_writer, requests).inserted == len(requests)

    assert [t for t, *_ in seen] == ["usage_events", "logical_requests"]
    table, error, ids, grains = seen[0]
    assert "failpoint" in error and ids == 0  # event_ids took the first piece: the old lookup would have found it
    assert grains[1] != grains[0] or grains[2] != grains[0]  # some grain really missed the rows
    assert attempt_writer.stats.retries == 1 and request_writer.stats.retries == 1

    result = audit(store, (NOW - timedelta(days=1)).date())
    assert result.ok, [d.describe() for d in result.differences]
    assert result.cells > 0 and set(result.windows) == {f"rollup_{g}" for g in GRAINS}
    total = sum((r["cost_total_usd"] for r in attempts), Decimal(0))
    for g in GRAINS:
        assert grain_totals(store, g) == (len(attempts), len(requests), total)


def test_a_400_day_backfill_mixed_with_live_rows_reaches_every_grain(store):
    old = [attempt_row_factory(f"backfill-{i}", final=True, cost=Decimal("0.000123456789012345") * (i + 1),
                               ts_ms=int((NOW - timedelta(days=i + 1, hours=1)).timestamp() * 1000))
           for i in range(400)]
    live = [attempt_row_factory(f"live-{i}", final=True, cost=Decimal("0.25"),
                                ts_ms=int((NOW - timedelta(hours=2, minutes=i)).timestamp() * 1000))
            for i in range(30)]
    attempts = in_message(old + live)
    for r in attempts:
        r["payload"] = orjson.dumps(event_factory(event_id=r["event_id"], request_id=r["request_id"])).decode()
    folded = Folder(FoldConfig(), 4).fold(attempts, {}, 0.0, NOW).emitted
    requests = decode_rows(b"\n".join(orjson.dumps(r, default=str) for r in folded), Source("r", 0, next(OFFSETS)),
                           REQUEST_ROWS)[0]
    assert len(requests) == 430

    attempt_writer, request_writer = SinkWriter(store), RequestWriter(store)
    assert write(attempt_writer, attempts).inserted == 430
    assert write(request_writer, requests).inserted == 430
    assert attempt_writer.stats.retries == request_writer.stats.retries == 0  # never TOO_MANY_PARTS

    days = {r["ts"].date() for r in attempts}
    assert len(days) == 401
    result = audit(store, min(days))
    assert result.ok, [d.describe() for d in result.differences[:10]]
    lo, hi = result.windows["rollup_day"]
    assert lo <= min(days) and hi >= max(days)  # the day grain is compared over the whole backfill
    got = store.query("SELECT uniqExact(toDate(bucket)), sum(attempts), sum(requests), sum(cost_total_usd) "
                      "FROM {db}.rollup_day").rows[0]
    assert got == (401, 430, 430, sum((r["cost_total_usd"] for r in attempts), Decimal(0)))


def test_verify_lists_each_difference(store, docs):
    gen = TrafficGenerator(catalog_from_reference(docs), seed=7, bad_rate=0.0, start=NOW - timedelta(hours=5))
    attempts, requests = pipeline_batch([e for _ in range(50) for e in gen.logical_request()], docs)
    SinkWriter(store).write(attempts)
    RequestWriter(store).write(requests)
    since = (NOW - timedelta(days=2)).date()
    assert audit(store, since).ok
    # A rollup row no source explains, in the day grain only (as a lost or doubled view insert would leave).
    a = attempts[0]
    store.command(f"INSERT INTO {{db}}.rollup_day (bucket, team_id, feature_id, attempts, cost_total_usd) VALUES "
                  f"(toStartOfDay(toDateTime64('{a['ts'].strftime('%Y-%m-%d %H:%M:%S')}', 3, 'UTC')), "
                  f"'{a['team_id']}', '{a['feature_id']}', 2, 1.5)")
    # An event_id stored twice in usage_events.
    store.insert_columns("usage_events", [[a[c]] for c in ATTEMPT_COLUMNS], ATTEMPT_COLUMNS, "test:twice")
    result = audit(store, since)
    found = {(d.table, d.measure, d.found - d.expected) for d in result.differences}
    # The doubled row went through the views too: every grain agrees with usage_events, only the stray row is off.
    assert found == {("usage_events", "duplicate_event_ids", 1), ("rollup_day", "attempts", 2),
                     ("rollup_day", "cost_total_usd", Decimal("1.5"))}
    assert all(d.day == a["ts"].date() and d.team_id == a["team_id"] for d in result.differences)


def test_verify_compares_a_grain_only_within_its_retention(store):
    windows = audit(store, (NOW - timedelta(days=500)).date()).windows
    assert windows["rollup_minute"][0] == (NOW - timedelta(days=retention(store)["minute"] - 1)).date()
    assert windows["rollup_hour"][0] == (NOW - timedelta(days=retention(store)["hour"] - 1)).date()
    assert windows["rollup_day"][0] == (NOW - timedelta(days=500)).date()


def conflicting_copy(row, **changes):
    event = {**orjson.loads(row["payload"]), **changes}
    return {**row, "model_actual": event.get("model_actual", row["model_actual"]), "payload":
            orjson.dumps(event).decode(), "source_offset": row["source_offset"] + 1000}


def test_a_conflicting_duplicate_is_a_dead_letter_and_an_identical_copy_is_not(store, docs):
    gen = TrafficGenerator(catalog_from_reference(docs), seed=3, bad_rate=0.0, start=NOW - timedelta(hours=1))
    attempts, _ = pipeline_batch([e for _ in range(20) for e in gen.logical_request()], docs)
    writer = SinkWriter(store)
    assert write(writer, attempts).inserted == len(attempts)
    first = attempts[0]
    other = conflicting_copy(first, model_actual="o3", usage={"input_tokens": 900_000, "output_tokens": 400_000})
    copies = [dict(first), other, conflicting_copy(attempts[1], tags={"team_id": "other"})]
    written = write(writer, in_message(copies, Source("llm.cost.attempts.v1", 0, 9)))  # published again, later
    assert written.inserted == 0 and writer.stats.already_saved == 1
    assert [(r.reason, r.event_id) for r in written.rejections] == [("conflicting_duplicate", first["event_id"]),
                                                                   ("conflicting_duplicate", attempts[1]["event_id"])]
    assert written.rejections[0].raw == other["payload"].encode()
    stored = dict(store.query("SELECT event_id, content_hash FROM {db}.event_ids").rows)
    assert stored[first["event_id"]] == first["content_hash"]
    assert first["content_hash"] in written.rejections[0].message
    assert other["content_hash"] in written.rejections[0].message
    assert store.query("SELECT count(), any(model_actual) FROM {db}.usage_events WHERE event_id = {e:String}",
                       {"e": first["event_id"]}).rows == [(1, first["model_actual"])]
    assert audit(store, (NOW - timedelta(days=1)).date()).ok


def test_migration_008_applies_on_an_existing_database(tmp_path, monkeypatch):
    real = store_module.migrations
    settings = load_settings(env={}, data_dir=tmp_path)
    old = attempt_row_factory("before-008", final=True, ts_ms=int((NOW - timedelta(hours=1)).timestamp() * 1000))
    with Store(settings) as s:
        monkeypatch.setattr(store_module, "migrations", lambda: [m for m in real() if m[0] < 8])
        s.migrate()
        before = [c for c in ATTEMPT_COLUMNS if c not in ATTEMPT_COLUMNS_ADDED]  # the columns of then
        s.insert_columns("usage_events", [[old[c]] for c in before], before, "test:old")
    monkeypatch.setattr(store_module, "migrations", real)
    with Store(settings) as s:
        assert s.migrate() == [name for n, name, _ in real() if n >= 8]  # 008 and every later one
        assert s.migrate() == []
        assert s.saved_events([old["event_id"]]) == {old["event_id"]: ("", "")}
        [copy] = in_message([{**old, "payload": orjson.dumps(event_factory()).decode()}])
        assert SinkWriter(s).plan([copy]).rejections == []  # saved without a hash: a duplicate, as before
        [new] = in_message([attempt_row_factory("after-008", final=True, ts_ms=int(old["ts"].timestamp() * 1000))])
        new["payload"] = orjson.dumps(event_factory()).decode()
        assert SinkWriter(s).write([new]) == 1
        assert s.saved_events([new["event_id"]]) == {new["event_id"]: (new["content_hash"], new["origin"])}


def test_a_replay_after_a_kill_mid_insert_fills_the_views_that_missed_the_piece_and_no_other(store, docs):
    """kill -9 during an insert: usage_events, event_ids and some rollup grains took the piece, others did not.

    A new writer (a restarted worker) replays the message in a batch composed otherwise; it re-sends the crashed
    batch's journaled pieces unchanged, so ClickHouse absorbs them where they landed and fills the grains that
    missed them, and plans the rest of its batch without the crashed message's rows.
    """
    gen = TrafficGenerator(catalog_from_reference(docs), seed=41, bad_rate=0.0, start=NOW - timedelta(hours=2))
    attempts, _ = pipeline_batch([e for _ in range(120) for e in gen.logical_request()], docs)
    topic = "llm.cost.attempts.v1"
    crashed = in_message(attempts[:80], Source(topic, 0, 10))  # the message whose insert was cut short
    before = in_message(attempts[80:100], Source(topic, 0, 9))  # saved by an earlier batch, fully
    after = in_message(attempts[100:], Source(topic, 0, 11))  # read with the crashed message in its replay only
    assert write(SinkWriter(store), before).inserted == len(before)
    arm_failpoint(store)
    with pytest.raises(Exception, match="failpoint"):
        SinkWriter(store).write([dict(r) for r in crashed])  # this worker is killed now
    store.command("TRUNCATE TABLE {db}.failpoint")
    ids = {r[0] for r in store.query("SELECT event_id FROM {db}.event_ids").rows}
    assert {r["event_id"] for r in crashed} <= ids  # the lookup finds the crashed message's rows saved
    missed = [g for g in GRAINS if grain_totals(store, g)[0] == len(before)]
    assert missed and len(missed) < len(GRAINS)  # some grains took the piece, some never got it

    writer = SinkWriter(store)  # the restarted worker, another batch: the crashed message and the next one
    copy = {**before[0], "origin": crashed[0]["origin"]}  # a row of `before` repeated in the crashed message
    written = write(writer, [dict(r) for r in (*crashed, copy, *after)])
    assert written.inserted == len(after) and written.resent == len(crashed) and written.rejections == []
    assert writer.stats.resent == len(crashed) and writer.stats.already_saved == 1
    count, unique = store.query("SELECT count(), uniqExact(event_id) FROM {db}.usage_events").rows[0]
    assert count == unique == len(attempts)
    result = audit(store, (NOW - timedelta(days=1)).date())
    assert result.ok, [d.describe() for d in result.differences]
    total = sum((r["cost_total_usd"] for r in attempts), Decimal(0))
    for g in GRAINS:
        assert grain_totals(store, g)[0::2] == (len(attempts), total)


def test_migration_011_applies_on_an_existing_database(tmp_path, monkeypatch):
    real = store_module.migrations
    settings = load_settings(env={}, data_dir=tmp_path)
    [old] = in_message([attempt_row_factory("before-011", final=True,
                                            ts_ms=int((NOW - timedelta(hours=1)).timestamp() * 1000))])
    old["payload"] = orjson.dumps(event_factory(event_id=old["event_id"])).decode()
    with Store(settings) as s:
        monkeypatch.setattr(store_module, "migrations", lambda: [m for m in real() if m[0] < 11])
        s.migrate()
        columns = (*(c for c in ATTEMPT_COLUMNS if c not in ATTEMPT_COLUMNS_ADDED), "content_hash")  # of then
        old["content_hash"] = content_hash(old["payload"])
        s.insert_columns("usage_events", [[old[c]] for c in columns], columns, "test:old")
    monkeypatch.setattr(store_module, "migrations", real)
    with Store(settings) as s:
        assert s.migrate() == [name for n, name, _ in real() if n >= 11]
        assert s.migrate() == []
        assert s.saved_events([old["event_id"]]) == {old["event_id"]: (old["content_hash"], "")}
        writer = SinkWriter(s)
        assert writer.write([dict(old)]) == 0 and writer.stats.already_saved == 1  # no origin: a duplicate
        [new] = in_message([attempt_row_factory("after-011", final=True, ts_ms=int(old["ts"].timestamp() * 1000))],
                           Source("llm.cost.attempts.v1", 0, 1))
        new["payload"] = orjson.dumps(event_factory(event_id=new["event_id"])).decode()
        assert writer.write([new]) == 1
        assert s.saved_events([new["event_id"]]) == {new["event_id"]: (new["content_hash"], new["origin"])}
        assert s.query("SELECT origin FROM {db}.usage_events WHERE event_id = {e:String}",
                       {"e": new["event_id"]}).rows == [(new["origin"],)]


@pytest.mark.parametrize("handoff", ["json", "arrow"])
def test_a_request_replay_after_a_kill_mid_insert_resends_its_journaled_pieces(store, docs, handoff):
    """The logical-request sink killed mid-insert: logical_requests and its heads took a piece, some grains did not.

    The heads now show the revisions, so deciding again would skip them; the new writer re-sends the journaled
    pieces of the crashed batch instead (another batch composition), and every grain matches its sources.
    """
    gen = TrafficGenerator(catalog_from_reference(docs), seed=43, bad_rate=0.0, start=NOW - timedelta(hours=2))
    attempts, requests = pipeline_batch([e for _ in range(200) for e in gen.logical_request()], docs)
    origins = sorted({r["origin"] for r in requests})
    assert len(origins) > 1 and write(SinkWriter(store), attempts).inserted == len(attempts)
    if handoff == "json":
        def batch_of(keep):
            return [dict(r) for r in requests if keep(r["origin"])]
    else:
        messages = {o: (encode_rows([r for r in requests if r["origin"] == o], REQUEST_SCHEMA, 900_000)[0],
                        Source("llm.cost.requests.v1", 0, next(OFFSETS))) for o in origins}

        def batch_of(keep):
            rows, dead = decode_batch([m for o, m in messages.items() if keep(o)], REQUEST_ROWS)
            assert isinstance(rows, AttemptBatch) and not dead
            return rows
    crashed = batch_of(lambda o: o != origins[-1])
    arm_failpoint(store)
    with pytest.raises(Exception, match="failpoint"):
        RequestWriter(store).write(crashed)  # this worker is killed now
    store.command("TRUNCATE TABLE {db}.failpoint")
    covered, plans = store.journaled_plans(
        origins if handoff == "json" else [origin_of(m[1]) for m in messages.values()])
    assert len(covered) == len(origins) - 1 and len(plans) == 1  # one plan for the crashed batch's messages
    heads = store.request_heads([r["logical_request_id"] for r in crashed])
    assert heads and not audit(store, (NOW - timedelta(days=1)).date()).ok  # the heads hold what a grain lacks

    writer = RequestWriter(store)  # the restarted worker: the crashed messages and the next one in one batch
    written = write(writer, batch_of(lambda o: True))
    assert written.resent == writer.stats.resent == len(crashed)
    assert written.inserted == len(requests) - len(crashed)
    assert writer.stats.already_saved == 0
    result = audit(store, (NOW - timedelta(days=1)).date())
    assert result.ok, [d.describe() for d in result.differences]
    for g in GRAINS:
        assert grain_totals(store, g)[:2] == (len(attempts), len(requests))
    assert store.query("SELECT sum(sign), count() FROM {db}.logical_requests").rows == [(len(requests),
                                                                                          len(requests))]
