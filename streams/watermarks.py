"""Event-time watermarks: each input partition's progress, carried from the process role to the detectors.

A watermark is an event time (epoch ms) below which no more logical requests are expected from one partition of
llm.usage.v1. The model is Flink's and Kafka Streams': progress is tracked per input partition, carried downstream
in the data stream, and a consumer that merges partitions takes the minimum over all of them ("min over sources").

Process role (`InputProgress`), per input partition p:
  1. After each batch, W(p) = min(the fold's event clock of p, the wall clock) − the fold's settle time: the fold
     emits a request once its clock passes the request's last attempt by `settle`, so requests still to come from p
     end after W(p) (an attempt later than that is late data, counted as such).
  2. Wall time moves W(p) only for a partition that is caught up (everything up to the broker's high watermark is
     processed) and silent (no input for `idle_s` since its last batch finished): then W(p) ≥ wall − idle − settle.
     A slow batch, a backlog, a replay of old data never move it: their partitions are not caught up.
  3. W(p) never goes back (a rebalance rebuilds the fold's clock from its state, which can be behind).
  4. The marks are published to every partition of llm.cost.requests.v1 after the batch's requests, its state and its
     input position are durable, so a replay after a crash re-emits only requests no watermark has yet covered.
Detect stage (streams.detect.Detector.watermark): per requests partition, the watermark is the minimum of the
latest W(p) over every input partition p; a partition never heard from holds it at zero.

A watermark message is one JSON object on llm.cost.requests.v1: {"watermark": {"<p>": ms, ...}, "sources": n},
n being the input topic's partition count. Readers of that topic tell it from request rows by its first bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

WATERMARK_PREFIX = b'{"watermark":'


def encode_watermarks(marks: Mapping[int, int], sources: int) -> bytes:
    """A watermark message: input partition → watermark (epoch ms), and the input topic's partition count."""
    return orjson.dumps({"watermark": {str(p): int(ms) for p, ms in sorted(marks.items())}, "sources": int(sources)})


def is_watermark(value: bytes | None) -> bool:
    """True for a watermark message (not a batch of request rows)."""
    return bool(value) and value.startswith(WATERMARK_PREFIX)  # type: ignore[union-attr]


def decode_watermarks(value: bytes) -> tuple[dict[int, int], int]:
    """(input partition → watermark ms, input partition count) of a watermark message; ValueError if malformed."""
    try:
        obj = orjson.loads(value)
        marks = {int(p): int(ms) for p, ms in obj["watermark"].items()}
        sources = int(obj["sources"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed watermark message: {value[:200]!r}") from exc
    if sources < 1 or any(p < 0 or p >= sources for p in marks):
        raise ValueError(f"watermark message with partitions outside 0..{sources - 1}: {value[:200]!r}")
    return marks, sources


def low_watermark(marks: Mapping[int, int], sources: int) -> int:
    """The minimum over all `sources` input partitions (0 while one has not been heard from)."""
    return min((marks.get(p, 0) for p in range(sources)), default=0)


@dataclass
class InputProgress:
    """The process role's watermark per input partition (see the module docstring for the rules).

    `clocks` passed in are the fold's event clocks (epoch ms, already capped at the wall clock plus a tolerance);
    `wall` is epoch seconds. Every method returns the marks that moved, to publish.
    """

    settle_ms: int
    idle_s: float
    marks: dict[int, int] = field(default_factory=dict)
    finished: dict[int, float] = field(default_factory=dict)  # partition → wall time its last batch finished

    def _raise(self, partition: int, ms: int, moved: dict[int, int]) -> None:
        if ms > self.marks.get(partition, 0):
            self.marks[partition] = ms
            moved[partition] = ms

    def after_batch(self, partitions: Iterable[int], clocks: Mapping[int, int], wall: float) -> dict[int, int]:
        """Rule 1 for the partitions a batch just covered (called once its outputs, state and position are durable)."""
        moved: dict[int, int] = {}
        wall_ms = int(wall * 1000)
        for p in partitions:
            self.finished[p] = wall
            if p in clocks:
                self._raise(p, min(clocks[p], wall_ms) - self.settle_ms, moved)
        return moved

    def silent(self, partitions: Iterable[int], caught_up: Iterable[int], wall: float) -> list[int]:
        """The partitions rule 2 applies to: caught up, and no batch for `idle_s` since the last one finished."""
        done = set(caught_up)
        out = []
        for p in partitions:
            if p not in done:
                continue
            last = self.finished.setdefault(p, wall)  # first seen now: silent from here on
            if wall - last >= self.idle_s:
                out.append(p)
        return out

    def idle(self, partitions: Iterable[int], wall: float) -> dict[int, int]:
        """Rule 2 for caught-up, silent partitions (from `silent`)."""
        moved: dict[int, int] = {}
        floor = int((wall - self.idle_s) * 1000) - self.settle_ms
        for p in partitions:
            self._raise(p, floor, moved)
        return moved

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions no longer assigned: their marks are another worker's to publish now."""
        for p in partitions:
            self.marks.pop(p, None)
            self.finished.pop(p, None)
