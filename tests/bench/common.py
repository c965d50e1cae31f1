"""Shared pieces of the benchmark: the event pool, topic filling, process bookkeeping and small statistics."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.partitioning import logical_id, partition_for
from tally.reference import ReferenceDoc, load_reference_files
from tally.sdk.publisher import Publisher

REPO = Path(__file__).resolve().parents[2]
REFERENCE_FILES = sorted((REPO / "examples" / "reference").glob("*.yaml"))
# Events fall after the 2026-11-01 price card, so every one is priced by a loaded card.
EVENT_START = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
_EVENT_ID_FIELD = b'"event_id":"ev-'


def reference_docs() -> list[ReferenceDoc]:
    """The example reference documents (price cards and owners) every run loads."""
    return load_reference_files(REFERENCE_FILES)


class EventPool:
    """A pool of distinct generated events, replicated to any count with rewritten (still unique) event ids.

    Generating events costs ~65 µs each; the bench needs millions, so copy k of pool line i is line i with its
    event_id `ev-…` renamed `ev{k}-…` and its logical request id `L` renamed `c{k}-L` (request_id and
    parent_request_id), so every copy lands as its own row and belongs to its own logical request, routed by the
    murmur2 partition of its renamed id.
    """

    def __init__(self, size: int, partitions: int, seed: int = 7) -> None:
        gen = TrafficGenerator(catalog_from_reference(reference_docs()), seed=seed, bad_rate=0.0,
                               start=EVENT_START)
        self.partitions = partitions
        self.lines: list[bytes] = list(gen.lines(size))
        events = [orjson.loads(line) for line in self.lines]
        self.event_ids: list[str] = [e["event_id"] for e in events]
        self.logical_ids: list[str] = [logical_id(e) for e in events]
        self.partition_of: list[int] = [partition_for(lid, partitions) for lid in self.logical_ids]
        if not all(_EVENT_ID_FIELD in line for line in self.lines):
            raise RuntimeError("the traffic generator's event_id layout changed; update EventPool")

    def __len__(self) -> int:
        return len(self.lines)

    def item(self, n: int) -> tuple[bytes, str, str, int]:
        """Event number `n` (any n ≥ 0): (line, event_id, logical request id, partition)."""
        copy, i = divmod(n, len(self.lines))
        line, eid, lid = self.lines[i], self.event_ids[i], self.logical_ids[i]
        if not copy:
            return line, eid, lid, self.partition_of[i]
        tag = f"ev{copy}-"
        line = line.replace(_EVENT_ID_FIELD, b'"event_id":"' + tag.encode(), 1)
        copied = f"c{copy}-{lid}"
        line = line.replace(f'"{lid}"'.encode(), f'"{copied}"'.encode())  # request_id / parent_request_id
        return line, tag + eid[3:], copied, partition_for(copied, self.partitions)


def publish_batches(bootstrap: str, topic: str, pool: EventPool, start: int, count: int, partitions: int) -> float:
    """Publish events start..start+count with the SDK Publisher (500-event NDJSON messages); returns seconds."""
    began = time.perf_counter()
    with Publisher(bootstrap, topic, partitions=partitions, linger_ms=20) as pub:
        for n in range(start, start + count):
            pub.publish_line(pool.item(n)[0])
    return time.perf_counter() - began


def publish_singles(bootstrap: str, topic: str, pool: EventPool, start: int, count: int) -> float:
    """Publish one event per message keyed by its logical request id, as a plain producer would; seconds."""
    failures: list[str] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None and len(failures) < 5:
            failures.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")

    producer = Producer({
        "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "compression.type": "lz4",
        "linger.ms": 20, "batch.size": 1_000_000, "partitioner": "murmur2_random",
        "queue.buffering.max.messages": 500_000, "allow.auto.create.topics": False,
    })
    began = time.perf_counter()
    for n in range(start, start + count):
        line, _, lid, partition = pool.item(n)
        for _ in range(600):  # the local queue drains in well under a minute
            try:
                producer.produce(topic, value=line, key=lid.encode(), partition=partition, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        else:
            raise RuntimeError(f"producer queue stayed full while publishing to {topic}")
        if n % 2000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining or failures:
        raise RuntimeError(f"publishing single-event messages failed: {remaining} undelivered; {failures}")
    return time.perf_counter() - began


def proc_status_kib(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmHWM = peak RSS, VmRSS = current), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """SIGTERM a child started in its own session, SIGKILL it after `timeout`; always reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
