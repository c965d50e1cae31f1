"""Log hygiene for the worker: library messages that report normal operation are demoted from WARNING/ERROR."""

from __future__ import annotations

import asyncio
import io
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


def _awaits(coro: object, depth: int = 40) -> list[str]:
    """Where a suspended coroutine waits: each frame of its await chain, outermost first."""
    out: list[str] = []
    while coro is not None and depth > 0:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            out.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
        depth -= 1
    if coro is not None:
        out.append(repr(coro))
    return out


def dump_tasks(loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
    """Log where every asyncio task of `loop` waits (a worker that stopped moving: `kill -USR1 <pid>`)."""
    out = io.StringIO()
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    for task in tasks:
        out.write(f"--- {task.get_name()}\n")
        for line in _awaits(task.get_coro()):
            out.write(f"    {line}\n")
    # A framework may wrap a coroutine so that its task's await chain ends early (Faust's agents): every suspended
    # coroutine of this project's own code, with where it waits.
    import gc
    import types

    for obj in gc.get_objects():
        if isinstance(obj, types.CoroutineType) and obj.cr_frame is not None and "/streams/" in obj.cr_code.co_filename:
            out.write(f"--- coroutine {obj.cr_code.co_name}\n")
            for line in _awaits(obj):
                out.write(f"    {line}\n")
    logger.warning("%d asyncio tasks (SIGUSR1):\n%s", len(tasks), out.getvalue())
