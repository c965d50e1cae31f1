"""`make bench-detect-stack`: the labelled stream of tests/bench/detect.py published into a real stack, scored again.

The offline bench feeds streams.detect.Detector directly. Here the same labelled stream (same seed, days, rate, so the
same events) goes through the SDK publisher (tally/sdk/publisher.py, many events per Kafka message) into a stack of
its own (`tally up` in a fresh data directory on free loopback ports, the example reference data loaded), with the
detectors configured as offline (TALLY_DETECT_* settings). What lands in `tally.anomalies` is read back through the
worker's query API and turned into pages exactly as offline: one page per incident_id, at its first `firing` row's
detected_at (event time), scored by tests.bench.detect.score.

Modes:
  backfill  every line published as fast as the SDK goes, then `tally wait`, then the detectors' last windows.
  paced     lines published in event-time order, event time running `speedup` times faster than wall time, so the
            stack is caught up most of the time (the consumer lag is sampled and reported).
  backfill-kill9  backfill, with the worker killed (SIGKILL) N times while it works through the backlog and started
            again with `tally up`; its pages are compared with the plain backfill's (or offline's), and an incident
            whose firing record lands more than once is reported as a duplicate.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ops.simulate import TrafficGenerator
from streams.detect import DetectConfig
from tally.config import Settings
from tally.partitioning import logical_id
from tally.sdk.publisher import Publisher
from tests.conftest import free_ports

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = REPO / "examples" / "reference"
Page = tuple[str, datetime, str]

# DetectConfig field → the setting that carries it to a worker (streams.app.detect_config reads these four only).
DETECT_SETTINGS = {"window_s": "detect_window_s", "lateness_s": "detect_lateness_s",
                   "min_requests": "detect_min_requests", "warmup_windows": "detect_warmup_windows"}


# ---------------------------------------------------------------- pure helpers (unit-tested)
def detect_env(config: DetectConfig) -> dict[str, str]:
    """TALLY_* variables that give a worker `config`; ValueError for a field no setting carries (left at default)."""
    default = DetectConfig()
    fixed = [f.name for f in fields(DetectConfig)
             if f.name not in DETECT_SETTINGS and getattr(config, f.name) != getattr(default, f.name)]
    if fixed:
        raise ValueError(f"a worker cannot be given DetectConfig {', '.join(fixed)}: no setting carries them")
    return {f"TALLY_{name.upper()}": str(getattr(config, attr)) for attr, name in DETECT_SETTINGS.items()}


def line_time(line: bytes) -> float:
    """Epoch seconds of an NDJSON usage line's `timestamp`."""
    return parse_time(orjson.loads(line)["timestamp"]).timestamp()


def parse_time(value: Any) -> datetime:
    """A timestamp as the API or an event gives it (ISO 8601, `Z`, or ClickHouse's `YYYY-MM-DD hh:mm:ss.fff`), UTC."""
    if isinstance(value, datetime):
        out = value
    else:
        text = str(value).strip().replace("Z", "+00:00")
        out = datetime.fromisoformat(text)
    return out.replace(tzinfo=UTC) if out.tzinfo is None else out.astimezone(UTC)


def event_time_order(lines: Sequence[bytes]) -> list[bytes]:
    """The lines sorted by timestamp; lines stamped alike keep their order (a request's attempts stay in order)."""
    times = [line_time(x) for x in lines]
    return [lines[i] for i in sorted(range(len(lines)), key=lambda i: times[i])]


def pace_schedule(times: Sequence[float], speedup: float) -> list[float]:
    """Wall-clock offsets (seconds from the first publish) at which lines stamped `times` are due.

    Event time runs `speedup` times faster than wall time from the earliest stamp; the offsets never decrease, so a
    line stamped earlier than one already published is due at once.
    """
    if speedup <= 0:
        raise ValueError(f"speedup must be positive, got {speedup}")
    if not times:
        return []
    origin = min(times)
    out: list[float] = []
    latest = 0.0
    for t in times:
        latest = max(latest, (t - origin) / speedup)
        out.append(latest)
    return out


@dataclass
class AnomalyPages:
    """Pages read from anomalies rows: one per incident_id, and what landed more than once."""

    pages: list[Page] = field(default_factory=list)
    firing_rows: int = 0
    # incident_id → firing rows of one severity that landed more than once (same record stored twice: n - 1 each)
    repeated_rows: dict[str, int] = field(default_factory=dict)
    # incident_id → distinct detected_at of its firing rows of one severity beyond the first (a second page)
    refired: dict[str, int] = field(default_factory=dict)


def pages_from_anomalies(rows: Iterable[Mapping[str, Any]], prefix: str = "") -> AnomalyPages:
    """Turn anomalies rows into pages as the offline bench does: the first `firing` row of each incident_id.

    A page is (prefix + feature_id, detected_at, incident_id). An incident legitimately fires twice when it escalates
    from warning to critical; a firing row of the same incident and severity stored again is a repeat (the same
    record, which ReplacingMergeTree collapses), one with another detected_at is a re-fire (a second page).
    """
    out = AnomalyPages()
    first: dict[str, tuple[datetime, str]] = {}
    seen: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for r in rows:
        if r["state"] != "firing":
            continue
        out.firing_rows += 1
        at = parse_time(r["detected_at"])
        iid = str(r["incident_id"])
        seen[(iid, str(r.get("severity", "")))].append(at)
        if iid not in first or at < first[iid][0]:
            first[iid] = (at, str(r["feature_id"]))
    for (iid, _), times in seen.items():
        if len(times) > len(set(times)):
            out.repeated_rows[iid] = out.repeated_rows.get(iid, 0) + len(times) - len(set(times))
        if len(set(times)) > 1:
            out.refired[iid] = out.refired.get(iid, 0) + len(set(times)) - 1
    out.pages = sorted(((prefix + f, at, iid) for iid, (at, f) in first.items()), key=lambda p: (p[1], p[0], p[2]))
    return out


def compare_pages(got: Sequence[Page], want: Sequence[Page]) -> dict[str, Any]:
    """Pages of two runs of one stream: the same incident ids at the same detected_at, and what differs."""
    a = {(p[2], p[1]) for p in got}
    b = {(p[2], p[1]) for p in want}
    return {"same": a == b, "common": len(a & b), "only_here": sorted(f"{i}@{t:%d %H:%M}" for i, t in a - b),
            "only_there": sorted(f"{i}@{t:%d %H:%M}" for i, t in b - a)}


def kill_points(total: int, kills: int) -> list[int]:
    """Progress marks (input messages processed) at which to kill the worker: evenly inside (0, total)."""
    return [total * (k + 1) // (kills + 1) for k in range(kills)] if total > 0 else []


# ---------------------------------------------------------------- the stream
def stream_lines(gen: TrafficGenerator, until: datetime) -> list[bytes]:
    """The generator's NDJSON lines up to `until`, in generation order: the very events the offline bench folds."""
    lines: list[bytes] = []
    while gen.clock < until:
        lines.extend(orjson.dumps(e) for e in gen.logical_request())
    return lines


class SpanPublisher(Publisher):
    """The SDK publisher, also recording the event-time span (first to last timestamp) of every message it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spans: list[float] = []
        self.sizes: list[int] = []

    def _send(self, partition: int) -> None:
        lines = self._buffers[partition].lines
        if lines:
            times = [line_time(x) for x in (lines[0], lines[-1])]
            self.spans.append(abs(times[1] - times[0]))
            self.sizes.append(len(lines))
        super()._send(partition)


@dataclass(frozen=True)
class SdkOptions:
    """How the SDK packs lines: events and bytes per message, and how long a partially filled buffer may wait."""

    batch_events: int = 500
    max_bytes: int = 512 * 1024
    buffer_ms: int = 1000


def message_summary(pub: SpanPublisher) -> dict[str, Any]:
    """How many messages the publisher sent, and the event time they spanned (median, p90, max, in minutes)."""
    spans = sorted(pub.spans)
    if not spans:
        return {"messages": 0}

    def q(f: float) -> float:
        return round(spans[min(len(spans) - 1, int(f * len(spans)))] / 60, 1)
    return {"messages": len(spans), "events_per_message": round(sum(pub.sizes) / len(spans), 1),
            "span_median_min": q(0.5), "span_p90_min": q(0.9), "span_max_min": round(spans[-1] / 60, 1)}


# ---------------------------------------------------------------- the stack
class LocalStack:
    """A stack of its own: `tally up` (broker, topics, worker) in `data_dir` on free loopback ports."""

    def __init__(self, data_dir: Path, detect: DetectConfig, log: Callable[[str], None]) -> None:
        kafka, controller, web = free_ports(3)
        self.settings = Settings(data_dir=data_dir.resolve(), kafka_bootstrap=f"127.0.0.1:{kafka}",
                                 kafka_controller_port=controller, web_port=web)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        self.env = {**env, **self.settings.to_env(), **detect_env(detect)}
        self.log = log

    def tally(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=self.env, capture_output=True,
                              timeout=timeout, cwd=REPO, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"tally {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.decode()[-3000:]}")
        return proc.stdout.decode()

    def up(self) -> None:
        self.tally("up", "--role", "all", timeout=240)

    def worker_pid(self) -> int:
        return int((self.settings.data_dir / "run" / "worker-all.pid").read_text())

    def kill_worker(self) -> None:
        os.kill(self.worker_pid(), signal.SIGKILL)

    def processed(self) -> tuple[int, int]:
        """(input messages the process role has finished, input messages published), over every partition."""
        from ops.kafka_admin import end_offsets
        from ops.wait import process_positions

        ends = end_offsets(self.settings.kafka_bootstrap, self.settings.topics.usage)
        done = process_positions(self.settings)
        return sum(min(done.get(p, 0), e) for p, e in ends.items()), sum(ends.values())

    def saved_requests(self) -> int:
        """Logical requests the sink has saved so far (each once: revisions cancel out in sum(sign))."""
        rows = self.query("SELECT toInt64(sum(sign)) AS n FROM tally.logical_requests")
        return int(rows[0]["n"] or 0) if rows else 0

    def query(self, sql: str) -> list[dict[str, Any]]:
        from ops.stack import api

        res = api(self.settings, "/api/query", {"sql": sql}, timeout=60)
        return [dict(zip(res["columns"], r, strict=True)) for r in res["rows"]]

    def anomalies(self) -> list[dict[str, Any]]:
        """Every anomalies row as stored (no FINAL: a record stored twice shows twice)."""
        return self.query("SELECT feature_id, signal, state, severity, incident_id, detected_at FROM tally.anomalies "
                          "ORDER BY detected_at")

    def alerts_settled(self) -> tuple[int, bool]:
        """(alert records published by the detectors, whether the sink has saved them all)."""
        from ops.kafka_admin import covered, end_offsets
        from ops.wait import sink_positions

        ends = end_offsets(self.settings.kafka_bootstrap, self.settings.topics.alerts)
        return sum(ends.values()), covered(ends, sink_positions(self.settings, self.settings.topics.alerts))

    def wait_detectors(self, quiet_s: float, limit_s: float) -> float:
        """Wait (at most `limit_s`) until no new alert record appeared for `quiet_s` and the sink saved them all."""
        started = time.monotonic()
        last, since = -1, time.monotonic()
        while time.monotonic() - started < limit_s:
            n, saved = self.alerts_settled()
            if n != last:
                last, since = n, time.monotonic()
            elif saved and time.monotonic() - since >= quiet_s:
                break
            time.sleep(2)
        return time.monotonic() - started

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.tally("down", timeout=180)


class LagSampler:
    """Samples the process role's input lag (messages) every `every_s` in a thread, while a paced replay runs."""

    def __init__(self, stack: LocalStack, every_s: float = 5.0) -> None:
        self.stack, self.every_s = stack, every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):
                done, total = self.stack.processed()
                self.samples.append(total - done)

    def __enter__(self) -> LagSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def summary(self, partitions: int) -> dict[str, Any]:
        """Share of samples with at most one message per partition behind, and the largest lag."""
        if not self.samples:
            return {"lag_samples": 0}
        caught = sum(1 for s in self.samples if s <= partitions)
        return {"lag_samples": len(self.samples), "caught_up_share": round(caught / len(self.samples), 2),
                "max_lag_messages": max(self.samples)}


@dataclass
class StackRun:
    """One stream through one stack mode: its pages and how the run went."""

    mode: str
    anomalies: AnomalyPages
    info: dict[str, Any]


def run_stack(mode: str, lines: Sequence[bytes], detect: DetectConfig, root: Path, sdk: SdkOptions,
              speedup: float = 1.0, kills: int = 0, prefix: str = "", keep: bool = False,
              log: Callable[[str], None] = print) -> StackRun:
    """Start a fresh stack, publish `lines` (backfill: at once; paced: at `speedup`), wait, read the anomalies."""
    data_dir = root / mode
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    stack = LocalStack(data_dir, detect, log)
    info: dict[str, Any] = {"data_dir": str(data_dir)}
    t0 = time.monotonic()
    try:
        stack.up()
        stack.tally("reference", "load", str(REFERENCE_DIR), timeout=120)
        info["startup_s"] = round(time.monotonic() - t0, 1)
        log(f"  [{mode}] stack up in {info['startup_s']} s ({stack.settings.kafka_bootstrap}, "
            f"{stack.settings.web_url}); publishing {len(lines):,} lines")
        s = stack.settings
        t1 = time.monotonic()
        with SpanPublisher(s.kafka_bootstrap, s.topics.usage, partitions=s.partitions,
                           max_message_events=sdk.batch_events, max_message_bytes=sdk.max_bytes,
                           max_buffer_ms=sdk.buffer_ms) as pub:
            if mode == "paced":
                ordered = event_time_order(lines)
                due = pace_schedule([line_time(x) for x in ordered], speedup)
                with LagSampler(stack) as sampler:
                    for line, at in zip(ordered, due, strict=True):
                        ahead = at - (time.monotonic() - t1)
                        if ahead > 0.02:
                            time.sleep(ahead)
                        pub.publish_line(line)
                    pub.flush(60)
                info.update(sampler.summary(s.partitions))
            else:
                for line in lines:
                    pub.publish_line(line)
        info["publish_s"] = round(time.monotonic() - t1, 1)
        info["sdk"] = message_summary(pub)
        del pub  # its Kafka client would otherwise retry the stack's broker after the stack is gone, loudly
        log(f"  [{mode}] published in {info['publish_s']} s: {info['sdk']}")
        if kills:
            info["kills"] = kill_during_backfill(stack, kills, logical_requests_in(lines), log, mode)
        t2 = time.monotonic()
        stack.tally("wait", "--timeout", "1200", timeout=1300)
        info["wait_s"] = round(time.monotonic() - t2, 1)
        info["backlog_s"] = round(time.monotonic() - t1, 1)
        info["detectors_wait_s"] = round(stack.wait_detectors(quiet_s=25.0, limit_s=150.0), 1)
        rows = stack.anomalies()
        status = stack.query("SELECT count() AS n FROM tally.logical_requests_current")
        info["logical_requests"] = status[0]["n"] if status else None
        from ops.stack import api

        st = api(s, "/api/status", timeout=10)
        info["worker"] = {k: st.get(k) for k in ("detect_requests", "detect_errors", "anomaly_alerts")}
        pages = pages_from_anomalies(rows, prefix)
        info["anomaly_rows"] = len(rows)
        log(f"  [{mode}] processed {info['backlog_s']} s after the first publish (+{info['detectors_wait_s']} s for "
            f"the last windows): {len(rows)} anomalies rows, {len(pages.pages)} pages")
        return StackRun(mode, pages, info)
    finally:
        info["total_s"] = round(time.monotonic() - t0, 1)
        stack.down()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def kill_during_backfill(stack: LocalStack, kills: int, requests: int, log: Callable[[str], None],
                         mode: str) -> list[dict[str, Any]]:
    """SIGKILL the worker each time the sink has saved the next share of the stream's `requests` logical requests.

    The sink's count (durable, the end of the pipeline) marks how far the backlog is worked through; the process
    role alone reads a backlog of large messages far ahead of fold, detect and sink. Each kill is followed by
    `tally up`, which starts the worker again.
    """
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + 900
    for mark in kill_points(requests, kills):
        done = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the API is down for a moment after a restart
                done = stack.saved_requests()
            if done >= mark:
                break
            time.sleep(1)
        else:
            log(f"  [{mode}] the sink did not reach {mark} requests in time; no more kills")
            break
        pid = stack.worker_pid()
        stack.kill_worker()
        time.sleep(1)
        t = time.monotonic()
        stack.up()
        out.append({"at_requests": done, "of": requests, "pid": pid, "restart_s": round(time.monotonic() - t, 1)})
        log(f"  [{mode}] kill -9 {pid} with {done:,}/{requests:,} logical requests saved; up again in "
            f"{out[-1]['restart_s']} s")
    return out


def logical_requests_in(lines: Iterable[bytes]) -> int:
    """How many logical requests the lines hold (distinct parent_request_id, else request_id)."""
    return len({logical_id(orjson.loads(x)) for x in lines})


def speedup_for(lines: Sequence[bytes], minutes: float) -> float:
    """The speed-up at which the stream's event time is replayed in `minutes` of wall time."""
    if not lines:
        return 1.0
    first, last = line_time(lines[0]), line_time(lines[-1])
    return max(1.0, (last - first) / (minutes * 60))
