"""The stack detection bench's pure helpers: anomalies rows → pages, pacing, kill marks, detect settings, scoring."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from ops.simulate import INCIDENT_KINDS, Incident
from streams.detect import DetectConfig
from tally.config import load_settings
from tests.bench.detect import quantile, score, side_by_side
from tests.bench.detect_stack import (
    compare_pages,
    detect_env,
    event_time_order,
    kill_points,
    line_time,
    pace_schedule,
    pages_from_anomalies,
    parse_time,
)
from tests.factories import clock

T0 = clock() - timedelta(hours=6)  # 06:00 UTC of the suite's day (tests.factories.clock)


def api(minutes: float) -> str:
    """T0 + minutes as the query API spells a DateTime64(3): '2026-11-02 06:12:00.000'."""
    return (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def iso(seconds: float) -> str:
    """T0 + seconds as an event timestamp: '2026-11-02T06:00:00.500Z'."""
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row(incident: str, at: str, state: str = "firing", severity: str = "warning",
        feature: str = "search_answer") -> dict[str, str]:
    return {"feature_id": feature, "signal": incident.split(":")[1], "state": state, "severity": severity,
            "incident_id": incident, "detected_at": at}


def test_parse_time_reads_the_api_and_event_spellings_as_utc():
    want = T0 + timedelta(minutes=31, milliseconds=500)
    assert parse_time(api(31 + 0.5 / 60)) == want
    assert parse_time(iso(31 * 60 + 0.5)) == want
    assert parse_time((want + timedelta(hours=1)).replace(tzinfo=None).isoformat(timespec="milliseconds")
                      + "+01:00") == want
    assert parse_time(want.replace(tzinfo=None)) == want


def test_a_page_per_incident_at_its_first_firing_row_resolved_rows_ignored():
    rows = [
        row("search_answer:cost_per_request:100", api(20), severity="critical"),
        row("search_answer:cost_per_request:100", api(12)),  # first: the page
        row("search_answer:cost_per_request:100", api(90), state="resolved"),
        row("smart_reply:retry_rate:200", api(180), feature="smart_reply"),
        row("smart_reply:retry_rate:300", api(-180), state="resolved", feature="smart_reply"),
    ]
    got = pages_from_anomalies(rows, prefix="7/")
    assert got.pages == [("7/search_answer", T0 + timedelta(minutes=12), "search_answer:cost_per_request:100"),
                         ("7/smart_reply", T0 + timedelta(hours=3), "smart_reply:retry_rate:200")]
    assert got.firing_rows == 3
    assert got.repeated_rows == {} and got.refired == {}  # an escalation to critical is not a duplicate


def test_a_firing_record_stored_twice_is_a_repeat_and_a_second_detected_at_a_refire():
    iid = "search_answer:spend_rate:100"
    rows = [row(iid, api(12)), row(iid, api(12)), row(iid, api(40))]
    got = pages_from_anomalies(rows)
    assert got.pages == [("search_answer", T0 + timedelta(minutes=12), iid)]
    assert got.repeated_rows == {iid: 1}
    assert got.refired == {iid: 1}


def test_compare_pages_by_incident_and_time():
    a = [("f", T0, "i1"), ("g", T0 + timedelta(minutes=5), "i2")]
    b = [("f", T0, "i1"), ("g", T0 + timedelta(minutes=6), "i2")]
    assert compare_pages(a, list(reversed(a)))["same"]
    diff = compare_pages(a, b)
    assert not diff["same"] and diff["common"] == 1
    day = T0.strftime("%d")
    assert diff["only_here"] == [f"i2@{day} 06:05"] and diff["only_there"] == [f"i2@{day} 06:06"]


def test_pace_schedule_runs_event_time_faster_and_never_goes_back():
    assert pace_schedule([1000.0, 1060.0, 1030.0, 1600.0], speedup=60) == [0.0, 1.0, 1.0, 10.0]
    assert pace_schedule([], 10) == []
    with pytest.raises(ValueError):
        pace_schedule([1.0], 0)


def test_event_time_order_is_stable():
    def line(ts: str, eid: str) -> bytes:
        return orjson.dumps({"event_id": eid, "timestamp": ts})
    lines = [line(iso(2), "a"), line(iso(1), "b"), line(iso(2), "c"), line(iso(0.5), "d")]
    assert [orjson.loads(x)["event_id"] for x in event_time_order(lines)] == ["d", "b", "a", "c"]
    assert line_time(lines[3]) == (T0 + timedelta(milliseconds=500)).timestamp()


def test_kill_points_split_the_stream_evenly():
    assert kill_points(400, 3) == [100, 200, 300]
    assert kill_points(10, 1) == [5]
    assert kill_points(0, 2) == []


def test_detect_env_gives_a_worker_the_offline_config():
    config = DetectConfig(window_s=30, lateness_s=15, min_requests=10, warmup_windows=12)
    env = detect_env(config)
    settings = load_settings(env)
    assert (settings.detect_window_s, settings.detect_lateness_s, settings.detect_min_requests,
            settings.detect_warmup_windows) == (30, 15, 10, 12)
    with pytest.raises(ValueError, match="cusum_h"):
        detect_env(DetectConfig(cusum_h=9.0))


def test_score_reports_p90_delay_per_kind():
    start = T0
    incidents = [Incident("retry_storm", "f", start, start + timedelta(hours=1)),
                 Incident("retry_storm", "g", start + timedelta(hours=2), start + timedelta(hours=3))]
    incidents += [Incident(k, "z", start, start + timedelta(hours=1)) for k in INCIDENT_KINDS if k != "retry_storm"]
    pages = [("f", start + timedelta(minutes=10), "a"), ("g", start + timedelta(hours=2, minutes=30), "b"),
             ("h", start, "c")]
    got = score(pages, incidents, timedelta(minutes=15))
    kind = got["per_kind"]["retry_storm"]
    assert kind["recall"] == 1.0 and kind["delay_min"] == 20.0
    assert kind["p90_delay_min"] == pytest.approx(28.0)  # 10 + 0.9 × (30 − 10)
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["per_kind"]["runaway_loop"] == {"recall": 0.0, "delay_min": None, "p90_delay_min": None}
    assert quantile([], 0.9) is None and quantile([4.0], 0.9) == 4.0


def test_side_by_side_shows_each_mode_and_the_difference_to_offline():
    def result(precision: float, recall: float) -> dict[str, object]:
        per_kind = {k: {"recall": recall, "delay_min": 12.0, "p90_delay_min": 20.0} for k in INCIDENT_KINDS}
        return {"tally": {"pages": 10, "true_pages": 8, "precision": precision, "recall": recall,
                          "median_delay_all_min": 12.0, "p90_delay_min": 20.0, "per_kind": per_kind}}
    text = side_by_side({"offline": result(0.8, 0.75), "backfill": result(0.78, 0.75), "paced": result(0.5, 0.5)})
    assert "offline" in text and "backfill" in text and "paced" in text
    within = next(line for line in text.splitlines() if line.startswith("within 0.05"))
    assert within.split("|")[2].strip().startswith("yes")  # backfill: 0.02 off in precision
    assert within.split("|")[3].strip() == "NO (max Δ 0.30)"  # paced: precision 0.30 and recall 0.25 off
    assert "-0.250" in next(line for line in text.splitlines() if line.startswith("Δ recall"))
