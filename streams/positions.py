"""Input positions tally owns: stored with what a stage produced, recovered on every assignment, checked per batch."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.records import Source

log = logging.getLogger(__name__)

# A position entry in a state table (the fold state): the input partition it covers is in the key, so the entry
# lands on the changelog partition of that input partition, after the state writes the same batch made there.
POSITION_PREFIX = b"\x00position:"


# A detect-state entry holding a requests partition's watermarks (streams.watermarks), beside its position.
WATERMARKS_PREFIX = b"\x00watermarks:"


def watermarks_key(partition: int) -> bytes:
    """The state-table key that holds the watermarks seen on one requests partition."""
    return WATERMARKS_PREFIX + str(partition).encode()


def is_meta_key(key: bytes) -> bool:
    """True for an entry about a partition (its position, its watermarks), not a logical request's or feature's."""
    return key.startswith(b"\x00")


def meta_partition(key: bytes) -> int:
    """The partition a meta entry (position, watermarks) covers: it lives on that changelog partition."""
    return int(key.rsplit(b":", 1)[1])


def position_key(partition: int) -> bytes:
    """The state-table key that holds the position of one input partition."""
    return POSITION_PREFIX + str(partition).encode()


def is_position_key(key: bytes) -> bool:
    """True for a position entry (not a logical request's state)."""
    return key.startswith(POSITION_PREFIX)


def position_partition(key: bytes) -> int:
    """The input partition a position key covers."""
    return int(key[len(POSITION_PREFIX):])


def encode_offset(offset: int) -> bytes:
    """A position entry's value: the offset as ASCII digits."""
    return str(offset).encode()


def decode_offset(value: bytes) -> int:
    """The offset a position entry's value holds."""
    return int(value)


def positions_in_state(state: Mapping[bytes, bytes | None]) -> dict[int, int]:
    """Input partition → last offset whose effects are in this state (the position entries of a state table)."""
    return {position_partition(k): decode_offset(v) for k, v in state.items()
            if is_position_key(k) and v is not None}


def last_offsets(sources: Iterable[Source]) -> dict[int, int]:
    """Partition → the highest offset among these messages' sources."""
    out: dict[int, int] = {}
    for s in sources:
        if s.offset > out.get(s.partition, -1):
            out[s.partition] = s.offset
    return out


def first_offsets(sources: Iterable[Source]) -> dict[int, int]:
    """Partition → the lowest offset among these messages' sources."""
    out: dict[int, int] = {}
    for s in sources:
        if s.offset < out.get(s.partition, s.offset + 1):
            out[s.partition] = s.offset
    return out


def audit_line(topic: str, sources: Sequence[Source], produced: Mapping[str, int]) -> str:
    """The offsets audit record of one batch: its input range per partition and what it produced."""
    first, last = first_offsets(sources), last_offsets(sources)
    ranges = " ".join(f"{topic}[{p}]@{first[p]}..{last[p]}" for p in sorted(last))
    return f"batch {ranges} -> " + " ".join(f"{k}={v}" for k, v in produced.items())


# Records of a partition dropped after a seek before the sought offset must have arrived (a fetch holds at most a
# few thousand); past this the log no longer holds that offset, and the stage's guard sees the gap.
STALE_LIMIT = 50_000


@dataclass
class SoughtOffsets:
    """After a seek, the records of that partition fetched before it are passed over until the sought one arrives.

    Faust's fetch loop can deliver a batch it fetched before a seek after the seek, and notes each delivered offset
    as read; it then drops every record below that, so the records the seek fetched again can be dropped and the
    partition stall until new input comes. A restarted worker was seen leaving 20 messages of three partitions
    unprocessed after a stage rewound them; that this path caused it is not established (the stalls went on with
    this filter in place: RoleContext.unstall heals them, docs/exactly-once.md). Only for tally's own topics: they
    are never compacted, so the sought offset arrives, unless retention removed it (then, after `limit` records,
    delivery resumes and says so).
    """

    limit: int = STALE_LIMIT
    sought: dict[Any, int] = field(default_factory=dict)  # partition → the offset sought, until that record arrives
    stale: dict[Any, int] = field(default_factory=dict)  # records passed over since that seek

    def seek(self, tp: Any, offset: int) -> None:
        self.sought[tp] = offset
        self.stale[tp] = 0

    def deliver(self, tp: Any, offset: int) -> bool:
        """True if the record at `offset` of `tp` is to be delivered (False: fetched before the last seek)."""
        want = self.sought.get(tp)
        if want is None:
            return True
        if offset == want:
            del self.sought[tp]
            return True
        self.stale[tp] += 1
        if self.stale[tp] <= self.limit:
            return False
        log.error("%s: offset %d sought, %d records later it has not arrived (the log no longer holds it?); "
                  "delivering from %d", tp, want, self.limit, offset)
        del self.sought[tp]
        return True


@dataclass
class StallWatch:
    """Partitions whose input waits but is not delivered: fetched past the expected offset, never handed over.

    A last line of defence beside SoughtOffsets: Faust's fetch loop can skip records it fetched (its read offset,
    a partition paused while its batch was being handed over), and the fetch position then sits past input no
    stage has seen; nothing but a seek delivers it again. A partition is stalled when its high watermark and the
    fetch position are past the offset a stage expects, the read offset Faust has delivered up to is not, and that
    has lasted `after_s` (a busy stage never looks so: Faust reads ahead of it).
    """

    after_s: float = 15.0
    since: dict[Any, float] = field(default_factory=dict)

    def suspect(self, tp: Any, want: int, high: int | None, read: int | None, now: float) -> bool:
        """True when `tp` has looked stalled for `after_s` (then ask for the fetch position, and seek)."""
        if high is None or high <= want or (read is not None and read > want):
            self.since.pop(tp, None)
            return False
        first = self.since.setdefault(tp, now)
        if now - first < self.after_s:
            return False
        self.since[tp] = now  # at most one seek per `after_s`
        return True


@dataclass
class Admitted:
    """What a batch is after the position check: the messages to process and the partitions to rewind."""

    messages: list[tuple[bytes | None, Source]]
    replayed: int = 0  # messages at or below the stored position: their effects are saved already
    rewind: dict[int, int] = field(default_factory=dict)  # partition → offset to seek back to (a gap was seen)
    held: int = 0  # messages that arrived while the guard was closed (an assignment not yet recovered)


@dataclass
class PositionGuard:
    """Per-partition next expected offset of one consumer of one topic, from the stored position on.

    Closed from its creation, and again from the start of every assignment (`hold`), until `reset` gives it the
    stored positions: Faust resumes fetching from Kafka's committed offsets before tally has read its own, and a
    message admitted then, against no expectation or a stale one, could move the stored position past input that
    was never processed (seen: a restarted worker stored a position past a message it never wrote, then crashed;
    the next one resumed after it). Input that arrives while closed is held back, not processed: the seek to the
    stored positions that follows every reset delivers it again.

    Every assigned partition gets an expectation: its stored position + 1, or, with none stored, the first offset
    its log holds (`starts`). Offsets of the topics tally reads are contiguous (no transactions, no compaction), so
    a message above the expected offset means messages were skipped (a commit past unprocessed input, a dropped
    fetch, a message fetched before the seek); it and the rest of its partition in the batch are held back and the
    partition is rewound to the expected offset. A message below it is a replay of saved input and is passed over.
    """

    topic: str
    expected: dict[int, int] = field(default_factory=dict)
    gaps: int = 0
    open: bool = False
    # Partitions reset whose expected offset has not arrived since: a message above it is most likely one fetched
    # from Kafka's committed offset before the seek to the stored position, rewound without an alarm.
    unsettled: set[int] = field(default_factory=set)

    def hold(self) -> None:
        """An assignment starts: hold input back until `reset` gives the stored positions."""
        self.open = False

    def reset(self, stored: Mapping[int, int], partitions: Iterable[int], starts: Mapping[int, int]) -> dict[int, int]:
        """After an assignment: expect each assigned partition's stored position + 1, else its log's first offset.

        Returns the offset to seek each partition to (the expectation) and opens the guard.
        """
        self.expected = {p: stored[p] + 1 if p in stored else starts[p] for p in partitions}
        self.unsettled = set(self.expected)
        self.open = True
        return dict(self.expected)

    def admit(self, messages: Sequence[tuple[bytes | None, Source]]) -> Admitted:
        if not self.open:
            return Admitted([], held=len(messages))
        out = Admitted([])
        blocked: set[int] = set()
        for value, source in messages:
            p = source.partition
            if p in blocked:
                continue
            want = self.expected.get(p)
            if want is not None and source.offset < want:
                out.replayed += 1
                continue
            if want is not None and source.offset > want:
                blocked.add(p)
                out.rewind[p] = want
                if p in self.unsettled:
                    log.info("%s[%d]: offset %d arrived while %d was expected (fetched before the seek to the stored "
                             "position); rewinding", self.topic, p, source.offset, want)
                    continue
                self.gaps += 1
                log.error("%s[%d]: offset %d arrived while %d was expected (input skipped upstream); rewinding to %d",
                          self.topic, p, source.offset, want, want)
                continue
            self.unsettled.discard(p)
            self.expected[p] = source.offset + 1
            out.messages.append((value, source))
        return out

    def done(self, sources: Iterable[Source]) -> dict[int, int]:
        """The positions to store after the admitted messages' effects are durable (partition → last offset)."""
        return last_offsets(sources)
