"""Rollups in real ClickHouse (chDB): replays, retried inserts and late attempts never double count."""

import itertools
from datetime import datetime, timedelta
from decimal import Decimal

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from streams.fold import FoldConfig, Folder
from streams.pipeline import FoldStep, process_messages
from streams.records import Source
from streams.sink import ATTEMPT_ROWS, REQUEST_ROWS, RequestWriter, SinkWriter, decode_rows
from streams.validate import Validator
from tally.partitioning import partition_for
from tally.reference import snapshot_of

pytestmark = pytest.mark.integration
OFFSETS = itertools.count()  # each sink input message of these tests at its own offset

GRAINS = ("minute", "hour", "day")


def run_batch(events, docs, folder, now: datetime):
    """One batch through validate → enrich → fold at `now`, decoded as the sink would: (attempt rows, request rows).

    `now` is the ingest time: events stamped more than the allowed skew after it are dead-lettered.
    """
    by_partition: dict[int, list[bytes]] = {}
    for e in events:
        lid = e.get("parent_request_id") or e["request_id"]
        by_partition.setdefault(partition_for(lid, 4), []).append(orjson.dumps(e))
    messages = [(b"\n".join(lines), Source("llm.usage.v1", p, 0)) for p, lines in by_partition.items()]
    out = process_messages(messages, Validator(), snapshot_of(docs), 4, now, FoldStep(folder, {}, 4), 0.0)
    attempts, requests = [], []
    for lines in out.attempts.values():
        attempts += decode_rows(b"\n".join(lines), Source("a", 0, next(OFFSETS)), ATTEMPT_ROWS)[0]
    for lines in out.requests.values():
        requests += decode_rows(b"\n".join(lines), Source("r", 0, next(OFFSETS)), REQUEST_ROWS)[0]
    return attempts, requests


def rollup_totals(store, grain):
    return store.query(
        f"SELECT sum(attempts), sum(requests), sum(cost_total_usd), sum(cost_wasted_usd), "
        f"sum(cost_unattributed_usd), sum(reasoning_tokens) FROM {{db}}.rollup_{grain}").rows[0]


def source_totals(store):
    a = store.query("SELECT count(), sum(cost_total_usd), sumIf(cost_total_usd, attribution_status != 'attributed'), "
                    "sum(reasoning_tokens) FROM {db}.usage_events").rows[0]
    r = store.query("SELECT sum(sign), sum(sign * cost_wasted_usd) FROM {db}.logical_requests").rows[0]
    return (a[0], r[0], a[1], r[1], a[2], a[3])


def test_rollups_count_each_attempt_and_request_once(store, docs, now):
    # Event time an hour back: the minute rollup's retention (14 days by default) keeps every bucket.
    gen = TrafficGenerator(catalog_from_reference(docs), seed=23, bad_rate=0.0, start=now - timedelta(hours=1))
    events = [e for _ in range(600) for e in gen.logical_request()]
    # A fresh folder per call: every request here ends with a final attempt, so nothing stays open.
    attempts, requests = run_batch(events, docs, Folder(FoldConfig(), 4), now)
    attempt_writer, request_writer = SinkWriter(store), RequestWriter(store)
    attempt_writer.write(attempts)
    request_writer.write(requests)
    first = source_totals(store)
    assert first[0] == len(events) and first[1] == 600

    # The same data replayed: the sinks skip it; a retried insert with the same token is absorbed too.
    attempt_writer.write(attempts)
    request_writer.write(requests)
    # An insert retried after a timeout carries the sink's deterministic token: ClickHouse absorbs it, in the
    # rollups as well.
    for piece in RequestWriter(store).plan(requests).pieces:  # the journaled plan: the pieces as first sent
        cols = [[r[c] for r in piece.rows] for c in REQUEST_ROWS.columns]
        store.insert_columns("logical_requests", cols, REQUEST_ROWS.columns, piece.token)
    assert source_totals(store) == first

    # A late attempt moves into an already-emitted request (its fold state is long gone): the sink merges it.
    target = next(e for e in events if e.get("final") and not e.get("parent_request_id"))
    late = {**target, "event_id": "late-attempt-1", "request_id": "late-call-1", "parent_request_id":
            target["request_id"], "attempt": 7, "final": False, "status": "error", "error": "timeout",
            "usage": {"input_tokens": 5000, "reasoning_tokens": 100}}
    late_attempts, _ = run_batch([late], docs, Folder(FoldConfig(), 4), now)
    # Not final: the fold holds it until inactivity; a quiet-stream tick emits it (as the live worker would).
    folder = Folder(FoldConfig(), 4)
    state: dict[bytes, bytes] = {}
    res = folder.fold(late_attempts, state, 0.0, now)
    state.update({k: v for k, v in res.writes.items() if v is not None})
    res = folder.tick(range(4), state, 10**10, now)
    late_requests = decode_rows(b"\n".join(orjson.dumps(r, default=str) for r in res.emitted),
                                Source("r", 0, next(OFFSETS)),
                                REQUEST_ROWS)[0]
    attempt_writer.write(late_attempts)
    assert request_writer.write(late_requests) == 2  # the cancel row of revision 1 and revision 2
    request_writer.write(late_requests)  # replayed: nothing

    expected = source_totals(store)
    assert expected[0] == len(events) + 1 and expected[1] == 600
    assert expected[3] > first[3]  # the late attempt is waste of its request
    for grain in GRAINS:
        assert rollup_totals(store, grain) == expected, grain
    for table in ("logical_requests", *(f"rollup_{g}" for g in GRAINS)):
        store.command(f"OPTIMIZE TABLE {{db}}.{table} FINAL")
    for grain in GRAINS:
        assert rollup_totals(store, grain) == expected, grain

    # Per feature, the minute rollup equals the sources; quantile states merge over any range.
    by_feature = store.query("SELECT feature_id, sum(requests), sum(cost_total_usd) FROM {db}.rollup_minute "
                             "GROUP BY feature_id ORDER BY feature_id").rows
    truth = store.query("SELECT feature_id, sum(n), sum(c) FROM (SELECT feature_id, toInt64(0) AS n, "
                        "sum(cost_total_usd) AS c FROM {db}.usage_events GROUP BY feature_id UNION ALL SELECT "
                        "feature_id, sum(sign), toDecimal128(0, 18) FROM {db}.logical_requests GROUP BY feature_id) "
                        "GROUP BY feature_id ORDER BY feature_id").rows
    assert by_feature == truth
    p50, p99 = store.query("SELECT quantileTDigestMerge(0.5)(cost_per_request_usd), "
                           "quantileTDigestMerge(0.99)(cost_per_request_usd) FROM {db}.rollup_day").rows[0]
    assert 0 < p50 < p99
    assert isinstance(expected[2], Decimal)
