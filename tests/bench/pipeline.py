"""Stages 4-6: topic → rows queryable in ClickHouse through real workers, latency at a steady rate, worker RSS."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ops.cli import _load_reference
from ops.kafka_local import ensure_topics
from ops.stack import StackError, api, layout, log_file, start_worker, stop_worker, tail, worker_pid
from tally.config import Settings
from tally.errors import TallyError
from tally.sdk.publisher import Publisher
from tests.bench import otlp as otlp_bench
from tests.bench import profile
from tests.bench.common import (
    REFERENCE_FILES,
    EventPool,
    proc_status_kib,
    publish_batches,
    publish_singles,
    quantile,
)
from tests.conftest import free_ports

COUNT_SQL = "SELECT count() FROM tally.usage_events"
POLL_S = 0.25


def fresh_settings(base: Settings, root: Path, label: str, **overrides: Any) -> Settings:
    """A run's own topic prefix (all topics created), data directory and web port, plus setting overrides."""
    tag = uuid.uuid4().hex[:6]
    settings = dataclasses.replace(base, topic_prefix=f"bench-{label}-{tag}.", data_dir=root / f"{label}-{tag}",
                                   web_port=free_ports(1)[0], log_level="WARNING", **overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    return settings


def count_rows(settings: Settings, timeout: float = 10.0) -> int:
    """Rows in usage_events, through the worker's query API."""
    return int(api(settings, "/api/query", {"sql": COUNT_SQL}, timeout=timeout)["rows"][0][0])


def _count_or_zero(settings: Settings) -> int:
    try:
        return count_rows(settings)
    except (OSError, TallyError):
        return 0


def _status(settings: Settings) -> dict[str, Any]:
    """The worker's counters (/api/status), or the error met asking for them."""
    try:
        st = api(settings, "/api/status", timeout=30)
    except (OSError, TallyError) as exc:
        return {"error": repr(exc)}
    keys = ("messages", "events_accepted", "events_rejected", "sink_rows_inserted", "sink_duplicates_skipped",
            "sink_retries")
    return {k: st.get(k) for k in keys}


@dataclasses.dataclass
class Workers:
    """The worker processes of one run: role → (settings it was started with, pid)."""

    started: dict[str, tuple[Settings, int]] = dataclasses.field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        return {role: pid for role, (_, pid) in self.started.items()}

    def check_alive(self) -> None:
        for role, (settings, _) in self.started.items():
            if worker_pid(settings, role) is None:
                raise StackError(f"the {role} worker died; last lines of its log:\n{tail(log_file(settings, role))}")

    def peak_rss_mib(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for role, (_, pid) in self.started.items():
            kib = proc_status_kib(pid, "VmHWM")
            out[role] = round(kib / 1024, 1) if kib is not None else None
        return out


@contextmanager
def workers(settings: Settings, split: bool, process_workers: int = 1) -> Iterator[Workers]:
    """Start a role-all worker, or `process_workers` process workers and a sink worker (only the sink serves the
    API), as `tally up --workers N` names them; stop them."""
    ws = Workers()
    try:
        if split:
            process_settings = dataclasses.replace(settings, web_port=free_ports(1)[0])
            for name in layout(process_workers)[1:]:
                ws.started[name] = (process_settings, start_worker(process_settings, "process", name=name))
            ws.started["sink"] = (settings, start_worker(settings, "sink"))
        else:
            ws.started["all"] = (settings, start_worker(settings, "all"))
        yield ws
    finally:
        for name, (s, _) in ws.started.items():
            stop_worker(s, name)


def throughput(base: Settings, root: Path, pool: EventPool, events: int, single: bool, split: bool,
               timeout_s: float, profile_s: int = 0, process_workers: int = 1, otlp: bool = False,
               **overrides: Any) -> dict[str, Any]:
    """Pre-publish `events`, start the worker(s), poll the row count until all are queryable (or the timeout).

    `otlp`: the events go in as OTel GenAI spans on the OTLP topic (tests.bench.otlp), not as NDJSON.

    rate_steady = (rows at the end − rows at the first non-zero poll) / (time between those polls);
    rate_total = rows / (end − the moment the worker start was requested). The end is the poll that saw all N
    rows, or a last patient count after the timeout. A poll that times out (the worker's event loop or ClickHouse
    thread busy) counts as no change.
    """
    label = ("otlp" if otlp else "single" if single else "batch") + ("-split" if split else "-all")
    if split and process_workers > 1:
        label += f"{process_workers}"
    if overrides:
        label += "-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())).replace("_", "")
    settings = fresh_settings(base, root, label, **overrides)
    topic = settings.topics.usage
    if otlp:  # the same events as OTel GenAI spans, 500 a message, on the topic the Collector writes
        publish_s = otlp_bench.publish_otlp(settings.kafka_bootstrap, settings.topics.otlp,
                                            otlp_bench.spans_messages(pool, 0, events))
    elif single:
        publish_s = publish_singles(settings.kafka_bootstrap, topic, pool, 0, events)
    else:
        publish_s = publish_batches(settings.kafka_bootstrap, topic, pool, 0, events, settings.partitions)
    _load_reference(settings, REFERENCE_FILES)
    started = time.monotonic()
    profilers: dict[str, Any] = {}
    with workers(settings, split, process_workers) as ws:
        api_ready = time.monotonic()
        first_t = 0.0
        first_n = last_n = 0
        last_t = api_ready
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            ws.check_alive()
            try:
                n = count_rows(settings)
            except (OSError, TallyError):
                n = last_n
            now = time.monotonic()
            if n and not first_t:
                first_t, first_n = now, n
                if profile_s:
                    for role, pid in ws.pids().items():
                        profilers[role] = profile.start(pid, root / f"{label}-{role}.pyspy.txt", profile_s)
            if n != last_n:
                last_t, last_n = now, n
            if n >= events:
                break
            time.sleep(POLL_S)
        if last_n < events:
            # Incomplete: count once more, patiently (polls time out while the worker's loop or its ClickHouse
            # thread is busy), and let the rates run to that answer rather than to the last change seen.
            try:
                last_n = count_rows(settings, timeout=60)
            except (OSError, TallyError):
                pass
            last_t = time.monotonic()
        rss = ws.peak_rss_mib()
        pids = ws.pids()
        status = _status(settings)
        for proc in profilers.values():
            if proc is not None:
                proc.wait(timeout=profile_s + 30)
    done = last_n >= events
    steady_span = last_t - first_t if first_t else 0.0
    result: dict[str, Any] = {
        "label": label,
        "events": events,
        "rows": last_n,
        "complete": done,
        "publish_s": round(publish_s, 2),
        "worker_api_ready_s": round(api_ready - started, 2),
        "first_rows_s": round(first_t - started, 2) if first_t else None,
        "drain_s": round(steady_span, 2),
        "total_s": round(last_t - started, 2),
        "rate_steady": round((last_n - first_n) / steady_span) if steady_span > 0 else None,
        "rate_total": round(last_n / (last_t - started)) if last_t > started else None,
        "peak_rss_mib": rss,
        "pids": pids,
        "overrides": overrides,
        "worker_status": status,  # of the sink worker when split (the process worker serves no API)
    }
    if profilers:
        result["profile"] = {role: profile.summarize(root / f"{label}-{role}.pyspy.txt") for role in profilers}
    return result


def latency(base: Settings, root: Path, pool: EventPool, rate: float, duration_s: float, sample_every: int,
            first_event: int, poll_s: float = 0.05, drain_timeout_s: float = 60.0,
            split: bool = True) -> dict[str, Any]:
    """Publish at a steady `rate` with the SDK (5 ms linger, 50 ms max buffer) and time sampled events until a
    query through the worker API returns them: latency = first-seen time − publish() call time.

    `split`: the default stack (a process worker and the sink, two OS processes), else one worker of role all.
    """
    settings = fresh_settings(base, root, "latency")
    _load_reference(settings, REFERENCE_FILES)
    warm = 2000
    sent_at: dict[str, float] = {}
    seen_at: dict[str, float] = {}
    lock = threading.Lock()
    stats: dict[str, float] = {}
    errors: list[BaseException] = []
    with workers(settings, split=split) as ws:
        # Warm up: the consumer group is joined and the first insert done before the clock starts.
        publish_batches(settings.kafka_bootstrap, settings.topics.usage, pool, first_event, warm,
                        settings.partitions)
        warm_deadline = time.monotonic() + 120
        while _count_or_zero(settings) < warm:
            ws.check_alive()
            if time.monotonic() > warm_deadline:
                raise StackError("the latency worker did not land its warm-up events within 120s")
            time.sleep(0.2)
        start_n = first_event + warm
        total = int(rate * duration_s)

        def produce() -> None:
            try:
                with Publisher(settings.kafka_bootstrap, settings.topics.usage, partitions=settings.partitions,
                               linger_ms=5, max_buffer_ms=50) as pub:
                    began = time.monotonic()
                    sent = 0
                    while sent < total:
                        due = min(total, int((time.monotonic() - began) * rate) + 1)
                        while sent < due:
                            line, eid, _, _ = pool.item(start_n + sent)
                            pub.publish_line(line)
                            if sent % sample_every == 0:
                                with lock:
                                    sent_at[eid] = time.monotonic()
                            sent += 1
                        time.sleep(0.005)
                    stats["publish_s"] = time.monotonic() - began
                    pub.flush()
                    stats["flushed_s"] = time.monotonic() - began
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        producer = threading.Thread(target=produce, name="bench-publisher", daemon=True)
        began_window = time.monotonic()
        producer.start()
        deadline = time.monotonic() + duration_s + drain_timeout_s
        polls = failed_polls = rollup_polls = rollup_equal = 0
        while time.monotonic() < deadline:
            with lock:
                outstanding = [e for e in sent_at if e not in seen_at]
            if not producer.is_alive() and not outstanding:
                break
            if outstanding:
                ids = ",".join(f"'{e}'" for e in outstanding[:500])
                try:
                    res = api(settings, "/api/query",
                              {"sql": f"SELECT event_id FROM tally.usage_events WHERE event_id IN ({ids})"},
                              timeout=10)
                except (OSError, TallyError):
                    failed_polls += 1
                    continue
                now = time.monotonic()
                polls += 1
                for (eid,) in res["rows"]:
                    seen_at.setdefault(eid, now)
                # The minute rollup is filled by materialized views in the same insert as usage_events: it is
                # exactly as fresh when both hold the same number of attempts at the same moment.
                try:
                    pair = api(settings, "/api/query", {"sql": "SELECT (SELECT toUInt64(sum(attempts)) FROM "
                                                               "tally.rollup_minute), (SELECT count() FROM "
                                                               "tally.usage_events)"}, timeout=10)["rows"][0]
                    rollup_polls += 1
                    rollup_equal += int(pair[0] == pair[1])
                except (OSError, TallyError):
                    failed_polls += 1
            time.sleep(poll_s)
        ended = time.monotonic()
        ws.check_alive()
        producer.join(timeout=60)
        try:
            rows: int | None = count_rows(settings, timeout=60) - warm
        except (OSError, TallyError):
            rows = None
        rss = ws.peak_rss_mib()
        pids = ws.pids()
        status = _status(settings)
    if errors:
        raise errors[0]
    # A sample not seen by the end is censored: its latency is at least (end − publish time).
    lat_ms = [1000 * ((seen_at[e] if e in seen_at else ended) - t) for e, t in sent_at.items()]
    unseen = len(sent_at) - sum(1 for e in sent_at if e in seen_at)
    publish_s = stats.get("publish_s", float("nan"))
    p50, p99 = quantile(lat_ms, 0.50), quantile(lat_ms, 0.99)
    return {
        "target_rate": rate,
        "layout": "process + sink" if split else "role all",
        "events": total,
        "publish_rate": round(total / publish_s) if publish_s == publish_s and publish_s > 0 else None,
        "samples": len(sent_at),
        "seen": len(sent_at) - unseen,
        "unseen": unseen,
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        # with unseen samples the quantiles at or above the seen fraction are lower bounds
        "p50_lower_bound": unseen > len(sent_at) * 0.5,
        "p99_lower_bound": unseen > len(sent_at) * 0.01,
        "max_ms": round(max(lat_ms), 1) if lat_ms else None,
        "rows_landed": rows,
        "window_s": round(ended - began_window, 1),
        "polls": polls,
        "failed_polls": failed_polls,
        "rollup_polls": rollup_polls,
        "rollup_equal_polls": rollup_equal,
        "peak_rss_mib": rss,
        "pids": pids,
        "worker_status": status,
    }
