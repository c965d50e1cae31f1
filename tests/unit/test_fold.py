"""The fold stage without Kafka: logical requests from priced attempts, whatever the arrival order."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.fold import (
    REQUEST_COLUMNS,
    Entry,
    FoldConfig,
    Folder,
    _summarize_many,
    apply_writes,
    compress_entry,
    effective,
    expand_entry,
    fact_of,
    facts_of_detail,
    from_atto,
    summarize,
    to_atto,
)
from streams.sink import RequestWriter
from streams.sink_columns import table_rows
from tally.partitioning import partition_for
from tests.factories import attempt_row_factory as row

NOW = datetime(2026, 11, 20, 8, 30, tzinfo=UTC)
T0 = 1_763_208_000_000  # ms
CONFIG = FoldConfig(settle_ms=30_000, inactivity_ms=600_000, grace_ms=120_000, idle_s=5.0)
WALL = T0 / 1000 + 60  # wall clock a minute after the events


class Run:
    """A folder, its state as a plain dict, and every row it emitted."""

    def __init__(self, config: FoldConfig = CONFIG) -> None:
        self.folder = Folder(config, 4)
        self.state: dict[bytes, bytes] = {}
        self.emitted: list[dict[str, Any]] = []
        self.writes = 0

    def fold(self, *rows: dict[str, Any], wall: float = WALL) -> list[dict[str, Any]]:
        res = self.folder.fold(list(rows), self.state, wall, NOW)
        return self._apply(res)

    def tick(self, wall: float) -> list[dict[str, Any]]:
        return self._apply(self.folder.tick(range(4), self.state, wall, NOW))

    def _apply(self, res: Any) -> list[dict[str, Any]]:
        apply_writes(self.state, res.writes)
        self.writes += len(res.writes)
        self.emitted.extend(res.emitted)
        return list(res.emitted)


class MemoryHeads:
    """What RequestWriter needs of a Store, over a list of inserted rows (the chDB version: tests/integration)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def request_heads(self, ids: list[str]) -> dict[str, tuple[int, datetime, str]]:
        out: dict[str, tuple[int, datetime, str]] = {}
        for r in self.rows:
            if r["sign"] == 1 and r["logical_request_id"] in ids:
                if r["logical_request_id"] not in out or r["revision"] > out[r["logical_request_id"]][0]:
                    out[r["logical_request_id"]] = (r["revision"], r["emitted_at"], r["attempts_detail"])
        return out

    def insert_columns(self, table: str, columns: list[list[Any]], names: tuple[str, ...], token: str) -> None:
        self.rows.extend(dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True))

    def insert_arrow(self, table: str, data: pa.Table, token: str) -> None:
        self.rows.extend(table_rows(data))

    def current(self) -> dict[str, dict[str, Any]]:
        """Per logical request: sum(sign) and sum(sign * column), as a query over logical_requests computes them."""
        agg: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(Decimal))
        for r in self.rows:
            a = agg[r["logical_request_id"]]
            a["count"] += r["sign"]
            for c in ("cost_total_usd", "cost_wasted_usd", "cost_final_usd", "attempts", "output_tokens"):
                a[c] += r["sign"] * r[c]
        return agg


def test_a_single_final_attempt_is_emitted_at_once_without_state():
    run = Run()
    out = run.fold(row("L1", final=True, cost=Decimal("0.0042")))
    assert len(out) == 1 and run.writes == 0 and run.state == {}
    req = out[0]
    assert set(req) == set(REQUEST_COLUMNS)
    assert (req["attempts"], req["retries"], req["fallbacks"], req["final_status"], req["revision"]) == (1, 0, 0, "ok",
                                                                                                       1)
    assert req["cost_total_usd"] == req["cost_final_usd"] == Decimal("0.0042")
    assert req["cost_wasted_usd"] == 0


def test_two_failures_then_success_is_one_request_with_retry_waste():
    run = Run()
    assert run.fold(row("L2", status="error", attempt=0, ts_ms=T0, cost=Decimal("0.001"))) == []
    assert run.fold(row("L2", status="error", attempt=1, ts_ms=T0 + 500, cost=Decimal("0.002"))) == []
    [req] = run.fold(row("L2", attempt=2, final=True, ts_ms=T0 + 900, cost=Decimal("0.01")))
    assert (req["attempts"], req["retries"], req["fallbacks"], req["final_status"]) == (3, 2, 0, "ok")
    assert req["cost_total_usd"] == Decimal("0.013")
    assert req["cost_wasted_usd"] == Decimal("0.003") and req["cost_final_usd"] == Decimal("0.01")
    assert req["first_ts"] < req["last_ts"]
    # The state stays for the grace period (a late attempt still finds it), then goes.
    assert list(run.state) == [b"L2"]
    run.tick(WALL + CONFIG.idle_s + CONFIG.grace_ms / 1000 + 1)
    assert run.state == {}


def test_fallback_from_a_small_model_to_a_flagship():
    run = Run()
    run.fold(row("L3", status="error", model="gpt-4.1-mini", cost=Decimal("0.0001")))
    [req] = run.fold(row("L3", attempt=1, final=True, model="gpt-4.1", model_requested="gpt-4.1-mini",
                         fallback_from="gpt-4.1-mini", cost=Decimal("0.02"), ts_ms=T0 + 2000))
    assert req["fallback_chain"] == ["gpt-4.1-mini", "gpt-4.1"]
    assert (req["requested_model"], req["final_model"], req["fallbacks"], req["retries"]) == ("gpt-4.1-mini",
                                                                                             "gpt-4.1", 1, 0)
    assert req["cost_wasted_usd"] == Decimal("0.0001")


def test_a_stream_cut_by_the_router_counts_the_tokens_before_the_cut():
    run = Run()
    [req] = run.fold(row("L4", status="terminated", final=True, usage_reported=False, token_n=1730,
                         output_tokens=1730, pricing_status="estimated", cost=Decimal("0.00692")))
    assert (req["terminated"], req["terminated_at_token_n"], req["output_tokens"]) == (True, 1730, 1730)
    assert (req["final_status"], req["pricing_status"], req["usage_complete"]) == ("terminated", "estimated", False)


def test_real_usage_arriving_later_corrects_a_request_without_usage():
    run, heads = Run(), MemoryHeads()
    writer = RequestWriter(heads)  # type: ignore[arg-type]
    [first] = run.fold(row("L5", request_id="call-1", status="terminated", final=True, usage_reported=False,
                           pricing_status="no_usage", cost=Decimal(0), output_tokens=0))
    assert (first["pricing_status"], first["usage_complete"], first["cost_total_usd"]) == ("no_usage", False, 0)
    writer.write([first])
    # The same physical call (request_id) reports its usage later. A single final attempt leaves no fold state,
    # so the fold emits it alone and the sink merges it with what ClickHouse holds: the record with usage replaces
    # the one without.
    writer.write(run.fold(row("L5", request_id="call-1", status="terminated", final=True, cost=Decimal("0.0031"),
                              ts_ms=T0 + 60_000)))
    [second] = [r for r in heads.rows if r["sign"] == 1 and r["revision"] == 2]
    assert second["attempts"] == 1 and len(second["attempt_event_ids"]) == 2  # both remembered, one counts
    assert (second["pricing_status"], second["usage_complete"], second["cost_total_usd"]) == ("priced", True,
                                                                                            Decimal("0.0031"))
    cur = heads.current()["L5"]
    assert (cur["count"], cur["cost_total_usd"]) == (1, Decimal("0.0031"))


def test_an_ok_attempt_without_final_settles_in_event_time():
    run = Run()
    others = [f"M{i}" for i in range(200) if partition_for(f"M{i}", 4) == partition_for("L6", 4)]
    assert run.fold(row("L6", ts_ms=T0)) == []
    # Other requests move the partition's event time: not yet past the settle time...
    assert [r["logical_request_id"] for r in run.fold(row(others[0], final=True, ts_ms=T0 + 29_000))] == [others[0]]
    # ...then past it.
    out = run.fold(row(others[1], final=True, ts_ms=T0 + 31_000))
    [req] = [r for r in out if r["logical_request_id"] == "L6"]
    assert (req["final_status"], req["closed_by"], req["revision"]) == ("ok", "settled", 1)


def test_a_request_without_success_is_abandoned_after_inactivity():
    run = Run()
    run.fold(row("L7", status="error", ts_ms=T0))
    assert run.tick(WALL + CONFIG.idle_s + 60) == []  # event time runs on, inactivity not reached yet
    [req] = run.tick(WALL + CONFIG.idle_s + 601)
    assert (req["final_status"], req["closed_by"], req["cost_wasted_usd"]) == ("abandoned", "inactive", 0)


def test_duplicates_change_nothing_and_late_attempts_make_revisions():
    run = Run()
    a = row("L8", status="error", ts_ms=T0)
    b = row("L8", attempt=1, final=True, ts_ms=T0 + 100)
    [rev1] = run.fold(a, b)
    assert run.fold(a) == [] and run.fold(b, a) == []
    late = row("L8", attempt=2, status="error", ts_ms=T0 + 200, cost=Decimal("0.5"))
    [rev2] = run.fold(late)
    assert (rev1["revision"], rev2["revision"], rev2["attempts"]) == (1, 2, 3)
    assert rev2["cost_total_usd"] == rev1["cost_total_usd"] + Decimal("0.5")


def test_a_clock_skewed_event_does_not_close_every_open_request():
    run = Run()
    others = [f"S{i}" for i in range(200) if partition_for(f"S{i}", 4) == partition_for("L11", 4)]
    run.fold(row("L11", status="error", ts_ms=T0))
    # stamped a day ahead: the partition clock moves only to the wall clock + 5 minutes, short of L11's
    # inactivity timeout (10 minutes), so L11 stays open
    out = run.fold(row(others[0], final=True, ts_ms=T0 + 86_400_000))
    assert [r["logical_request_id"] for r in out] == [others[0]]
    assert list(run.state) == [b"L11"]
    assert run.folder.clocks[partition_for("L11", 4)].now_ms == int(WALL * 1000) + 300_000


def test_a_future_event_in_the_state_does_not_move_a_rebuilt_clock():
    # Issue 11: after a rebalance the clock is rebuilt from the state; an open request stamped 2099 in it must not
    # carry the rebuilt clock to 2099 (which would settle or abandon every other open request of the partition).
    run = Run()
    p = partition_for("L12", 4)
    ahead = next(f"F{i}" for i in range(200) if partition_for(f"F{i}", 4) == p)
    run.fold(row("L12", status="error", ts_ms=T0))
    run.fold(row(ahead, status="error", ts_ms=4_083_955_200_000))  # 2099-06-01, not final: it stays in the state
    run.folder.forget()
    assert run.fold(row(ahead, attempt=1, status="error", ts_ms=T0 + 1000)) == []
    assert sorted(run.state) == sorted([b"L12", ahead.encode()])
    assert run.folder.clocks[p].now_ms == int(WALL * 1000) + CONFIG.future_tolerance_ms


def test_entry_round_trips():
    e = Entry([fact_of(row("L9"))], revision=2, emitted_ids=1, phase=1, due_ms=5)
    assert Entry.load(e.dump()) == e


def test_an_entry_holds_its_facts_packed_and_reads_entries_written_before_packing():
    facts = [fact_of(row("L8", status="error")), fact_of(row("L8", attempt=1, cost=Decimal("2.5")))]
    e = Entry(facts, revision=1, emitted_ids=1, phase=0, due_ms=7)
    before = orjson.dumps([facts, 1, 1, 0, 7])  # how versions before packing wrote the same entry
    assert Entry.load(before) == e == Entry.load(e.dump())
    assert len(expand_entry(e.dump())) < 0.6 * len(before)  # the keys are written once, in the code
    packed = orjson.loads(expand_entry(e.dump()))
    packed[0][0] = packed[0][0][:-1]  # a fact packed by a version with other fields
    with pytest.raises(ValueError, match="packed fact"):
        Entry.load(orjson.dumps(packed))


def test_sink_merges_a_late_attempt_that_lost_its_state():
    """After the grace period the fold has forgotten the request: the sink merges what ClickHouse holds."""
    run, heads = Run(), MemoryHeads()
    writer = RequestWriter(heads)  # type: ignore[arg-type]
    writer.write(run.fold(row("L10", status="error", ts_ms=T0, cost=Decimal("1")),
                          row("L10", attempt=1, final=True, ts_ms=T0 + 10, cost=Decimal("2"))))
    run.tick(WALL + 10_000)  # grace over: state gone
    assert run.state == {}
    [orphan] = run.fold(row("L10", attempt=2, status="error", ts_ms=T0 + 20, cost=Decimal("4")), wall=WALL + 10_001)
    assert orphan["revision"] == 1 and orphan["attempts"] == 1
    writer.write([orphan])
    writer.write([orphan])  # a replay changes nothing
    cur = heads.current()["L10"]
    assert (cur["count"], cur["cost_total_usd"], cur["attempts"]) == (1, Decimal(7), 3)
    assert cur["cost_wasted_usd"] + cur["cost_final_usd"] == cur["cost_total_usd"]
    assert max(r["revision"] for r in heads.rows) == 2


# --- property: random requests, shuffled, duplicated, split across batches --------------------------------------

_cost = st.integers(0, 10**15).map(lambda n: Decimal(n).scaleb(-18))
_request = st.tuples(
    st.lists(st.sampled_from(["error", "terminated", "ok"]), min_size=0, max_size=3),  # attempts before the last
    st.sampled_from(["ok", "error", "terminated"]),  # the last attempt's status
    st.sampled_from(["final", "no_final"]),
    st.lists(_cost, min_size=4, max_size=4),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(_request, min_size=1, max_size=25), seed=st.integers(0, 2**32), grace=st.sampled_from(
    [0, 120_000]), batches=st.integers(1, 8))
def test_folded_totals_equal_their_attempts_whatever_the_order(requests, seed, grace, batches):
    rnd = random.Random(seed)
    rows: list[dict[str, Any]] = []
    truth: dict[str, Decimal] = {}
    for i, (before, last, final, costs) in enumerate(requests):
        lid = f"L{i}-{seed}"
        statuses = [*before, last]
        for n, status in enumerate(statuses):
            is_last = n == len(statuses) - 1
            rows.append(row(lid, attempt=n, status=status, final=is_last and final == "final",
                            ts_ms=T0 + rnd.randrange(0, 50_000), cost=costs[n]))
        truth[lid] = sum(costs[:len(statuses)], Decimal(0))
    rows += rnd.sample(rows, k=len(rows) // 3)  # duplicates (same event_id)
    rnd.shuffle(rows)
    cuts = sorted(rnd.sample(range(1, len(rows)), k=min(batches - 1, len(rows) - 1))) if len(rows) > 1 else []
    run = Run(FoldConfig(settle_ms=30_000, inactivity_ms=600_000, grace_ms=grace, idle_s=5.0))
    heads = MemoryHeads()
    writer = RequestWriter(heads)  # type: ignore[arg-type]
    wall = WALL
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        wall += 1
        writer.write(run.fold(*rows[lo:hi], wall=wall))
    writer.write(run.tick(wall + 10**6))  # quiet: every decision falls due...
    writer.write(run.tick(wall + 2 * 10**6))  # ...and every grace period ends
    assert run.state == {}
    cur = heads.current()
    assert set(cur) == set(truth)
    for lid, expected in truth.items():
        c = cur[lid]
        assert c["count"] == 1, lid  # once, at its latest revision
        assert c["cost_total_usd"] == expected
        assert c["cost_wasted_usd"] + c["cost_final_usd"] == c["cost_total_usd"]
    # Every row the sink wrote is the pure function of its attempts.
    for r in heads.rows:
        again = summarize(r["logical_request_id"], facts_of_detail(r["attempts_detail"]), r["revision"],
                          r["emitted_at"], r["sign"])
        assert again == r


def test_effective_orders_by_attempt_and_supersedes_missing_usage():
    a = fact_of(row("L", request_id="c1", usage_reported=False, attempt=0, ts_ms=T0 + 5))
    b = fact_of(row("L", request_id="c1", attempt=0, ts_ms=T0 + 1))
    c = fact_of(row("L", request_id="c0", attempt=1, ts_ms=T0))
    assert [f["event_id"] for f in effective([c, a, b, a])] == [b["event_id"], c["event_id"]]


def test_costs_travel_as_exact_atto_dollars():
    assert to_atto(Decimal("0.000000400000000001")) == 400_000_000_001
    assert from_atto(to_atto(Decimal("12345.678"))) == Decimal("12345.678")
    with pytest.raises(ValueError, match="more than 18 decimal places"):
        to_atto(Decimal("1E-19"))


@given(final=st.booleans(), status=st.sampled_from(["ok", "error", "terminated", "timeout"]),
       model=st.sampled_from(["gpt-4.1-mini", "gpt-4.1"]), requested=st.sampled_from(["", "gpt-4.1", "o3"]),
       fallback_from=st.sampled_from(["", "o3", "gpt-4.1-mini"]), usage=st.booleans(),
       token_n=st.one_of(st.none(), st.integers(0, 10_000)),
       pricing=st.sampled_from(["priced", "partial", "estimated", "unpriced", "no_usage"]),
       cost=st.decimals(0, 1000, places=18), card=st.sampled_from(["", "openai-2026-06"]),
       sign=st.sampled_from([1, -1]))
def test_a_single_attempt_summarizes_as_the_general_path_does(final, status, model, requested, fallback_from, usage,
                                                              token_n, pricing, cost, card, sign):
    r = row("L1", final=final, status=status, model=model, model_requested=requested, fallback_from=fallback_from,
            usage_reported=usage, token_n=token_n, pricing_status=pricing, cost=cost)
    r["price_card_version"] = card
    f = fact_of(r)
    assert summarize("L1", [f], 3, NOW, sign=sign) == _summarize_many("L1", [f], 3, NOW, sign)


def test_an_attempt_of_more_than_18_dollars_folds_and_its_state_reads_back_exactly():
    """Atto-dollars of $18.45 or more are beyond 64 bits, which orjson refuses to write and reads as a float."""
    big = Decimal("150.123456789012345678")
    run = Run()
    assert run.fold(row("BIG", status="error", cost=big, ts_ms=T0)) == []  # open: its entry holds the fact
    entry = Entry.load(run.state[b"BIG"])
    assert entry.facts[0]["cost_total_usd"] == to_atto(big) and type(entry.facts[0]["cost_total_usd"]) is int
    [emitted] = run.fold(row("BIG", attempt=1, final=True, cost=Decimal("20"), ts_ms=T0 + 5))
    assert emitted["cost_total_usd"] == big + 20 and emitted["cost_wasted_usd"] == big
    assert sum(f["cost_total_usd"] for f in facts_of_detail(emitted["attempts_detail"])) == to_atto(big + 20)
    [single] = run.fold(row("ONE", final=True, cost=big, ts_ms=T0))
    assert facts_of_detail(single["attempts_detail"])[0]["cost_total_usd"] == to_atto(big)


def test_an_entry_is_stored_deflated_and_entries_stored_as_json_still_read():
    """The state value is the entry's JSON deflated against the format's dictionary: about half the bytes."""
    facts = [fact_of(row("L7", status="error")), fact_of(row("L7", attempt=1, cost=Decimal("20.123456789"))),
             fact_of(row("L7", attempt=2, final=True))]
    e = Entry(facts, revision=3, emitted_ids=2, phase=1, due_ms=11)
    stored = e.dump()
    assert stored[0] == 1
    as_json = expand_entry(stored)
    assert as_json.startswith(b"[[[")
    assert len(stored) < 0.6 * len(as_json)
    assert Entry.load(stored) == e == Entry.load(as_json)  # an entry written before compression reads the same
    assert expand_entry(b'[[],0,0,0,5]') == b'[[],0,0,0,5]'  # plain JSON, as entries were stored before
    assert expand_entry(compress_entry(as_json)) == as_json
    with pytest.raises(ValueError, match="format 7"):
        expand_entry(b"\x07" + stored[1:])
