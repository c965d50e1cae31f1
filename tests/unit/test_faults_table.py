"""The fault suite's verdict: a row is ok only at 0 lost, 0 duplicated, an exact cost and no other problem."""

from fractions import Fraction

from tests.faults.harness import Row, table


def row(**changes):
    base = {"scenario": "R0 test", "events_in": 1200, "rows_out": 1000, "lost": 0, "duplicated": 0,
            "cost_diff": Fraction(0), "recovery_s": 2.5}
    return Row(**{**base, **changes})


def test_only_an_exact_row_is_ok():
    assert row().ok
    assert not row(lost=1).ok
    assert not row(duplicated=1).ok
    assert not row(cost_diff=Fraction(1, 10**12)).ok  # a picodollar is a difference
    assert not row(problems=["tally verify exited 1"]).ok


def test_the_table_has_one_line_per_scenario_and_names_each_failure():
    out = table([row(notes="killed sink ×1"), row(scenario="R9 x", lost=3, cost_diff=Fraction(1, 4))]).splitlines()
    assert out[0].split(" | ")[0].strip() == "scenario" and set(out[1]) <= {"-", "+"}
    assert out[2].endswith("| ok") and "1,200" in out[2] and "0 (exact)" in out[2]
    assert "FAIL: 3 lost; cost differs" in out[3] and "1/4" in out[3]
    assert out[4] == "  R0 test: killed sink ×1"
