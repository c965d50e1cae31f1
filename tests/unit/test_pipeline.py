"""The process step's regrouping of a batch's rows by output partition."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from streams.pipeline import _MAX_RUNS, by_key, feature_partitions
from tally.partitioning import partition_for


def groups_of(table: pa.Table, keys: list[int], order: list[int] | None = None) -> dict[int, list[int]]:
    out = by_key(table, keys, None if order is None else np.asarray(order))
    return {k: t["i"].to_pylist() for k, t in out.items()}


def expected(keys: list[int], rows: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for key, row in zip(keys, rows, strict=True):
        out.setdefault(key, []).append(row)
    return out


def test_rows_in_runs_are_sliced_in_order_and_groups_keep_first_appearance() -> None:
    keys = [2] * 5 + [0] * 3 + [2] * 4 + [1]
    table = pa.table({"i": list(range(len(keys)))})
    got = groups_of(table, keys)
    assert got == expected(keys, list(range(len(keys))))
    assert list(got) == [2, 0, 1]


def test_scattered_rows_are_copied_once_in_the_order_given() -> None:
    rng = random.Random(4)
    n = 20 * _MAX_RUNS
    keys_of_rows = [rng.randrange(4) for _ in range(n)]
    table = pa.table({"i": list(range(n))})
    assert groups_of(table, keys_of_rows) == expected(keys_of_rows, list(range(n)))
    order = list(range(n))
    rng.shuffle(order)
    taken_keys = [keys_of_rows[i] for i in order]
    got = groups_of(table, taken_keys, order)
    assert got == expected(taken_keys, order)
    assert list(got) == list(dict.fromkeys(taken_keys))


def test_an_empty_batch_has_no_groups_and_features_hash_as_the_producer_does() -> None:
    assert by_key(pa.table({"i": pa.array([], pa.int64())}), []) == {}
    features = ["search", "summarize", "search", "chat"]
    assert feature_partitions(features, 6) == [partition_for(f, 6) for f in features]
