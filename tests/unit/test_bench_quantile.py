"""The benchmarks' quantile helper (tests.bench.common.quantile), used for every p50 / p99 they print."""

import math

from tests.bench.common import quantile


def test_quantile_interpolates_between_order_statistics() -> None:
    values = [40.0, 10.0, 30.0, 20.0]  # unordered on purpose
    assert quantile(values, 0.0) == 10.0
    assert quantile(values, 1.0) == 40.0
    assert quantile(values, 0.5) == 25.0
    assert math.isclose(quantile(values, 0.99), 39.7)


def test_quantile_of_one_value_and_of_none() -> None:
    assert quantile([7.0], 0.99) == 7.0
    assert math.isnan(quantile([], 0.5))
