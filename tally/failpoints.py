"""Named crash points for the fault tests: armed by one setting, they end the process as a kill -9 would."""

from __future__ import annotations

import logging
import os
from collections import Counter

log = logging.getLogger(__name__)

EXIT_FAILPOINT = 77

# Every named point, where it sits. A test arms one with TALLY_FAILPOINT=name or name:n (crash at the n-th pass).
POINTS: dict[str, str] = {
    "process.after_decode": "the process role validated, priced and folded a batch; nothing is published yet",
    "process.before_delivery": "outputs are handed to the producer, not yet delivered",
    "process.after_delivery": "outputs are delivered; the fold state and the position are not written",
    "process.mid_state": "the fold state is written (maybe not delivered); the position is not",
    "otlp.before_delivery": "the otlp stage translated a batch of spans; its events are handed to the producer, not "
                            "yet delivered",
    "otlp.after_delivery": "the otlp stage's events and dead letters are delivered; its position is not written",
    "sink.after_decode": "the sink decoded a batch; nothing is inserted",
    "sink.after_insert": "ClickHouse holds the rows; dead letters and the position are not written",
    "rebalance": "partitions are assigned and the stored positions read; the seek has not happened",
    "alerts.after_save": "the alert consumer saved a batch's decisions, its outbox and its position; nothing of it "
                         "is delivered",
    "alerts.in_flight": "a sink answered one notification; that answer is not yet recorded in the incident table",
    "alerts.mid_batch": "the first notification of a batch is delivered and recorded; the rest are not",
    "alerts.after_delivery": "the alert consumer delivered and recorded a whole batch; its offsets are not committed "
                             "(a lag hint only)",
}


class Failpoints:
    """The armed point, if any. `hit` costs one comparison when nothing is armed."""

    def __init__(self, spec: str = "") -> None:
        self.name = ""
        self.at = 1
        self.passes: Counter[str] = Counter()
        if spec:
            name, _, n = spec.partition(":")
            if name not in POINTS:
                raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(sorted(POINTS))}")
            self.name, self.at = name, int(n or 1)
            if self.at < 1:
                raise ValueError(f"failpoint {spec!r}: the pass number is 1 or more")

    def armed(self, name: str) -> bool:
        """True if `name` is the armed point (whatever its pass count)."""
        return name == self.name

    def hit(self, name: str) -> None:
        """Crash here (os._exit: no cleanup, no flush, no commit) if this is the armed point's n-th pass."""
        if name != self.name:
            return
        self.passes[name] += 1
        if self.passes[name] == self.at:
            log.critical("failpoint %s fired (pass %d): %s", name, self.at, POINTS[name])
            logging.shutdown()
            os._exit(EXIT_FAILPOINT)
