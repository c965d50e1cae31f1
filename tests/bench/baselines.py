"""Stages 2 and 3: what Kafka alone costs a Python consumer (raw aiokafka, a bare Faust agent)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.bench.common import REPO, stop_process


async def _raw_consume(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float
                       ) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_bytes=64 * 1024 * 1024,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loads = orjson.loads
        count = messages = 0
        began = time.perf_counter()
        deadline = began + timeout_s
        first = 0.0
        while count < expected and time.perf_counter() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            for records in batches.values():
                if records and not first:
                    first = time.perf_counter()
                for rec in records:
                    messages += 1
                    for line in (rec.value or b"").split(b"\n"):
                        loads(line)
                        count += 1
        elapsed = time.perf_counter() - began
    finally:
        await consumer.stop()
    if count < expected:
        raise RuntimeError(f"raw consume of {topic} saw {count} of {expected} events within {timeout_s:.0f}s")
    return {"events": count, "messages": messages, "seconds": round(elapsed, 3),
            "events_per_s": round(count / elapsed), "first_fetch_s": round(first - began, 3)}


def raw_consume(bootstrap: str, topic: str, partitions: int, expected: int, passes: int = 2,
                timeout_s: float = 120.0) -> dict[str, Any]:
    """aiokafka (no group, assigned partitions, from the beginning) + orjson.loads of every line; best pass."""
    runs = [asyncio.run(_raw_consume(bootstrap, topic, partitions, expected, timeout_s)) for _ in range(passes)]
    best = max(runs, key=lambda r: r["events_per_s"])
    return {**best, "passes": [r["events_per_s"] for r in runs]}


def bare_faust(bootstrap: str, topic: str, partitions: int, expected: int, workdir: Path,
               timeout_s: float = 240.0) -> dict[str, Any]:
    """Drain `topic` with tests.bench.bare_faust in a subprocess; events/s from its first to its last event."""
    tag = uuid.uuid4().hex[:8]
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"bare-{tag}.json"
    log_path = workdir / f"bare-{tag}.log"
    cmd = [sys.executable, "-m", "tests.bench.bare_faust", "--bootstrap", bootstrap, "--topic", topic,
           "--partitions", str(partitions), "--expected", str(expected), "--out", str(out),
           "--group", f"bench-bare-{tag}", "--datadir", str(workdir / f"faust-{tag}")]
    began = time.time()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not out.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"bare Faust agent exited {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bare Faust agent did not drain {expected} events in {timeout_s:.0f}s:\n"
                                   f"{_tail(log_path)}")
            time.sleep(0.1)
    finally:
        stop_process(proc)
    res = orjson.loads(out.read_bytes())
    span = res["last"] - res["first"]
    steady_span = res["last"] - res["first_batch_end"]
    return {
        "events": res["count"],
        "messages": res["messages"],
        "batches": res["batches"],
        "seconds": round(span, 3),
        "events_per_s": round(res["count"] / span) if span > 0 else None,
        # without the first batch (its fetch happened before the first timestamp)
        "steady_events_per_s": (round((res["count"] - res["first_batch_events"]) / steady_span)
                                if steady_span > 0 and res["batches"] > 1 else None),
        # from the partition assignment (the fetch of the first batch included), like the raw consumer's clock
        "assigned_events_per_s": (round(res["count"] / (res["last"] - res["assigned"]))
                                  if res["assigned"] and res["last"] > res["assigned"] else None),
        "startup_to_first_s": round(res["first"] - began, 2),
    }


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
