from streams.positions import (
    PositionGuard,
    SoughtOffsets,
    StallWatch,
    encode_offset,
    is_position_key,
    last_offsets,
    position_key,
    position_partition,
    positions_in_state,
)
from streams.records import Source


def _batch(*pairs: tuple[int, int]) -> list[tuple[bytes | None, Source]]:
    return [(f"{p}:{o}".encode(), Source("t", p, o)) for p, o in pairs]


def test_position_keys_name_their_partition_and_are_not_state():
    key = position_key(7)
    assert is_position_key(key) and position_partition(key) == 7
    assert not is_position_key(b"lr-7")
    state = {key: encode_offset(41), position_key(2): encode_offset(9), b"lr-1": b"{}", position_key(3): None}
    assert positions_in_state(state) == {7: 41, 2: 9}


def test_last_offsets_takes_the_highest_per_partition():
    assert last_offsets(s for _, s in _batch((0, 5), (1, 3), (0, 9), (0, 7))) == {0: 9, 1: 3}


def test_guard_passes_contiguous_input_and_skips_replayed_input():
    guard = PositionGuard("t")
    guard.reset({0: 9}, [0, 1], {1: 40})
    got = guard.admit(_batch((0, 8), (0, 9), (0, 10), (0, 11), (1, 40), (1, 41)))
    assert [(s.partition, s.offset) for _, s in got.messages] == [(0, 10), (0, 11), (1, 40), (1, 41)]
    assert got.replayed == 2 and got.rewind == {}
    assert guard.expected == {0: 12, 1: 42}


def test_guard_rewinds_a_partition_whose_input_was_skipped():
    guard = PositionGuard("t")
    guard.reset({0: 9, 1: 0}, [0, 1], {})
    guard.admit(_batch((0, 10)))  # the stored position's next offset arrived: what follows is in order
    got = guard.admit(_batch((0, 14), (0, 15), (1, 1)))
    # offsets 11..13 never arrived: 14 and the rest of partition 0 wait until the rewind delivers them
    assert [(s.partition, s.offset) for _, s in got.messages] == [(1, 1)]
    assert got.rewind == {0: 11} and guard.gaps == 1
    again = guard.admit(_batch((0, 11), (0, 12)))
    assert [s.offset for _, s in again.messages] == [11, 12] and again.rewind == {}


def test_guard_without_a_stored_position_starts_at_the_first_offset_the_log_holds():
    guard = PositionGuard("t")
    assert guard.reset({}, [0], {0: 500}) == {0: 500}
    got = guard.admit(_batch((0, 500), (0, 501)))
    assert len(got.messages) == 2 and guard.expected == {0: 502}


def test_guard_holds_input_back_until_its_positions_are_read():
    """Faust fetches from Kafka's committed offsets before tally has read its own: nothing may be admitted then.

    The case that lost rows: a restarted worker admitted a message from the committed offset (past its stored
    position) before its guard was reset, stored that message's position, and crashed before the replay of the
    input in between; the next worker resumed after it.
    """
    guard = PositionGuard("t")
    early = guard.admit(_batch((0, 6), (0, 7)))
    assert early.messages == [] and early.held == 2 and guard.expected == {}
    assert guard.reset({0: 3}, [0], {}) == {0: 4}
    # a message fetched before the seek arrives after the reset: rewound to the stored position, not an alarm
    stale = guard.admit(_batch((0, 7)))
    assert stale.messages == [] and stale.rewind == {0: 4} and guard.gaps == 0
    got = guard.admit(_batch((0, 4), (0, 5), (0, 6)))
    assert [s.offset for _, s in got.messages] == [4, 5, 6]
    # once the expected offset arrived, a jump is input skipped upstream
    assert guard.admit(_batch((0, 9))).rewind == {0: 7} and guard.gaps == 1
    guard.hold()  # the next assignment
    assert guard.admit(_batch((0, 7))).held == 1 and guard.expected == {0: 7}


def test_records_fetched_before_a_seek_are_passed_over_until_the_sought_one_arrives():
    """Faust notes each delivered offset as read and drops anything below it: a record fetched before a seek and
    delivered after it made Faust drop the records the seek fetched again (a partition stalled)."""
    sought = SoughtOffsets(limit=3)
    assert sought.deliver("t[0]", 52)  # nothing sought: everything passes
    sought.seek("t[0]", 28)
    assert [o for o in (53, 54, 28, 29) if sought.deliver("t[0]", o)] == [28, 29]
    assert sought.deliver("t[1]", 7)  # other partitions are not held
    sought.seek("t[0]", 10)  # the log no longer holds 10: after `limit` records delivery resumes
    assert [o for o in (40, 41, 42, 43, 44) if sought.deliver("t[0]", o)] == [43, 44]


def test_a_partition_whose_fetched_input_is_never_delivered_is_suspected_after_a_while():
    watch = StallWatch(after_s=15.0)
    # caught up (high watermark at the expected offset), or Faust delivered past it: never a stall
    assert not watch.suspect("t[0]", 39, 39, 38, now=0.0)
    assert not watch.suspect("t[0]", 39, 55, 54, now=100.0)
    # input waits, nothing delivered past the expected offset: suspected only once it has lasted after_s
    assert not watch.suspect("t[0]", 39, 55, 39, now=200.0)
    assert not watch.suspect("t[0]", 39, 55, 39, now=210.0)
    assert watch.suspect("t[0]", 39, 55, 39, now=215.0)
    assert not watch.suspect("t[0]", 39, 55, 39, now=220.0)  # at most once per after_s
    assert watch.suspect("t[0]", 39, 55, 39, now=230.0)
    assert not watch.suspect("t[0]", 39, 55, 60, now=231.0)  # delivered again: forgotten
    assert not watch.suspect("t[0]", 39, 55, 39, now=240.0)
