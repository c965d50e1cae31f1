"""Event-time watermarks: the process role's rules per input partition, and the detectors' min over sources."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from streams.detect import DetectConfig, Detector
from streams.watermarks import (
    InputProgress,
    decode_watermarks,
    encode_watermarks,
    is_watermark,
    low_watermark,
)
from tests.factories import clock, request_row

T0 = clock() - timedelta(days=13)  # events of a replay, two weeks before the suite's clock
MS = 1000
WALL = clock().timestamp()  # the replay's wall clock


def ms(t: datetime) -> int:
    return int(t.timestamp() * MS)


def test_a_watermark_message_round_trips_and_is_told_from_request_rows() -> None:
    value = encode_watermarks({2: 1_000, 0: 5_000}, 4)
    assert is_watermark(value) and not is_watermark(b'{"logical_request_id":"lr-1"}') and not is_watermark(None)
    assert decode_watermarks(value) == ({0: 5_000, 2: 1_000}, 4)
    with pytest.raises(ValueError, match="outside"):
        decode_watermarks(encode_watermarks({7: 1}, 4))
    with pytest.raises(ValueError, match="malformed"):
        decode_watermarks(b'{"watermark": 3}')


def test_the_low_watermark_is_the_minimum_over_every_source() -> None:
    assert low_watermark({0: 50, 1: 20, 2: 90}, 3) == 20
    assert low_watermark({0: 50, 2: 90}, 3) == 0  # partition 1 never heard from holds it


def test_after_a_batch_the_mark_is_the_fold_clock_less_the_settle_time_and_never_goes_back() -> None:
    progress = InputProgress(settle_ms=30_000, idle_s=5.0)
    assert progress.after_batch([0], {0: ms(T0)}, WALL) == {0: ms(T0) - 30_000}
    assert progress.after_batch([0], {0: ms(T0) - 60_000}, WALL) == {}  # a rebuilt, older clock moves nothing
    assert progress.marks == {0: ms(T0) - 30_000}


def test_a_row_stamped_ahead_of_the_wall_clock_moves_the_mark_no_further_than_the_wall_clock() -> None:
    progress = InputProgress(settle_ms=30_000, idle_s=5.0)
    ahead = int((WALL + 3600) * MS)
    assert progress.after_batch([0], {0: ahead}, WALL) == {0: int(WALL * MS) - 30_000}


def test_an_idle_but_lagging_partition_never_advances() -> None:
    progress = InputProgress(settle_ms=30_000, idle_s=5.0)
    progress.after_batch([0, 1], {0: ms(T0), 1: ms(T0)}, WALL)
    # A minute later, no batch has finished for either, but partition 1 still has input to read (a backlog).
    silent = progress.silent([0, 1], caught_up=[0], wall=WALL + 60)
    assert silent == [0]
    moved = progress.idle(silent, WALL + 60)
    assert set(moved) == {0} and progress.marks[1] == ms(T0) - 30_000


def test_a_slow_batch_never_advances_a_clock() -> None:
    # Silence is measured from when a batch finished, not from when it started: a batch that took 18 s leaves its
    # partitions silent for 0 s, whatever the wall clock did meanwhile.
    progress = InputProgress(settle_ms=30_000, idle_s=5.0)
    started = WALL
    finished = started + 18.0
    progress.after_batch([0], {0: ms(T0)}, finished)
    assert progress.silent([0], caught_up=[0], wall=finished + 1.0) == []
    assert progress.marks[0] == ms(T0) - 30_000


def test_a_caught_up_silent_partition_follows_the_wall_clock() -> None:
    progress = InputProgress(settle_ms=30_000, idle_s=5.0)
    progress.after_batch([0], {0: ms(T0)}, WALL)
    silent = progress.silent([0, 3], caught_up=[0, 3], wall=WALL + 6)  # 3: assigned, empty, first seen now
    assert silent == [0]
    assert progress.idle(silent, WALL + 6) == {0: int((WALL + 1) * MS) - 30_000}
    assert progress.silent([3], caught_up=[3], wall=WALL + 12) == [3]


def _evaluated(d: Detector) -> list[tuple[int, float]]:
    assert d.evaluations is not None
    return [(int(e.start), float(e.values["spend_rate"] or 0.0)) for e in d.evaluations if not e.model]


def test_rows_from_a_lagging_source_count_in_their_window_and_nothing_closes_before_every_source_passed() -> None:
    cfg = DetectConfig(window_s=60, lateness_s=60, min_requests=1, warmup_windows=100)
    d = Detector(cfg)
    d.evaluations = []
    # Source 0 has run two hours ahead; source 1's rows of the first minute arrive afterwards.
    ahead = [request_row(T0 + timedelta(hours=2, seconds=s), cost_total_usd="0.5") for s in (1, 2)]
    d.observe(ahead, 0)
    assert d.watermark(0, {0: ms(T0 + timedelta(hours=2))}, 2) == [] and d.evaluations == []
    behind = [request_row(T0 + timedelta(seconds=s), cost_total_usd="0.25", logical_request_id=f"lr-b{s}")
              for s in (5, 10)]
    d.observe(behind, 0)
    assert d.late_rows == 0
    d.watermark(0, {1: ms(T0 + timedelta(minutes=2))}, 2)
    assert _evaluated(d) == [(int(T0.timestamp()), 0.5)]  # both of source 1's rows, in the first minute's rate


def test_a_row_after_its_window_closed_is_late_and_counted_but_changes_no_rate() -> None:
    cfg = DetectConfig(window_s=60, lateness_s=60, min_requests=1, warmup_windows=100)
    d = Detector(cfg)
    d.evaluations = []
    d.observe([request_row(T0 + timedelta(seconds=5), cost_total_usd="1")], 0)
    d.watermark(0, {0: ms(T0 + timedelta(minutes=2))}, 1)
    late = request_row(T0 + timedelta(seconds=30), cost_total_usd="7", logical_request_id="lr-late")
    d.observe([late], 0)
    assert d.late_rows == 1
    d.watermark(0, {0: ms(T0 + timedelta(minutes=3))}, 1)
    assert _evaluated(d) == [(int(T0.timestamp()), 1.0), (int(T0.timestamp()) + 60, 0.0)]


def test_a_re_emitted_request_counts_once() -> None:
    d = Detector(DetectConfig(min_requests=1, warmup_windows=100))
    row = request_row(T0 + timedelta(seconds=5))
    d.observe([row], 0)
    d.observe([row], 0)  # the process role replayed its batch after a crash
    assert d.duplicate_rows == 1
    assert sum(w.requests for w in d.features[row["feature_id"]].open.values()) == 1


def test_watermarks_are_restored_with_the_snapshots() -> None:
    d = Detector(DetectConfig())
    d.observe([request_row(T0)], 0)
    d.watermark(0, {0: ms(T0), 1: ms(T0) + 5}, 2)
    again = Detector(DetectConfig())
    again.restore(d.take_dirty(), {"summarize_email_v2": 0}, {0: d.marks_of(0)})
    assert again.clocks[0] == ms(T0) / MS and again.marks[0] == {0: ms(T0), 1: ms(T0) + 5}
