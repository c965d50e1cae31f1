"""Log hygiene for the worker: library messages that report normal operation are demoted from WARNING/ERROR."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from typing import Any

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


def dump_worker(app: Any, loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
    """What `kill -USR1` logs of a worker: its tasks (dump_tasks), then its Kafka consumer's state.

    Reads Faust's own bookkeeping for the operator: assigned, active, paused and buffered partitions, read offsets,
    the offsets tally sought (streams.positions.SoughtOffsets), each channel's queue, and then, from a task, each
    partition's fetch position and high watermark.
    """
    dump_tasks(loop, logger)
    consumer: Any = app.consumer
    sought = getattr(getattr(consumer, "_sought", None), "sought", {})
    logger.warning("consumer (SIGUSR1): assigned %s; active %s; paused %s; buffered %s; read offsets %s; "
                   "sought %s; flow active %s", sorted(consumer.assignment()),
                   sorted(consumer._active_partitions or ()), sorted(consumer._paused_partitions),
                   sorted(consumer._buffered_partitions), sorted(consumer._read_offset.items()),
                   sorted(sought.items()), consumer.flow_active)
    conductor: Any = app.topics
    logger.warning("channels (SIGUSR1): %s", [(sorted(t.topics), t.queue.qsize())
                                              for t in getattr(conductor, "_topics", ())])

    async def positions() -> None:
        with contextlib.suppress(Exception):
            logger.warning("aiokafka paused (SIGUSR1): %s", sorted(consumer._thread._ensure_consumer().paused()))
        for tp in sorted(consumer.assignment()):
            logger.warning("position (SIGUSR1) %s[%d]: %s, highwater %s", tp.topic, tp.partition,
                           await consumer.position(tp), consumer.highwater(tp))
    loop.create_task(positions())
