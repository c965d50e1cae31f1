"""The fold's columnar half builds exactly the rows summarize() builds, in the order the fold emits them."""

from __future__ import annotations

import random
from datetime import timedelta
from decimal import Decimal, localcontext
from typing import Any

import pyarrow as pa

from streams.fold import FoldConfig, Folder, apply_writes, facts_of_detail
from streams.fold_columns import atto, emitted_requests, requests_table
from streams.pipeline import by_key, feature_partitions
from streams.sink_columns import MONEY, REQUEST_SCHEMA, rows_table
from tests.factories import attempt_row_factory, clock

NOW = clock() + timedelta(seconds=5, microseconds=123456)  # emitted_at, with microseconds the columns floor
T0 = int(clock().timestamp() * 1000) - 3_600_000  # epoch ms: attempts from an hour before the suite's now


def batch(rng: random.Random, n: int, prefix: str) -> list[dict[str, Any]]:
    """Attempts of every shape the fold meets: single finals (most), retries and fallbacks, unfinished requests,
    terminated streams, empty price-card versions, costs beyond 64 bits of atto-dollars, duplicates."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        lid = f"{prefix}-lr-{i}"
        ts = T0 + rng.randint(0, 600_000) * 1000 + rng.randint(0, 999)
        kind = rng.random()
        cost = Decimal(rng.randint(0, 10**9)) / Decimal(10**rng.randint(0, 18))
        if kind < 0.6:
            row = attempt_row_factory(lid, final=True, ts_ms=ts, cost=cost,
                                      status=rng.choice(("ok", "ok", "error", "terminated")),
                                      token_n=rng.choice((None, 17)), model_requested=rng.choice(("", "gpt-4.1")),
                                      fallback_from=rng.choice(("", "", "gpt-4o")),
                                      feature_id=rng.choice(("a", "b", "c")))
            if rng.random() < 0.2:
                row["price_card_version"] = ""
            rows.append(row)
        elif kind < 0.8:
            rows.append(attempt_row_factory(lid, attempt=0, status="error", ts_ms=ts, cost=cost))
            rows.append(attempt_row_factory(lid, attempt=1, final=True, ts_ms=ts + 500, model="gpt-4o",
                                            fallback_from="gpt-4.1-mini", cost=cost))
        elif kind < 0.9:
            rows.append(attempt_row_factory(lid, status=rng.choice(("ok", "error")), ts_ms=ts, cost=cost))
        else:
            first = attempt_row_factory(lid, final=True, ts_ms=ts, cost=Decimal("12345.678901234567890123"))
            rows.extend([first, dict(first)])  # a huge cost; the same event twice
    rng.shuffle(rows)
    return rows


def fold_both(batches: list[list[dict[str, Any]]]) -> None:
    """Fold the batches twice, summarizing everything and leaving singles to the columns: equal outputs."""
    rows_way, columns_way = Folder(FoldConfig(), 4), Folder(FoldConfig(), 4)
    state_rows: dict[bytes, bytes] = {}
    state_columns: dict[bytes, bytes] = {}
    for k, rows in enumerate(batches):
        wall = T0 / 1000 + 700 + 60 * k
        by_rows = rows_way.fold(rows, state_rows, wall, NOW)
        by_columns = columns_way.fold(rows, state_columns, wall, NOW, singles=True)
        assert by_columns.singles, "the batch has single final attempts"
        assert by_columns.writes == by_rows.writes
        expected = rows_table(by_rows.emitted, REQUEST_SCHEMA)
        got = requests_table(by_columns, rows_table(rows), NOW)
        assert got.schema == REQUEST_SCHEMA
        assert got.num_rows == by_columns.count == len(by_rows.emitted)
        for name in REQUEST_SCHEMA.names:
            assert got[name].to_pylist() == expected[name].to_pylist(), name
        apply_writes(state_rows, by_rows.writes)
        apply_writes(state_columns, by_columns.writes)


def test_single_attempt_requests_built_from_columns_equal_the_summarized_rows() -> None:
    rng = random.Random(3)
    fold_both([batch(rng, 400, "one")])


def test_a_request_already_in_the_state_is_folded_not_built_from_columns() -> None:
    rng = random.Random(5)
    first = batch(rng, 300, "x")
    late = [attempt_row_factory(r["logical_request_id"], final=True, ts_ms=T0 + 900_000, cost=Decimal("0.5"))
            for r in first[:40] if not r["final"]]
    assert late
    fold_both([first, late + batch(rng, 100, "y")])


def test_requests_regrouped_by_feature_partition_keep_the_fold_order_within_each() -> None:
    """What process_messages publishes per llm.cost.requests.v1 partition: the rows the fold emitted for it, in the
    order it emitted them (singles and summarized rows interleaved), partitions in order of first appearance."""
    rows = batch(random.Random(11), 500, "p")
    by_rows = Folder(FoldConfig(), 4).fold(rows, {}, T0 / 1000 + 700, NOW)
    by_columns = Folder(FoldConfig(), 4).fold(rows, {}, T0 / 1000 + 700, NOW, singles=True)
    expected: dict[int, list[dict[str, Any]]] = {}
    for row, partition in zip(by_rows.emitted, feature_partitions([r["feature_id"] for r in by_rows.emitted], 3),
                              strict=True):
        expected.setdefault(partition, []).append(row)
    table, order = emitted_requests(by_columns, rows_table(rows), NOW)
    keys = feature_partitions(table["feature_id"].to_pylist(), 3)
    got = by_key(table, [keys[i] for i in order], order)
    assert list(got) == list(expected) and len(got) == 3
    for partition, part in got.items():
        assert part.to_pylist() == rows_table(expected[partition], REQUEST_SCHEMA).to_pylist()


def test_attempts_detail_holds_the_fact_as_the_fold_stores_it() -> None:
    row = attempt_row_factory("lr-detail", final=True, cost=Decimal("19.000000000000000001"), token_n=None, ts_ms=T0)
    result = Folder(FoldConfig(), 4).fold([row], {}, T0 / 1000, NOW, singles=True)
    table = requests_table(result, rows_table([row]), NOW)
    (fact,) = facts_of_detail(table["attempts_detail"][0].as_py())
    assert fact["cost_total_usd"] == 19 * 10**18 + 1 and fact["event_id"] == row["event_id"]


def test_money_columns_read_as_their_exact_atto_dollars() -> None:
    values = [Decimal(0), Decimal("0.000000000000000001"), Decimal("-3.5"), Decimal("9.223372036854775807"),
              Decimal("9.223372036854775808"), Decimal("-9.223372036854775809"),
              Decimal("99999999999999999999.999999999999999999")]
    with localcontext(prec=60):  # 38 digits: beyond the default context's 28
        exact = [int(v.scaleb(18)) for v in values]
    column = pa.chunked_array([pa.array(values[:3], MONEY), pa.array(values[3:], MONEY)])
    assert atto(column) == exact
    assert atto(pa.array(values, MONEY).slice(2, 3)) == exact[2:5]
