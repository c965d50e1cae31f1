"""The fault scenarios: each injects one fault into a stack on loopback while a known stream flows, then measures."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from ops import stack as stack_ops
from ops.alerts import dumps as dump_alert
from ops.alerts import load_state as load_alert_state
from ops.alerts import state_path as alert_state_path
from ops.kafka_admin import end_offsets
from ops.proc import alive
from tally.config import Settings
from tally.failpoints import EXIT_FAILPOINT
from tally.partitioning import partition_for
from tests.e2e.conftest import EXAMPLES, REPO, Stack
from tests.factories import alert_record, malformed_lines
from tests.faults.harness import (
    Event,
    Expected,
    Row,
    Streaming,
    Suite,
    flat,
    lines_of,
    measure,
    publish,
    requests_of,
    shift,
    start_process_worker,
    wait_all,
)


@dataclasses.dataclass(frozen=True)
class Size:
    """How big a run is: `full` for `make faults`, `short` for the pytest module in `make test`."""

    requests: int  # logical requests per scenario (~1.2 attempts each)
    kills: int  # R1's kill -9 count
    outage_s: float  # R3's ClickHouse outage
    broker_down_s: float  # R2's time without a broker
    stream_s: float  # a streamed scenario spreads its lines over about this long, so faults hit mid-stream


FULL = Size(requests=20_000, kills=10, outage_s=60.0, broker_down_s=10.0, stream_s=60.0)
SHORT = Size(requests=1_500, kills=3, outage_s=8.0, broker_down_s=3.0, stream_s=10.0)


class Clock:
    """Marks when the fault was last cleared and the last line published; recovery is measured from the later."""

    def __init__(self) -> None:
        self.cleared = time.monotonic()

    def clear(self) -> None:
        self.cleared = time.monotonic()

    def recover(self, st: Stack, published_at: float) -> float:
        """`tally wait`, then the seconds from the later of the two marks until everything was saved."""
        wait_all(st)
        return time.monotonic() - max(self.cleared, published_at)


def _start(suite: Suite, name: str, role: str = "all", **overrides: Any) -> Stack:
    st = suite.stack(name, **overrides)
    st.tally("up", "--role", role, timeout=180)
    st.tally("reference", "load", str(EXAMPLES))
    return st


def _stream(st: Stack, events: list[Event], seconds: float) -> Streaming:
    return Streaming(st.settings, lines_of(events), seconds)


def _kill(pid: int | None, timeout: float = 30.0) -> None:
    """SIGKILL a worker and wait until it is gone."""
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(pid, b"ops.cli", b"worker") and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait(timeout=30)


def r1_kill_9(suite: Suite, size: Size) -> Row:
    """R1: kill -9 of process workers and the sink at random moments, under load (2 process workers + a sink)."""
    st = _start(suite, "r1", role="sink")
    logs = st.settings.data_dir / "logs"
    workers = [start_process_worker(st, logs / f"process-{i}.log") for i in range(2)]
    try:
        events = suite.traffic(101, size.requests)
        clock, rng, killed, moments = Clock(), random.Random(7), Counter[str](), list[str]()
        stream = _stream(st, events, size.stream_s)
        time.sleep(3.0)  # the workers have joined and consume
        targets = [t for _ in range(0, size.kills, 3) for t in rng.sample(("process-0", "process-1", "sink"), 3)]
        for target in targets[:size.kills]:  # each of the three in turn, in a random order per round
            time.sleep(rng.uniform(0.5, 4.0))
            if target == "sink":
                _kill(stack_ops.worker_pid(st.settings, "sink"))
                st.tally("up", "--role", "sink", timeout=180)
            else:
                i = int(target[-1])
                workers[i].kill()
                workers[i].wait(timeout=30)
                workers[i] = start_process_worker(st, logs / f"process-{i}.log")
            killed[target] += 1
            moments.append(stream.progress())
            clock.clear()
        published = stream.join()
        recovery = clock.recover(st, time.monotonic())
        return measure(st, f"R1 kill -9 ×{size.kills}", published, Expected(events), recovery, suite.oracle,
                       notes="killed " + ", ".join(f"{k} ×{n}" for k, n in sorted(killed.items()))
                             + f"; first kill at {moments[0]}, last at {moments[-1]}")
    finally:
        _stop(workers)
        suite.release(st)


def r2_broker_killed(suite: Suite, size: Size) -> Row:
    """R2: the Kafka broker killed with SIGKILL mid-stream, restarted after `broker_down_s`."""
    broker = suite.broker
    if broker is None:
        raise RuntimeError("R2 kills the broker: it needs the suite's own broker, not a shared one")
    st = _start(suite, "r2")
    try:
        events = suite.traffic(202, size.requests)
        clock = Clock()
        stream = _stream(st, events, size.stream_s)
        time.sleep(4.0)
        pid = broker.status()["pid"]
        if not isinstance(pid, int):
            raise RuntimeError("the suite's broker is not running")
        os.kill(pid, signal.SIGKILL)
        moment = stream.progress()
        while alive(pid, b"kafka.Kafka"):
            time.sleep(0.05)
        time.sleep(size.broker_down_s)
        broker.start(timeout=120.0)
        clock.clear()
        published = stream.join()
        worker_survived = stack_ops.worker_pid(st.settings, "all") is not None
        if not worker_survived:  # a worker that lost its broker may stop; the operator (here: us) restarts it
            st.tally("up", "--role", "all", timeout=180)
        recovery = clock.recover(st, time.monotonic())
        return measure(st, "R2 broker SIGKILL", published, Expected(events), recovery, suite.oracle,
                       notes=f"killed at {moment}, down {size.broker_down_s:.0f} s; worker "
                             + ("kept running" if worker_survived else "exited and was restarted"))
    finally:
        suite.release(st)


def r3_clickhouse_down(suite: Suite, size: Size) -> Row:
    """R3: ClickHouse unavailable for `outage_s` (every store call fails) while the stream goes on."""
    st = suite.stack("r3")
    flag = st.settings.data_dir / "clickhouse-down"
    st.settings = dataclasses.replace(st.settings, store_outage_flag=str(flag))
    st.env.update(st.settings.to_env())
    st.tally("up", "--role", "all", timeout=180)
    st.tally("reference", "load", str(EXAMPLES))
    try:
        events = suite.traffic(303, size.requests)
        half = len(events) // 2
        publish(st.settings, lines_of(events[:half]))
        wait_all(st)
        clock = Clock()
        flag.touch()
        stream = _stream(st, events[half:], size.stream_s / 4)
        # The outage lasts outage_s, and longer if the sink has not yet tried (and failed) an insert (max 120 s).
        down = time.monotonic()
        while time.monotonic() - down < size.outage_s + 120:
            time.sleep(0.5)
            if (time.monotonic() - down >= size.outage_s
                    and stack_ops.api(st.settings, "/api/status")["sink_retries"] > 0):
                break
        outage = time.monotonic() - down
        alive_through = stack_ops.worker_pid(st.settings, "all") is not None
        moment = stream.progress()
        flag.unlink()
        clock.clear()
        published = half + stream.join()
        status = stack_ops.api(st.settings, "/api/status")
        recovery = clock.recover(st, time.monotonic())
        problems = [] if alive_through else ["the worker died during the outage"]
        row = measure(st, f"R3 ClickHouse down {size.outage_s:.0f} s", published, Expected(events), recovery,
                      suite.oracle, notes=f"half saved first; down {outage:.0f} s; {moment} of the rest when "
                                          "ClickHouse came back; "
                                          f"{status['sink_retries']} failed ClickHouse calls retried")
        row.problems += problems
        if not status["sink_retries"]:
            row.problems.append("no insert failed: the outage was not injected")
        return row
    finally:
        flag.unlink(missing_ok=True)
        suite.release(st)


def _reset_groups_to_earliest(st: Stack) -> int:
    """Commit offset 0 of every partition of every topic the worker's group reads; returns partitions reset."""
    s, n = st.settings, 0
    consumer = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": s.group_id("all"),
                         "enable.auto.commit": False})
    try:
        for topic in (s.topics.usage, s.topics.attempts, s.topics.requests, s.topics.alerts):
            parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
            consumer.commit(offsets=[TopicPartition(topic, p, 0) for p in parts], asynchronous=False)
            n += len(parts)
    finally:
        consumer.close()
    return n


def r4_replayed(suite: Suite, size: Size) -> Row:
    """R4: the same file published twice, then the consumer group reset to the earliest offsets and restarted."""
    st = _start(suite, "r4")
    try:
        events = suite.traffic(404, size.requests)
        path = st.settings.data_dir / "traffic.jsonl"
        path.write_bytes(b"\n".join(lines_of(events)) + b"\n")
        st.tally("publish", str(path))
        st.tally("publish", str(path))
        wait_all(st)
        st.tally("down", timeout=120)
        reset = _reset_groups_to_earliest(st)
        clock = Clock()
        st.tally("up", "--role", "all", timeout=180)
        recovery = clock.recover(st, time.monotonic())
        return measure(st, "R4 published twice + group reset", 2 * len(events), Expected(events), recovery,
                       suite.oracle, notes=f"{reset} partitions reset to offset 0 while the worker was down")
    finally:
        suite.release(st)


def r5_shuffled_late(suite: Suite, size: Size) -> Row:
    """R5: two hours of traffic in random order: an attempt arrives up to 2 h after its neighbours in time."""
    st = _start(suite, "r5")
    try:
        gen = suite.generator(505, suite.now - timedelta(hours=3), rate=size.requests / 7200.0)
        events = flat(requests_of(gen, size.requests))
        shuffled = list(events)
        random.Random(5).shuffle(shuffled)
        clock = Clock()
        published = _stream(st, shuffled, size.stream_s / 4).join()
        recovery = clock.recover(st, time.monotonic())
        span = (max(e["timestamp"] for e in events), min(e["timestamp"] for e in events))
        return measure(st, "R5 shuffled, ≤2 h late", published, Expected(events), recovery, suite.oracle,
                       notes=f"event times {span[1]} … {span[0]}, published in random order")
    finally:
        suite.release(st)


def r6_malformed(suite: Suite, size: Size) -> Row:
    """R6: the malformed-input corpus: every DLQ reason, counted exactly, each with its original bytes."""
    st = _start(suite, "r6")
    try:
        s = st.settings
        events = suite.traffic(606, size.requests // 4)
        corpus = [pair for k in range(5) for pair in malformed_lines(events[0], k)]
        lines = lines_of(events) + [line for line, _ in corpus]
        random.Random(6).shuffle(lines)
        expected = Counter(reason for _, reason in corpus)
        published = publish(s, lines)
        wait_all(st)  # the originals are saved before their conflicting copies arrive
        producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "acks": "all"})
        for e in events[:7]:  # conflicting_duplicate: a saved event_id with other content
            lid = e.get("parent_request_id") or e["request_id"]
            producer.produce(s.topics.usage, key=lid.encode(), value=orjson.dumps({**e, "latency_ms": 1}),
                             partition=partition_for(lid, s.partitions))
        expected["conflicting_duplicate"] += 7
        stray = {**events[0], "event_id": "stray-1", "request_id": "stray-request", "parent_request_id": None}
        right = partition_for("stray-request", s.partitions)
        producer.produce(s.topics.usage, value=orjson.dumps(stray), partition=(right + 1) % s.partitions)
        expected["wrong_partition"] += 1
        producer.produce(s.topics.attempts, value=b'{"event_id": "foreign-row"}', partition=0)
        expected["bad_attempt_row"] += 1
        producer.produce(s.topics.alerts, value=b"not an alert record", partition=0)
        expected["bad_alert_row"] += 1
        if producer.flush(30):
            raise RuntimeError("the corpus' raw messages were not delivered")
        published += 7 + 3
        clock = Clock()
        recovery = clock.recover(st, time.monotonic())
        return measure(st, "R6 malformed corpus", published, Expected(events, dlq=expected), recovery,
                       suite.oracle, notes=f"{sum(expected.values())} dead letters over {len(expected)} reasons")
    finally:
        suite.release(st)


def r7_skewed_clocks(suite: Suite, size: Size) -> Row:
    """R7: gateway clocks skewed by up to ±10 min (each request by its gateway's), the newest stamped at now."""
    st = _start(suite, "r7")
    try:
        span = timedelta(minutes=20)
        gen = suite.generator(707, suite.now - span, rate=size.requests / span.total_seconds())
        rng = random.Random(7)
        newest = size.requests - 20  # the newest requests get the ±10 min extremes
        skews = [timedelta(seconds=rng.choice((-600, 600)) if i >= newest else rng.uniform(-600, 600))
                 for i in range(size.requests)]
        requests = requests_of(gen, size.requests)  # in time order, as gateways send them
        events = [shift(e, skew) for r, skew in zip(requests, skews, strict=True) for e in r]
        clock = Clock()
        published = _stream(st, events, size.stream_s / 4).join()
        recovery = clock.recover(st, time.monotonic())
        ahead = max(e["timestamp"] for e in events)
        return measure(st, "R7 clocks ±10 min", published, Expected(events, dlq=Counter()), recovery,
                       suite.oracle, notes=f"newest stamp {ahead} (scenario clock {suite.now.isoformat()}); "
                                           "no future_timestamp dead letter expected")
    finally:
        suite.release(st)


def r9_scale(suite: Suite, size: Size) -> Row:
    """R9: process workers scaled 1 → 2 → 1 mid-stream (two rebalances; the second a clean leave)."""
    st = _start(suite, "r9", role="sink")
    logs = st.settings.data_dir / "logs"
    workers = [start_process_worker(st, logs / "process-0.log")]
    try:
        events = suite.traffic(909, size.requests)
        clock = Clock()
        stream = _stream(st, events, size.stream_s)
        time.sleep(max(4.0, size.stream_s / 4))
        workers.append(start_process_worker(st, logs / "process-1.log"))
        joined = stream.progress()
        time.sleep(max(8.0, size.stream_s / 2))
        left_at = stream.progress()
        workers[1].send_signal(signal.SIGTERM)
        left = workers[1].wait(timeout=60)
        clock.clear()
        published = stream.join()
        recovery = clock.recover(st, time.monotonic())
        row = measure(st, "R9 scale 1 → 2 → 1", published, Expected(events), recovery, suite.oracle,
                      notes=f"a second process worker started at {joined} and left (exit code {left}) at "
                            f"{left_at}")
        if left != 0:
            row.problems.append(f"the leaving worker exited {left}")
        return row
    finally:
        _stop(workers)
        suite.release(st)


def _correction(estimate: Event, rng: random.Random) -> Event:
    """The late real usage of a cut stream: same call (request_id), new event_id, later stamp, exact tokens."""
    n = estimate["stream_terminated_at_token_n"]
    fixed = {k: v for k, v in estimate.items() if k != "usage_reported"}
    fixed.update(event_id=estimate["event_id"] + "-usage", usage={"input_tokens": rng.randint(100, 5000),
                                                                  "output_tokens": max(1, n - rng.randint(0, 40))})
    return shift(fixed, timedelta(seconds=2))


def r10_corrections(suite: Suite, size: Size) -> Row:
    """R10: terminated streams priced as estimates, then their real usage arrives late: each call counts once."""
    st = _start(suite, "r10")
    try:
        events = suite.traffic(1010, size.requests)
        estimates = [e for e in events if e["status"] == "terminated" and e.get("usage_reported") is False]
        rng = random.Random(10)
        corrections = [_correction(e, rng) for e in estimates]
        published = publish(st.settings, lines_of(events))
        wait_all(st)  # the estimates are saved and their requests emitted before the real usage arrives
        clock = Clock()
        published += publish(st.settings, lines_of(corrections))
        recovery = clock.recover(st, time.monotonic())
        superseded = frozenset(e["event_id"] for e in estimates)
        return measure(st, "R10 late usage corrections", published, Expected(events + corrections, superseded),
                       recovery, suite.oracle, notes=f"{len(corrections)} estimates corrected after they were saved")
    finally:
        suite.release(st)


class _Pager(BaseHTTPRequestHandler):
    """PagerDuty's Events API v2 as it counts: a trigger opens an incident unless its dedup_key is open."""

    open_keys: set[str]
    pages: Counter[str]
    resolves: Counter[str]
    deliveries: list[str]

    def do_POST(self) -> None:  # noqa: N802 - the http.server hook
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key, action = body["dedup_key"], body["event_action"]
        self.deliveries.append(action)
        if action == "trigger" and key not in self.open_keys:
            self.open_keys.add(key)
            self.pages[key] += 1
        elif action == "resolve" and key in self.open_keys:
            self.open_keys.discard(key)
            self.resolves[key] += 1
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"status": "success", "dedup_key": key}).encode())

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server signature
        return


@contextmanager
def _pager() -> Iterator[tuple[str, type[_Pager]]]:
    handler = type("Pager", (_Pager,), {"open_keys": set(), "pages": Counter(), "resolves": Counter(),
                                        "deliveries": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/enqueue", handler
    finally:
        server.shutdown()
        server.server_close()


def _unread_alerts(s: Settings) -> int:
    """Messages of the alert topic past the positions the alert consumer stored with its incident table."""
    positions = load_alert_state(alert_state_path(s)).positions
    ends = end_offsets(s.kafka_bootstrap, s.topics.alerts)
    return sum(end - positions.get((s.topics.alerts, p), 0) for p, end in ends.items())


def r11_alerts_killed(suite: Suite, size: Size) -> Row:
    """R11: the alert consumer killed (os._exit, as kill -9) after delivering a page, before committing it."""
    st = _start(suite, "r11")
    try:
        s = st.settings
        producer = Producer({"bootstrap.servers": s.kafka_bootstrap, "acks": "all"})

        def send(*records: dict[str, Any]) -> None:
            for r in records:
                producer.produce(s.topics.alerts, key=r["incident_key"].encode(), value=dump_alert(r))
            if producer.flush(30):
                raise RuntimeError("alert records not delivered")

        with _pager() as (url, pager):
            cmd = [sys.executable, "-m", "ops.cli", "alerts", "--sink", "pagerduty", "--pagerduty-url", url,
                   "--pagerduty-routing-key", "fault-suite"]
            send(alert_record(), alert_record(score=7))  # the incident opens, then fires again
            crashed = subprocess.run(cmd, env={**st.env, "TALLY_FAILPOINT": "alerts.after_delivery:1"}, cwd=REPO,
                                     capture_output=True, timeout=120, check=False)
            send(alert_record(state="resolved"))
            clock = Clock()
            # The restart reads from the position stored with the incident table, not from the (uncommitted)
            # offsets: it is told to stop after what is past that position.
            unread = _unread_alerts(s)
            again = subprocess.run([*cmd, "--max-messages", str(unread)], env=st.env, cwd=REPO, capture_output=True,
                                   timeout=120, check=False)
            recovery = time.monotonic() - clock.cleared
            pages, resolves = sum(pager.pages.values()), sum(pager.resolves.values())
            deliveries = list(pager.deliveries)
        problems = []
        if crashed.returncode != EXIT_FAILPOINT:
            problems.append(f"the first alert consumer exited {crashed.returncode}, not at the failpoint")
        if again.returncode != 0:
            problems.append(f"the restarted alert consumer exited {again.returncode}: {again.stderr[-500:]!r}")
        wait_all(st)
        row = measure(st, "R11 alert consumer killed", 3, Expected([], requests=False), recovery, suite.oracle,
                      notes=f"pager saw {deliveries} → {pages} page(s), {resolves} resolve(s); the restart read "
                            f"the {unread} message(s) past the position stored with the incident table, so "
                            "nothing was sent twice (no sink, stdout included, shows a repeat)")
        # For this row the "rows" are the pager's incidents: one page and one resolve are expected, and no
        # notification delivered twice (a re-sent trigger PagerDuty absorbs still shows twice on the other sinks).
        row.rows_out = pages + resolves
        row.lost = (pages < 1) + (resolves < 1)
        row.duplicated += max(pages - 1, 0) + max(resolves - 1, 0) + max(len(deliveries) - pages - resolves, 0)
        row.problems += problems
        return row
    finally:
        suite.release(st)


SCENARIOS: dict[str, Callable[[Suite, Size], Row]] = {
    "R1": r1_kill_9, "R2": r2_broker_killed, "R3": r3_clickhouse_down, "R4": r4_replayed, "R5": r5_shuffled_late,
    "R6": r6_malformed, "R7": r7_skewed_clocks, "R9": r9_scale, "R10": r10_corrections, "R11": r11_alerts_killed,
}
