"""`tally wait`: block until everything published so far is processed and saved in ClickHouse."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ops.kafka_admin import GroupOffsets, covered, end_offsets, lag
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


def _wait_topic(settings: Settings, topic: str, roles: tuple[str, ...], deadline: float,
                progress: Callable[[str], None] | None) -> int:
    ends = end_offsets(settings.kafka_bootstrap, topic)
    readers = {settings.group_id(r): GroupOffsets(settings.kafka_bootstrap, settings.group_id(r)) for r in roles}
    try:
        while True:
            lags = {}
            for g, reader in readers.items():
                committed = reader.committed(topic, list(ends))
                if covered(ends, committed):
                    return sum(ends.values())
                lags[g] = lag(ends, committed)
            if time.monotonic() > deadline:
                detail = ", ".join(f"{g}: {n} behind" for g, n in lags.items())
                raise WaitTimeout(f"{topic} not fully processed in time ({detail}); is a worker with role "
                                  f"{' or '.join(roles)} running? (`tally status`)")
            if progress is not None:
                progress(f"{topic}: {min(lags.values())} messages to go")
            time.sleep(0.25)
    finally:
        for reader in readers.values():
            reader.close()


def wait_processed(settings: Settings, timeout: float = 120.0,
                   progress: Callable[[str], None] | None = None) -> WaitReport:
    """Wait until the process role, then the sink role, have committed past everything published so far.

    First llm.usage.v1 as it is now, then llm.cost.attempts.v1 and llm.cost.requests.v1 as they are once the first
    wait is over. Logical requests still open in the fold (waiting for a final attempt, the settle time or the
    inactivity timeout) are not emitted yet, so they are not waited for.

    Both roles commit only after their outputs are durable (the process role after Faust flushed its producer,
    the sink after ClickHouse acknowledged), so when this returns every line published before the call is in
    usage_events or in the dead-letter topic.
    """
    started = time.monotonic()
    deadline = started + timeout
    usage = _wait_topic(settings, settings.topics.usage, ("all", "process"), deadline, progress)
    attempts = _wait_topic(settings, settings.topics.attempts, ("all", "sink"), deadline, progress)
    requests = _wait_topic(settings, settings.topics.requests, ("all", "sink"), deadline, progress)
    return WaitReport(usage, attempts, requests, time.monotonic() - started)
