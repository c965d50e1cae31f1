"""Log hygiene for the worker: library messages that report normal operation are demoted from WARNING/ERROR."""

from __future__ import annotations

import logging
import re

# Faust's producer buffer holds a table's changelog writes until they are sent; over 100 pending messages the
# conductor waits for it to drain (ProducerBuffer.wait_until_ebb, a fixed threshold). The fold writes one entry per
# open logical request, thousands per batch, so this flow control runs on every busy batch: not an operator's job.
PRODUCER_BUFFER_FULL = ("faust.transport.producer", re.compile(r"producer buffer full size \d+\Z"))


class DemoteToDebug(logging.Filter):
    """A logger filter: records whose message matches `pattern` become DEBUG (dropped unless DEBUG is enabled).

    Every other record passes unchanged. Install it on the logger that emits the message, not on a handler.
    """

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        """True to keep the record (demoted when it matches)."""
        if record.levelno <= logging.DEBUG or not self.pattern.match(record.getMessage()):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def demote_routine_library_logs() -> None:
    """Install the worker's demotions (idempotent): Faust's producer-buffer flow control is logged at DEBUG."""
    name, pattern = PRODUCER_BUFFER_FULL
    logger = logging.getLogger(name)
    if not any(isinstance(f, DemoteToDebug) and f.pattern == pattern for f in logger.filters):
        logger.addFilter(DemoteToDebug(pattern))
