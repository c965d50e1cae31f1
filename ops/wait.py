"""`tally wait`: block until everything published so far is processed and saved in ClickHouse."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ops.kafka_admin import covered, end_offsets, lag, latest_positions
from tally.config import Settings
from tally.errors import TallyError


class WaitTimeout(TallyError):
    """Not everything was processed within the timeout."""


@dataclass(frozen=True)
class WaitReport:
    """What was waited for."""

    usage_messages: int
    attempt_messages: int
    request_messages: int
    seconds: float
    otlp_messages: int = 0  # OTLP traces messages (the Collector's), when the OTLP input is on


def otlp_positions(settings: Settings) -> dict[int, int]:
    """The otlp stage's input position: per OTLP topic partition, the next offset it has not finished."""
    return {p: o + 1 for p, o in latest_positions(settings.kafka, settings.topics.otlp_state).items()}


def process_positions(settings: Settings) -> dict[int, int]:
    """The process role's input position: per llm.usage.v1 partition, the next offset it has not finished."""
    return {p: o + 1 for p, o in latest_positions(settings.kafka, settings.topics.fold_state).items()}


def sink_positions(settings: Settings, topic: str) -> dict[int, int]:
    """The sink's input position on `topic` (sink_offsets in ClickHouse): per partition, the next unsaved offset."""
    from ops.cli import run_query

    sql = ("SELECT partition, max(offset) FROM {db}.sink_offsets "
           f"WHERE consumer = '{settings.group_id('sink')}' AND topic = '{topic}' GROUP BY partition")
    try:
        _, rows = run_query(settings, sql)
    except TallyError:
        return {}  # no ClickHouse to ask yet (the sink has not started): nothing is saved
    return {int(p): int(o) + 1 for p, o in rows}


def _wait_topic(settings: Settings, topic: str, positions: Callable[[], dict[int, int]], deadline: float,
                progress: Callable[[str], None] | None, stage: str) -> int:
    ends = end_offsets(settings.kafka, topic)
    while True:
        done = positions()
        if covered(ends, done):
            return sum(ends.values())
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{topic} not fully processed in time ({lag(ends, done)} messages behind); is a "
                              f"worker with the {stage} role running? (`tally status`)")
        if progress is not None:
            progress(f"{topic}: {lag(ends, done)} messages to go")
        time.sleep(0.25)


def wait_processed(settings: Settings, timeout: float = 120.0,
                   progress: Callable[[str], None] | None = None) -> WaitReport:
    """Wait until the process role, then the sink, have stored positions past everything published so far.

    First the OTLP topic (when the OTLP input is on: its spans become events on llm.usage.v1), then
    llm.usage.v1, then llm.cost.attempts.v1 and llm.cost.requests.v1 as they are once the first
    wait is over. Logical requests still open in the fold (waiting for a final attempt, the settle time or the
    inactivity timeout) are not emitted yet, so they are not waited for.

    The positions are tally's own, not Kafka's committed offsets: the process role writes its position to its
    state changelog after its outputs were delivered, the sink to ClickHouse after the insert was acknowledged. So
    when this returns every line published before the call is in usage_events or in the dead-letter topic.
    """
    started = time.monotonic()
    deadline = started + timeout
    topics = settings.topics
    otlp = _wait_topic(settings, topics.otlp, lambda: otlp_positions(settings), deadline, progress,
                       "process") if topics.otlp else 0
    usage = _wait_topic(settings, topics.usage, lambda: process_positions(settings), deadline, progress, "process")
    attempts = _wait_topic(settings, topics.attempts, lambda: sink_positions(settings, topics.attempts), deadline,
                           progress, "sink")
    requests = _wait_topic(settings, topics.requests, lambda: sink_positions(settings, topics.requests), deadline,
                           progress, "sink")
    return WaitReport(usage, attempts, requests, time.monotonic() - started, otlp)
