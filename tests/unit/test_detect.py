"""The detect stage's logic: warm-up, persistence, resolution, attribution, snapshots, replays."""

from __future__ import annotations

import pickle
import random
import re
from array import array
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from streams.detect import (
    DETECT_COLUMNS,
    Baseline,
    DetectConfig,
    Detector,
    Window,
    dump_state,
    load_state,
    observed_rows,
    observed_table,
    request_vector,
)
from streams.sink_columns import REQUEST_SCHEMA
from tests.bench.detect import ZScoreBaseline
from tests.factories import request_row

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
CONFIG = DetectConfig(warmup_windows=20, min_requests=20)
Shape = Callable[[random.Random, datetime, int], dict[str, Any]]


def normal(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
    """Ordinary traffic: noisy costs and tokens, a few retries, two tenants, one model."""
    return request_row(ts, cost_total_usd=f"{rng.uniform(0.008, 0.012):.6f}", output_tokens=rng.randint(150, 250),
                       reasoning_tokens=rng.randint(40, 60), retries=1 if rng.random() < 0.05 else 0,
                       tenant_id=rng.choice(("t-1", "t-2")), logical_request_id=f"lr-{ts.timestamp()}-{i}")


def stream(minutes: int, per_minute: int = 30, shape: Shape = normal, start: datetime = T0,
           seed: int = 1) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for m in range(minutes):
        for i in range(per_minute):
            yield shape(rng, start + timedelta(minutes=m, seconds=i * 60 / per_minute), m * per_minute + i)


def feed(detector: Detector, rows: Iterator[dict[str, Any]], per_batch: int = 50) -> list[dict[str, Any]]:
    """One source, in order: each batch's rows, then a watermark at its latest row (what a live partition sends)."""
    alerts: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == per_batch:
            detector.observe(batch, 0)
            alerts += detector.advance(0, live(batch))
            batch = []
    detector.observe(batch, 0)
    return alerts + detector.advance(0, live(batch))


def live(rows: list[dict[str, Any]]) -> float:
    """The wall clock of a live stream: the time of its latest row (T0 when there is none)."""
    return max((datetime.fromisoformat(r["last_ts"]).timestamp() for r in rows), default=T0.timestamp())


def storm(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
    row = normal(rng, ts, i)
    row["retries"] = rng.randint(1, 3) if rng.random() < 0.7 else 0
    return row


def test_a_sustained_retry_storm_pages_once_then_resolves() -> None:
    d = Detector(CONFIG)
    assert feed(d, stream(60)) == []
    fired = feed(d, stream(10, shape=storm, start=T0 + timedelta(minutes=60)))
    assert [(a["signal"], a["state"]) for a in fired] == [("retry_rate", "firing")]
    alert = fired[0]
    assert alert["incident_key"] == "anomaly:summarize_email_v2:retry_rate"
    assert alert["value"] > 0.8 and alert["baseline"] < 0.1 and alert["severity"] == "critical"
    assert re.fullmatch(r"retry rate of summarize_email_v2 rose from 0\.0\d+ to 1\.\d+", alert["explanation"])
    # At least two windows: one window can never page on its own.
    assert datetime.fromisoformat(alert["detected_at"]) >= T0 + timedelta(minutes=62)
    resolved = feed(d, stream(15, start=T0 + timedelta(minutes=70)))
    assert [(a["signal"], a["state"]) for a in resolved] == [("retry_rate", "resolved")]
    assert resolved[0]["incident_id"] == alert["incident_id"]


def test_nothing_pages_during_warm_up() -> None:
    d = Detector(CONFIG)
    assert feed(d, stream(5)) == []
    assert feed(d, stream(10, shape=storm, start=T0 + timedelta(minutes=5))) == []


def test_one_huge_request_does_not_page() -> None:
    d = Detector(CONFIG)
    feed(d, stream(60))

    def one_huge(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        row = normal(rng, ts, i)
        if i == 1805:
            row.update(cost_total_usd="25.0", output_tokens=90_000)
        return row
    assert feed(d, stream(20, shape=one_huge, start=T0 + timedelta(minutes=60))) == []


def test_the_dimension_that_moved_is_named() -> None:
    d = Detector(CONFIG)
    feed(d, stream(60, shape=lambda r, ts, i: {**normal(r, ts, i), "final_model": r.choice(("gpt-4.1", "o4-mini"))}))

    def o4_thinks(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        row = {**normal(rng, ts, i), "final_model": rng.choice(("gpt-4.1", "o4-mini")), "deploy_version": "2026.11.3"}
        if row["final_model"] == "o4-mini":
            row["reasoning_tokens"] = 1500
        return row
    fired = [a for a in feed(d, stream(8, shape=o4_thinks, start=T0 + timedelta(minutes=60)))
             if a["signal"] == "reasoning_share"]
    assert fired and fired[0]["dimension"] == "model" and fired[0]["dimension_value"] == "o4-mini"
    assert "since deploy 2026.11.3" in fired[0]["explanation"]
    assert fired[0]["explanation"].endswith("driven by model o4-mini")


def test_a_runaway_tenant_is_named() -> None:
    d = Detector(CONFIG)
    feed(d, stream(60))

    def loop(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        return {**normal(rng, ts, i), "tenant_id": "t-9" if i % 3 else "t-1"}
    rows = list(stream(60, per_minute=30, seed=3, start=T0 + timedelta(minutes=60)))
    rows += [loop(random.Random(i), T0 + timedelta(minutes=60, seconds=i // 4), i) for i in range(60, 60 + 4 * 360)]
    rows.sort(key=lambda r: r["last_ts"])
    fired = [a for a in feed(d, iter(rows)) if a["signal"] == "tenant_request_rate"]
    assert fired and fired[0]["dimension_value"] == "t-9"
    assert "tenant t-9 sends" in fired[0]["explanation"]


def test_a_restored_snapshot_continues_with_the_same_scores() -> None:
    rows = list(stream(90, shape=lambda r, ts, i: storm(r, ts, i) if ts >= T0 + timedelta(minutes=70)
                       else normal(r, ts, i)))
    whole = Detector(CONFIG)
    expected = feed(whole, iter(rows))
    first = Detector(CONFIG)
    alerts = feed(first, iter(rows[:1500]))
    snapshots = first.take_dirty()
    second = Detector(CONFIG)
    second.restore(snapshots, {fid: 0 for fid in snapshots})
    second.clocks = dict(first.clocks)
    alerts += feed(second, iter(rows[1500:]))
    assert alerts == expected and expected
    fid = "summarize_email_v2"
    for name, b in whole.features[fid].baselines.items():
        other = second.features[fid].baselines[name]
        assert (b.mean.get(), b.var.get(), b.n, b.cusum) == (other.mean.get(), other.var.get(), other.n, other.cusum)


def test_a_replayed_batch_raises_the_same_incident() -> None:
    rows = list(stream(75, shape=lambda r, ts, i: storm(r, ts, i) if ts >= T0 + timedelta(minutes=66)
                       else normal(r, ts, i)))
    d = Detector(CONFIG)
    feed(d, iter(rows[:1950]))
    snapshot = d.take_dirty()
    clocks = dict(d.clocks)
    first = feed(d, iter(rows[1950:]))
    again = Detector(CONFIG)
    again.restore(snapshot, {fid: 0 for fid in snapshot})
    again.clocks = clocks
    second = feed(again, iter(rows[1950:]))
    assert first and [a["incident_key"] for a in first] == [a["incident_key"] for a in second]
    assert [a["incident_id"] for a in first] == [a["incident_id"] for a in second]


def test_a_row_stamped_far_in_the_future_does_not_silence_its_partition() -> None:
    # Issue 11: one request stamped 2099-06-01 used to carry the partition's clock there: every window of every
    # feature on the partition jumped to 2099 and nothing alerted any more. Rows no longer move clocks at all.
    d = Detector(CONFIG)
    assert feed(d, stream(60)) == []
    wall = T0 + timedelta(minutes=60)
    clock = d.clocks[0]
    ahead = request_row(wall + timedelta(days=26_000), feature_id="clock_skewed_feature")  # decades ahead
    d.observe([ahead], 0)
    assert d.clocks[0] == clock and d.advance(0, clock) == []
    fired = feed(d, stream(10, shape=storm, start=wall))
    assert [(a["signal"], a["state"]) for a in fired] == [("retry_rate", "firing")]


def test_a_snapshot_with_a_window_in_the_future_is_repaired_on_restore() -> None:
    # A snapshot taken before row times were capped can hold a window opened by a row stamped 2099 (and the restored
    # clock would start there): the window moves to the wall clock's, so the feature is judged again.
    before = Detector(CONFIG)
    feed(before, stream(60))
    ahead = T0 + timedelta(days=26_000)  # decades past the injected clock
    before.observe([request_row(ahead)], 0)
    before.advance(0, ahead.timestamp() + 200)  # what an uncapped clock did: the window opened in 2099
    snapshots = before.take_dirty()
    wall = T0 + timedelta(minutes=60)
    d = Detector(CONFIG)
    d.restore(snapshots, {fid: 0 for fid in snapshots}, now=wall.timestamp())
    window = d.features["summarize_email_v2"].window
    assert window is not None and window.start <= wall.timestamp() < window.end
    assert d.clocks.get(0, 0.0) <= wall.timestamp() and "summarize_email_v2" in d.take_dirty()
    fired = feed(d, stream(10, shape=storm, start=wall))
    assert [(a["signal"], a["state"]) for a in fired] == [("retry_rate", "firing")]


def as_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Request rows (decoded JSON) as the detect role reads an Arrow requests message: DETECT_COLUMNS' columns."""
    schema = pa.schema([REQUEST_SCHEMA.field(c) for c in DETECT_COLUMNS])
    typed = [{**r, "cost_total_usd": Decimal(r["cost_total_usd"]),
              "last_ts": datetime.fromisoformat(r["last_ts"])} for r in rows]
    return pa.Table.from_pylist(typed, schema=schema)


def test_an_arrow_message_is_observed_as_its_json_rows_are() -> None:
    """observed_table (the Arrow hand-off, column by column) gives exactly what observed_rows gives for the JSON rows:
    the same floats to the last bit, the same skips (revision 2, sign -1, no feature), empty text for a null."""
    rng = random.Random(7)
    rows = [normal(rng, T0 + timedelta(milliseconds=1_234_567 * i), i) for i in range(40)]
    rows[3]["cost_total_usd"] = "0.123456789012345678"  # 18 decimals: the float of the text, not of a rounded double
    rows[4].update(cache_read_tokens=5_000, cache_write_tokens=7, cache_write_1h_tokens=11, fallbacks=2, retries=3)
    rows[5]["deploy_version"] = ""
    rows[12].update(deploy_version=None, team_id=None)  # a null: empty text, as `or ""` makes of it
    rows[6].update(revision=2)
    rows[7].update(sign=-1)
    rows[8].update(feature_id="")
    rows[9]["logical_request_id"] = rows[10]["logical_request_id"]
    rows[11]["final_model"] = "claude-opus-4-1"
    expected = [(*o[:3], request_vector(o[3]), *o[4:]) for o in observed_rows(rows)]  # JSON rows' sums read late
    assert len(expected) == 37 and expected[12 - 3][4][3] == expected[12 - 3][5] == ""
    assert observed_table(as_table(rows)) == expected
    assert observed_table(as_table(rows[6:9])) == []


def test_a_detector_fed_arrow_tables_pages_and_snapshots_as_one_fed_json_rows() -> None:
    by_rows, by_tables = Detector(CONFIG), Detector(CONFIG)
    rows = [*stream(60), *stream(10, shape=storm, start=T0 + timedelta(minutes=60))]
    alerts: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    for start in range(0, len(rows), 50):
        batch = rows[start:start + 50]
        by_rows.observe(batch, 0)
        by_tables.observe_table(as_table(batch), 0)
        alerts[0].extend(by_rows.advance(0, live(batch)))
        alerts[1].extend(by_tables.advance(0, live(batch)))
    assert [(a["signal"], a["state"]) for a in alerts[0]] == [("retry_rate", "firing")]
    assert alerts[0] == alerts[1]
    snapshots = by_rows.take_dirty(), by_tables.take_dirty()
    assert snapshots[0].keys() == snapshots[1].keys() == {"summarize_email_v2"}
    # equal state, not equal bytes: pickle shares a string object it meets twice, and Arrow makes one per row
    assert (plain(load_state(snapshots[0]["summarize_email_v2"]))
            == plain(load_state(snapshots[1]["summarize_email_v2"])))


def test_a_batch_adds_to_its_sums_bit_for_bit_as_row_by_row() -> None:
    """Sums gathered over a batch (numpy, in arrival order) end where adding each row alone ends: a replay cut into
    other batches keeps every float, snapshot and alert."""
    rows = [*stream(60, per_minute=90), *stream(10, per_minute=90, shape=storm, start=T0 + timedelta(minutes=60))]
    one_by_one, batched = Detector(CONFIG), Detector(CONFIG)
    alerts: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
    for start in range(0, len(rows), 300):
        batch = rows[start:start + 300]
        for row in batch:
            one_by_one.observe([row], 0)
        batched.observe(batch, 0)
        alerts[0].extend(one_by_one.advance(0, live(batch)))
        alerts[1].extend(batched.advance(0, live(batch)))
    assert [(a["signal"], a["state"]) for a in alerts[0]] == [("retry_rate", "firing")]
    assert alerts[0] == alerts[1]
    assert (plain(load_state(one_by_one.take_dirty()["summarize_email_v2"]))
            == plain(load_state(batched.take_dirty()["summarize_email_v2"])))


def plain(x: Any) -> Any:
    """A detector state as plain values (floats compared exactly), whatever objects hold them."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | array):
        return [plain(v) for v in x]
    if isinstance(x, set):
        return sorted(x)
    if hasattr(x, "__dict__") or hasattr(x, "__dataclass_fields__"):
        names = getattr(x, "__dataclass_fields__", None) or vars(x)
        return {type(x).__name__: {k: plain(getattr(x, k)) for k in names}}
    if isinstance(x, str | int | float | bool | None):
        return x
    return pickle.dumps(x)  # river's statistics (Rust objects): their pickled state


def test_a_duplicate_is_passed_over_before_its_sums_are_read() -> None:
    """A re-emitted JSON row lacking a summed field is a duplicate, not an error (as before the columns)."""
    d = Detector(CONFIG)
    row = request_row(T0)
    again = {k: v for k, v in row.items() if k != "cost_total_usd"}
    d.observe([row, again], 0)
    assert d.duplicate_rows == 1


def test_sums_from_an_older_snapshot_held_as_lists_count_a_batch_alike() -> None:
    """Snapshots written before the sums were arrays hold lists; a batch adds to them as to arrays."""
    rows = [normal(random.Random(i), T0 + timedelta(seconds=i), i) for i in range(30)]
    as_arrays, as_lists = Window(0, 10**10), Window(0, 10**10)
    as_lists.total = [0.0] * 7  # type: ignore[assignment]
    as_lists.by["model"]["gpt-4.1"] = [0.0] * 7  # type: ignore[assignment]
    for w in (as_arrays, as_lists):
        w.count_all([request_vector(r) for r in rows], [("gpt-4.1", r["tenant_id"], "/e", "v") for r in rows],
                    ["inbox"] * len(rows))
    assert list(as_lists.total) == list(as_arrays.total) and as_lists.total[0] == 30.0
    assert plain(as_lists.by) == plain(as_arrays.by)


def test_revisions_are_counted_once() -> None:
    d = Detector(CONFIG)
    d.evaluations = []
    row = request_row(T0)
    d.observe([row, {**row, "revision": 2}, {**row, "revision": 1, "sign": -1}, row], 0)
    state = d.features["summarize_email_v2"]
    assert sum(w.requests for w in state.open.values()) == 1 and d.duplicate_rows == 1


def test_a_batch_spanning_windows_closes_them_in_order() -> None:
    d = Detector(DetectConfig(warmup_windows=1, min_requests=1))
    d.evaluations = []
    rows = list(stream(5, per_minute=10))
    d.observe(rows, 0)
    d.advance(0, live(rows))  # 4 min 54 s
    closed = [e for e in d.evaluations if not e.model]
    assert [(e.end - e.start) for e in closed] == [60, 60, 60]  # minutes 0-2 closed (lateness 60 s)


def test_an_idle_partition_advances_and_closes_its_windows() -> None:
    d = Detector(DetectConfig(warmup_windows=1, min_requests=1))
    d.evaluations = []
    rows = list(stream(1, per_minute=10))
    d.observe(rows, 0)
    assert d.advance(0, live(rows)) == [] and d.evaluations == []
    d.advance(0, (T0 + timedelta(minutes=30)).timestamp())
    spent = sum(float(r["cost_total_usd"]) for r in rows)
    closed = [e for e in d.evaluations if not e.model]
    assert closed[0].values["spend_rate"] == pytest.approx(spent)  # one minute: USD per minute
    assert [e.values["spend_rate"] for e in closed[1:]] == [0.0] * (len(closed) - 1)


def test_snapshots_refuse_a_foreign_version() -> None:
    d = Detector(CONFIG)
    d.observe([request_row(T0)], 0)
    blob = d.take_dirty()["summarize_email_v2"]
    assert load_state(blob).feature_id == "summarize_email_v2"
    assert load_state(dump_state(load_state(blob))).by_model.keys() == {"gpt-4.1"}
    with pytest.raises(ValueError, match="version"):
        load_state(b"\x09" + blob[1:])


def test_the_seed_baseline_flags_any_request_two_sigma_out() -> None:
    z = ZScoreBaseline()
    assert not any(z.observe("f", 0.01 + (i % 5) * 0.001) for i in range(50))
    assert z.observe("f", 0.05)


def test_a_model_with_a_minority_share_has_its_own_detectors() -> None:
    def mixed(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        return {**normal(rng, ts, i), "final_model": "o4-mini" if i % 5 == 0 else "gpt-4.1"}
    d = Detector(CONFIG)
    feed(d, stream(60, per_minute=50, shape=mixed))

    def o4_costs_more(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        row = mixed(rng, ts, i)
        if row["final_model"] == "o4-mini":
            row["cost_total_usd"] = f"{3 * float(row['cost_total_usd']):.6f}"
        return row
    fired = feed(d, stream(30, per_minute=50, shape=o4_costs_more, start=T0 + timedelta(minutes=60)))
    keys = {a["incident_key"] for a in fired if a["state"] == "firing"}
    # The feature's median cost per request does not move (80 % of requests are unchanged); its o4-mini share does.
    assert "anomaly:summarize_email_v2@o4-mini:cost_per_request" in keys
    assert "anomaly:summarize_email_v2:cost_per_request" not in keys
    alert = next(a for a in fired if a["incident_key"].endswith("@o4-mini:cost_per_request"))
    assert alert["explanation"].startswith("median cost per request of summarize_email_v2 on o4-mini rose from $0.01")
    assert (alert["feature_id"], alert["dimension"], alert["dimension_value"]) == ("summarize_email_v2", "model",
                                                                                   "o4-mini")


def test_a_silent_hour_in_the_daily_profile_divides_nothing_by_zero() -> None:
    d = Detector(DetectConfig(warmup_windows=1, min_requests=1, seasonal_min_samples=0))
    d.observe([request_row(T0)], 0)
    d.features["summarize_email_v2"].season = [0.0] * 24  # learned from hours with no spend at all
    d.evaluations = []
    d.advance(0, (T0 + timedelta(days=2)).timestamp())  # two idle days: windows of zero spend
    assert d.evaluations and all(e.values["spend_rate"] == 0.0 for e in d.evaluations[1:] if not e.model)


def test_a_long_silence_is_skipped_after_the_empty_windows_that_resolve() -> None:
    cfg = DetectConfig(warmup_windows=1, min_requests=1)
    d = Detector(cfg)
    d.evaluations = []
    d.observe(list(stream(1, per_minute=10)), 0)
    d.advance(0, (T0 + timedelta(days=14)).timestamp())  # old events replayed: two weeks of silence since
    closed = [e for e in d.evaluations if not e.model]
    # the window with traffic, then resolve_after empty 15-minute windows: not 1,344 of them
    assert len(closed) == 1 + cfg.resolve_after
    d.observe([request_row(T0 + timedelta(days=14, seconds=5))], 0)
    assert d.features["summarize_email_v2"].window.start >= (T0 + timedelta(days=14, minutes=-2)).timestamp()


def test_a_snapshot_over_the_limit_keeps_its_signals_and_fits() -> None:
    # A backfill whose input partitions are hours apart leaves hours of open buckets: the snapshot (one message on the
    # detect-state changelog) once reached 4.2 MB, past the producer's request size, and the worker stopped.
    d = Detector(CONFIG)
    rows = [{**r, "final_model": ("gpt-4.1", "o4-mini", "claude-sonnet-4-5")[i % 3], "tenant_id": f"t-{i % 30}"}
            for i, r in enumerate(stream(360, per_minute=10))]
    d.observe(rows, 0)
    state = d.features["summarize_email_v2"]
    whole = dump_state(state)
    trimmed = dump_state(state, limit=len(whole) // 3)
    assert len(trimmed) <= len(whole) // 3
    back = load_state(trimmed)
    assert sum(w.requests for w in back.open.values()) == len(rows)
    assert sum(w.total[1] for w in back.open.values()) == pytest.approx(sum(float(r["cost_total_usd"]) for r in rows))


# A quiet feature: one request a minute, with the spread real traffic has (prompt sizes, costs, reasoning depth).
def quiet(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
    output = rng.randint(100, 400)
    return request_row(ts, cost_total_usd=f"{rng.uniform(0.002, 0.006):.6f}", input_tokens=rng.randint(500, 1500),
                       output_tokens=output, reasoning_tokens=int(output * rng.uniform(0.5, 2.5)),
                       retries=1 if rng.random() < 0.12 else 0, tenant_id=rng.choice(("t-1", "t-2", "t-3")),
                       logical_request_id=f"lr-{ts.timestamp()}-{i}")


def quiet_incident(change: Callable[[random.Random, dict[str, Any]], None], seed: int, hours: int = 8,
                   config: DetectConfig | None = None) -> tuple[list[dict[str, Any]], datetime]:
    """`hours` of a quiet feature, then an hour of incident: what the detectors page, and when it started."""
    start = T0 + timedelta(hours=hours)

    def shape(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        row = quiet(rng, ts, i)
        if ts >= start:
            change(rng, row)
        return row
    d = Detector(config or DetectConfig())
    return feed(d, stream((hours + 1) * 60, per_minute=1, shape=shape, seed=seed), per_batch=1), start


def retry_storm(rng: random.Random, row: dict[str, Any]) -> None:
    row["retries"] = rng.randint(1, 3) if rng.random() < 0.7 else 0


def reasoning_spike(rng: random.Random, row: dict[str, Any]) -> None:
    row["reasoning_tokens"] = (row["reasoning_tokens"] + row["output_tokens"]) * 5


def prompt_regression(rng: random.Random, row: dict[str, Any]) -> None:
    row["input_tokens"] = row["input_tokens"] * 4 + 3000


@pytest.mark.parametrize(("change", "signal"), [(retry_storm, "retry_rate"), (reasoning_spike, "reasoning_share"),
                                                (prompt_regression, "input_per_request")])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_quiet_feature_pages_within_half_an_hour(change: Callable[[random.Random, dict[str, Any]], None],
                                                   signal: str, seed: int) -> None:
    # At one request a minute no 1-minute window holds enough requests to judge a per-request signal: windows are
    # planned to hold volume_requests, so the change shows within a few of them.
    alerts, start = quiet_incident(change, seed)
    pages = [a for a in alerts if a["state"] == "firing" and datetime.fromisoformat(a["detected_at"]) < start]
    assert pages == []  # eight hours of ordinary traffic page nothing
    fired = [a for a in alerts if a["state"] == "firing" and a["signal"] == signal]
    assert fired, f"{signal} never paged"
    delay = datetime.fromisoformat(fired[0]["detected_at"]) - start
    assert timedelta(0) < delay <= timedelta(minutes=30)


def output_inflation(rng: random.Random, row: dict[str, Any]) -> None:
    row["output_tokens"] *= 4


@pytest.mark.parametrize(("change", "signal"), [(retry_storm, "retry_rate"), (reasoning_spike, "reasoning_share"),
                                                (prompt_regression, "input_per_request"),
                                                (output_inflation, "output_input_ratio")])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_warm_quiet_feature_is_judged_request_by_request(
        change: Callable[[random.Random, dict[str, Any]], None], signal: str, seed: int) -> None:
    # Once the sequential tests know the feature (seq_warmup requests), a change shows after a handful of requests,
    # not after several windows of volume_requests: at one request a minute, within a quarter of an hour.
    alerts, start = quiet_incident(change, seed, hours=10)
    assert [a for a in alerts if a["state"] == "firing" and datetime.fromisoformat(a["detected_at"]) < start] == []
    fired = [a for a in alerts if a["state"] == "firing" and a["signal"] == signal]
    assert fired, f"{signal} never paged"
    delay = datetime.fromisoformat(fired[0]["detected_at"]) - start
    assert timedelta(0) < delay <= timedelta(minutes=15), delay
    windowed, _ = quiet_incident(change, seed, hours=10, config=DetectConfig(seq_h=1e9))  # the windows alone
    later = [a for a in windowed if a["state"] == "firing" and a["signal"] == signal]
    assert later and datetime.fromisoformat(later[0]["detected_at"]) - start > delay


def test_a_reasoning_share_is_judged_on_its_odds_and_shown_as_a_share() -> None:
    alerts, _ = quiet_incident(reasoning_spike, 1)
    fired = next(a for a in alerts if a["signal"] == "reasoning_share" and a["state"] == "firing")
    assert 0.4 < fired["baseline"] < 0.7 and 0.85 < fired["value"] < 1.0
    assert re.fullmatch(r"reasoning share of output of summarize_email_v2 rose from \d\d% to 9\d%.*",
                        fired["explanation"])


def test_one_huge_prompt_on_a_quiet_feature_does_not_page() -> None:
    def one_off(rng: random.Random, row: dict[str, Any]) -> None:
        if row["last_ts"].endswith(("16:05:00Z", "16:35:00Z")):
            row["input_tokens"] = row["input_tokens"] * 200 + 100_000  # two pasted documents, half an hour apart
    alerts, _ = quiet_incident(one_off, 1)
    assert [a for a in alerts if a["state"] == "firing"] == []


def test_pages_do_not_depend_on_how_far_one_watermark_moves() -> None:
    # A backfill's watermark moves hours at once, a live one a minute: the same rows must page the same incidents.
    # (The feature's windows used to close all before its models': the models then paged after the feature's
    # incident had resolved, which a live stream never does.)
    def two_models(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
        row = {**normal(rng, ts, i), "final_model": rng.choice(("gpt-4.1", "gpt-4.1", "o4-mini"))}
        if T0 + timedelta(minutes=70) <= ts < T0 + timedelta(minutes=100) and row["final_model"] == "o4-mini":
            row["reasoning_tokens"], row["cost_total_usd"] = 1500, "0.05"
        return row
    rows = list(stream(150, shape=two_models))
    live = Detector(CONFIG)
    stepped = feed(live, iter(rows), per_batch=30)
    backfill = Detector(CONFIG)
    backfill.observe(rows, 0)
    jumped = backfill.advance(0, datetime.fromisoformat(rows[-1]["last_ts"]).timestamp())
    key = [(a["incident_id"], a["state"], a["severity"]) for a in stepped]
    assert key and key == [(a["incident_id"], a["state"], a["severity"]) for a in jumped]


def test_a_small_window_is_judged_by_a_variance_scaled_to_its_requests() -> None:
    # A per-request signal's window of n requests varies about σ²/n: learned on windows of 60 requests (a busy day)
    # and of 6 (the night), the baseline expects the small window to vary ten times as much.
    rng = random.Random(3)
    b = Baseline.new(DetectConfig().fading)
    for i in range(400):
        n = 60 if i % 2 else 6
        b.learn(0.1 + rng.gauss(0.0, 0.05 / n ** 0.5), n)
    assert 8.0 < b.variance(6) / b.variance(60) < 12.0
    assert b.variance(6) == pytest.approx(0.05 ** 2 / 6, rel=0.25)
    assert b.variance() == pytest.approx(b.var.get())  # a rate: the plain variance


def test_two_requests_on_a_new_model_are_no_drift() -> None:
    d = Detector(DetectConfig())
    usual = {"gpt-4.1"}
    w = Window(0, 60)
    for i, model in enumerate(["gpt-4.1"] * 4 + ["claude-opus-4-1"] * 2):
        w.add(request_row(T0 + timedelta(seconds=i), final_model=model, cost_total_usd="0.05" if "opus" in model
                          else "0.01", logical_request_id=f"lr-{i}"))
    assert d._mix(w, usual) == 0.0  # a third of a night's six requests, by chance
    w.add(request_row(T0 + timedelta(seconds=9), final_model="claude-opus-4-1", cost_total_usd="0.05",
                      logical_request_id="lr-9"))
    assert d._mix(w, usual) == pytest.approx(0.15 / 0.19)


def test_a_request_re_emitted_after_its_window_closed_is_counted_once() -> None:
    # After a crash the process role replays its last run and may emit a logical request again, after the detectors
    # have closed its window and tested it: it must not count twice (the windows' own id check no longer reaches it).
    rows = list(stream(90, per_minute=1, shape=quiet))
    d = Detector(DetectConfig())
    feed(d, iter(rows), per_batch=1)
    duplicates = d.duplicate_rows
    d.observe(rows[10:12], 0)  # an hour after their windows closed
    d.advance(0, live(rows) + 600)
    assert d.duplicate_rows == duplicates + 2
    once = Detector(DetectConfig())
    feed(once, iter(rows), per_batch=1)
    once.advance(0, live(rows) + 600)
    tested = d.features["summarize_email_v2"].seq["input_per_request"]
    assert tested.n == once.features["summarize_email_v2"].seq["input_per_request"].n == len(rows)
    assert tested.mean == once.features["summarize_email_v2"].seq["input_per_request"].mean


class OnlyDetectColumns(dict):  # type: ignore[type-arg]
    """A request row that fails any read of a column outside DETECT_COLUMNS (the detect role decodes no others)."""

    def __getitem__(self, key: str) -> Any:
        assert key in DETECT_COLUMNS, f"the detectors read {key!r}, which DETECT_COLUMNS does not name"
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        assert key in DETECT_COLUMNS, f"the detectors read {key!r}, which DETECT_COLUMNS does not name"
        return super().get(key, default)


def test_the_detectors_read_only_the_columns_the_detect_role_decodes() -> None:
    def restricted(shape: Shape) -> Shape:
        def make(rng: random.Random, ts: datetime, i: int) -> dict[str, Any]:
            return OnlyDetectColumns({k: v for k, v in shape(rng, ts, i).items() if k in DETECT_COLUMNS})
        return make

    full, narrow = Detector(CONFIG), Detector(CONFIG)
    expected = feed(full, stream(60)) + feed(full, stream(10, shape=storm, start=T0 + timedelta(minutes=60)))
    got = feed(narrow, stream(60, shape=restricted(normal)))
    got += feed(narrow, stream(10, shape=restricted(storm), start=T0 + timedelta(minutes=60)))
    assert expected and got == expected
