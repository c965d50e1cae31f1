"""The fault suite's harness: a stack per scenario on one loopback broker, the oracle's verdict as one table row."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson

from ops import stack as stack_ops
from ops.kafka_local import LocalKafka, ensure_topics
from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.config import Settings
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.conftest import TEST_PARTITIONS, delete_topics, free_ports
from tests.e2e.conftest import REFERENCE_FILES, REPO, Stack
from tests.rerate import Oracle

log = logging.getLogger("tally.faults")

Event = dict[str, Any]


@dataclasses.dataclass
class Row:
    """One scenario's verdict. `duplicated` counts every usage_events row beyond one per expected event (a second
    copy, or a row nobody should have written); `cost_diff` is Σ|stored − oracle| over UTC day × team, exact."""

    scenario: str
    events_in: int
    rows_out: int
    lost: int
    duplicated: int
    cost_diff: Fraction
    recovery_s: float
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.cost_diff == 0 and not self.problems


HEADER = ("scenario", "events in", "rows out", "lost", "duplicated", "cost diff (USD)", "recovery s", "verdict")


def _cells(row: Row) -> tuple[str, ...]:
    diff = "0 (exact)" if row.cost_diff == 0 else f"{row.cost_diff} (≈{float(row.cost_diff):.9f})"
    verdict = "ok" if row.ok else "FAIL: " + "; ".join(
        [*([f"{row.lost} lost"] if row.lost else []), *([f"{row.duplicated} duplicated"] if row.duplicated else []),
         *(["cost differs"] if row.cost_diff else []), *row.problems])
    return (row.scenario, f"{row.events_in:,}", f"{row.rows_out:,}", str(row.lost), str(row.duplicated), diff,
            f"{row.recovery_s:.1f}", verdict)


def table(rows: Sequence[Row]) -> str:
    """The suite's table, one line per scenario, and each scenario's notes below it."""
    lines = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    out += [f"  {r.scenario}: {r.notes}" for r in rows if r.notes]
    return "\n".join(out)


@dataclasses.dataclass
class Expected:
    """What a scenario must find: each good event once, exact costs, and (when given) the DLQ count per reason.

    `superseded`: event_ids of rows a later row of the same physical call replaces (a terminated stream's estimate
    and its late usage): they stay in usage_events but count nowhere. `requests`: compare logical_requests with the
    oracle (one per parent_request_id or request_id, at the exact sum of its counted attempts).
    """

    events: list[Event]
    superseded: frozenset[str] = frozenset()
    dlq: Counter[str] | None = None
    requests: bool = True


# A request still open in the fold is not emitted until its partition's clock passes its last attempt + the
# inactivity time; once the input stops, that clock runs on with wall time, so with the default 600 s the last
# requests of a stream would take up to 10 minutes to appear. The scenarios shorten it (and wait for the requests,
# bounded by REQUESTS_SETTLE_S); the fold's decisions are the same, only sooner.
FOLD_TIMING: dict[str, Any] = {"fold_inactivity_s": 60.0}
REQUESTS_SETTLE_S = 150.0


class Suite:
    """The suite's broker (its own LocalKafka on free loopback ports, or one passed in) and a stack per scenario."""

    def __init__(self, root: Path, bootstrap: str | None = None) -> None:
        self.root = root
        self.broker: LocalKafka | None = None
        self.docs = load_reference_files(REFERENCE_FILES)
        self.oracle = Oracle(REFERENCE_FILES)
        self.now = datetime.now(UTC).replace(microsecond=0)  # the clock every event time of a scenario derives from
        self._stacks: list[Stack] = []
        if bootstrap is None:
            listener, controller = free_ports(2)
            self.broker = LocalKafka(Settings(data_dir=root / "broker", kafka_bootstrap=f"127.0.0.1:{listener}",
                                              kafka_controller_port=controller, partitions=TEST_PARTITIONS))
            self.broker.start(timeout=120.0)
            bootstrap = self.broker.bootstrap
        self.bootstrap = bootstrap

    def stack(self, name: str, **overrides: Any) -> Stack:
        """A fresh stack for one scenario: its own topics, data directory, web port and consumer groups.

        Also reads the clock again: a scenario's event times derive from the moment its stack was made, so the
        skew scenario's stamps stay ±10 min around the worker's ingest time however long the suite has run.
        """
        self.now = datetime.now(UTC).replace(microsecond=0)
        data_dir = self.root / name
        for n in range(2, 1000):  # a scenario run again (--only R1,R1) gets a directory of its own
            if not data_dir.exists():
                break
            data_dir = self.root / f"{name}-{n}"
        settings = Settings(data_dir=data_dir, kafka_bootstrap=self.bootstrap,
                            topic_prefix=f"f{uuid.uuid4().hex[:8]}.", partitions=TEST_PARTITIONS,
                            web_port=free_ports(1)[0], **{**FOLD_TIMING, **overrides})
        ensure_topics(settings)
        st = Stack(settings)
        self._stacks.append(st)
        return st

    def generator(self, seed: int, start: datetime, rate: float = 20.0) -> TrafficGenerator:
        return TrafficGenerator(catalog_from_reference(self.docs), seed=seed, bad_rate=0.0, rate=rate, start=start)

    def traffic(self, seed: int, requests: int) -> list[Event]:
        """The attempts of `requests` logical requests at 50 a second, starting 3 h before the suite's clock."""
        return flat(requests_of(self.generator(seed, self.now - timedelta(hours=3), rate=50.0), requests))

    def release(self, st: Stack) -> None:
        """Stop a scenario's workers and delete its topics (its data directory stays, for the logs)."""
        st.tally("down", check=False, timeout=120)
        delete_topics(self.bootstrap, list(st.settings.topics.all()))

    def close(self) -> None:
        for st in self._stacks:
            st.tally("down", check=False, timeout=120)
        if self.broker is not None:
            self.broker.stop()


def publish(settings: Settings, lines: Iterable[bytes]) -> int:
    """Publish NDJSON lines to the usage topic (delivered when this returns); returns how many."""
    n = 0
    with Publisher(settings.kafka_bootstrap, settings.topics.usage) as pub:
        for line in lines:
            pub.publish_line(line)
            n += 1
    return n


class Streaming:
    """Publishes lines from a thread, spread over about `seconds`, while a scenario injects its fault.

    `sent` counts the lines handed to the publisher so far (a scenario notes how far the stream was when the fault
    hit); `join` waits until every line is delivered and re-raises a publishing failure.
    """

    def __init__(self, settings: Settings, lines: Sequence[bytes], seconds: float) -> None:
        self.error: BaseException | None = None
        self.sent = 0
        self.total = len(lines)
        chunk = 500
        pause = seconds / max(1, len(lines) // chunk)

        def run() -> None:
            try:
                with Publisher(settings.kafka_bootstrap, settings.topics.usage) as pub:
                    for line in lines:
                        pub.publish_line(line)
                        self.sent += 1
                        if self.sent % chunk == 0:
                            time.sleep(pause)
            except BaseException as exc:  # noqa: BLE001 - handed to join()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def progress(self) -> str:
        return f"{self.sent:,} of {self.total:,} lines sent"

    def join(self, timeout: float = 600.0) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"publishing did not finish within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.sent


def start_process_worker(st: Stack, log_path: Path) -> subprocess.Popen[bytes]:
    """One more `tally worker --role process` (several share the input partitions and the fold state)."""
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--role", "process"], env=st.env, cwd=REPO,
                            stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(st: Stack, timeout: float = 400.0) -> float:
    """`tally wait` until every published line is in ClickHouse or the DLQ; returns the seconds it took."""
    started = time.monotonic()
    st.tally("wait", "--timeout", str(timeout), timeout=timeout + 60)
    return time.monotonic() - started


def _ts(e: Event) -> datetime:
    return datetime.fromisoformat(e["timestamp"])


def _rows_by_event(st: Stack) -> Counter[str]:
    rows = st.query("SELECT event_id, toUInt64(count()) AS n FROM tally.usage_events GROUP BY event_id")
    return Counter({r["event_id"]: int(r["n"]) for r in rows})


def _cost_by_day_team(st: Stack) -> dict[tuple[str, str], Fraction]:
    rows = st.query("SELECT toString(toDate(ts)) AS d, team_id, toString(sum(cost_total_usd)) AS c "
                    "FROM tally.usage_events_current GROUP BY d, team_id")
    return {(r["d"], r["team_id"]): Fraction(Decimal(r["c"])) for r in rows}


def _requests_problems(st: Stack, oracle: Oracle, counted: Sequence[Event], all_events: Sequence[Event]) -> list[str]:
    """logical_requests against the oracle: per feature, requests (each once) and exact cost of counted attempts."""
    feature: dict[str, str] = {}
    for e in all_events:
        feature[e.get("parent_request_id") or e["request_id"]] = e["tags"].get("feature_id", "")
    cost: dict[str, Fraction] = defaultdict(Fraction)
    for e in counted:
        cost[feature[e.get("parent_request_id") or e["request_id"]]] += oracle.cost(e, _ts(e))
    expected = {f: (n, cost[f]) for f, n in Counter(feature.values()).items()}
    rows = st.query("SELECT feature_id, toInt64(sum(sign)) AS n, toString(sum(sign * cost_total_usd)) AS c "
                    "FROM tally.logical_requests GROUP BY feature_id")
    got = {r["feature_id"]: (int(r["n"]), Fraction(Decimal(r["c"]))) for r in rows}
    problems = []
    for f in sorted(set(expected) | set(got)):
        want, have = expected.get(f, (0, Fraction(0))), got.get(f, (0, Fraction(0)))
        if want != have:
            problems.append(f"logical_requests of {f or '(no feature)'}: {have[0]} requests costing "
                            f"{float(have[1]):.9f}, oracle {want[0]} costing {float(want[1]):.9f}")
    current = st.query("SELECT toUInt64(count()) AS n, toUInt64(uniqExact(logical_request_id)) AS u "
                       "FROM tally.logical_requests_current")[0]
    if (int(current["n"]), int(current["u"])) != (len(feature), len(feature)):
        problems.append(f"logical_requests_current holds {current['n']} rows of {current['u']} requests, "
                        f"oracle {len(feature)}")
    return problems[:5]


def dlq_by_reason(st: Stack) -> Counter[str]:
    dlq = orjson.loads(st.tally("dlq", "show", "--format", "json", "--limit", "1").stdout)
    return Counter(dlq["by_reason"])


def verify_problems(st: Stack, events: Sequence[Event]) -> list[str]:
    """`tally verify` over the UTC days the events span: every rollup grain against its sources."""
    days = [_ts(e).astimezone(UTC).date() for e in events] or [datetime.now(UTC).date()]
    proc = st.tally("verify", "--since", min(days).isoformat(), "--until", max(days).isoformat(), check=False)
    if proc.returncode == 0:
        return []
    return [f"tally verify exited {proc.returncode}: {proc.stdout.decode().strip().splitlines()[-3:]}"]


def measure(st: Stack, scenario: str, events_in: int, expected: Expected, recovery_s: float,
            oracle: Oracle, notes: str = "", extra: Callable[[], list[str]] | None = None) -> Row:
    """The scenario's row: rows out, lost, duplicated and cost against the oracle, plus requests, DLQ, verify."""
    want = {e["event_id"] for e in expected.events}
    got = _rows_by_event(st)
    rows_out = sum(got.values())
    lost = len(want - set(got))
    duplicated = rows_out - (len(want) - lost)
    counted = [e for e in expected.events if e["event_id"] not in expected.superseded]
    oracle_cost: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
    for e in counted:
        ts = _ts(e)
        oracle_cost[(ts.astimezone(UTC).date().isoformat(), oracle.team(e, ts))] += oracle.cost(e, ts)
    stored = _cost_by_day_team(st)
    cost_diff = sum((abs(stored.get(k, Fraction(0)) - oracle_cost.get(k, Fraction(0)))
                     for k in set(stored) | set(oracle_cost)), Fraction(0))
    problems: list[str] = []
    if expected.requests:  # requests still open in the fold are emitted later: wait for them, bounded
        settling = time.monotonic()
        while (found := _requests_problems(st, oracle, counted, expected.events)) and \
                time.monotonic() - settling < REQUESTS_SETTLE_S:
            time.sleep(3.0)
        recovery_s += time.monotonic() - settling
        problems += found
    if expected.dlq is not None:
        found = dlq_by_reason(st)
        if found != expected.dlq:
            problems.append(f"DLQ by reason {dict(found)}, expected {dict(expected.dlq)}")
    problems += verify_problems(st, expected.events)
    if extra is not None:
        problems += extra()
    return Row(scenario, events_in, rows_out, lost, duplicated, cost_diff, recovery_s, problems, notes)


def lines_of(events: Iterable[Event]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


def requests_of(gen: TrafficGenerator, n: int) -> list[list[Event]]:
    return [gen.logical_request() for _ in range(n)]


def flat(requests: Iterable[list[Event]]) -> list[Event]:
    return [e for r in requests for e in r]


def shift(e: Event, by: timedelta) -> Event:
    """A copy of the event stamped `by` later (a gateway whose clock is off by that much)."""
    return {**e, "timestamp": (_ts(e) + by).isoformat(timespec="milliseconds").replace("+00:00", "Z")}


def worker_log(st: Stack, role: str = "all") -> Path:
    return stack_ops.log_file(st.settings, role)
