"""The e2e tier: the `tally` CLI drives a whole stack (the session broker, a worker, embedded chDB)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest

from tally.config import Settings
from tests.conftest import free_ports
from tests.rerate import Oracle

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "reference"
REFERENCE_FILES = sorted(EXAMPLES.glob("*.yaml"))


class Stack:
    """Runs `tally …` as a user would, with this test's settings in the environment."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.env = {**os.environ, **settings.to_env()}

    def tally(self, *args: str, timeout: float = 300, check: bool = True,
              stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run([sys.executable, "-m", "ops.cli", *args], env=self.env, capture_output=True,
                              timeout=timeout, input=stdin, cwd=REPO, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"tally {' '.join(args)} exited {proc.returncode}\nstdout:\n"
                                 f"{proc.stdout.decode()}\nstderr:\n{proc.stderr.decode()[-4000:]}")
        return proc

    def query(self, sql: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = orjson.loads(self.tally("query", sql, "--format", "json").stdout)
        return rows

    def assert_matches_ground_truth(self, events: list[dict[str, Any]]) -> None:
        """Every event is in usage_events exactly once and each team's total equals the independent oracle."""
        totals = self.query("SELECT count() AS n, uniqExact(event_id) AS u FROM tally.usage_events")[0]
        assert totals == {"n": len(events), "u": len(events)}
        oracle = Oracle(REFERENCE_FILES)
        expected: dict[str, Fraction] = defaultdict(Fraction)
        for e in events:
            ts = datetime.fromisoformat(e["timestamp"])
            expected[oracle.team(e, ts)] += oracle.cost(e, ts)
        by_team = self.query("SELECT team_id, toString(sum(cost_total_usd)) AS total FROM tally.usage_events "
                             "GROUP BY team_id")
        assert {r["team_id"]: Fraction(Decimal(r["total"])) for r in by_team} == dict(expected)

    def assert_requests_match_ground_truth(self, events: list[dict[str, Any]]) -> None:
        """Per feature, the logical requests (each once, at its latest revision) and their cost equal the oracle's.

        Ground truth: one logical request per parent_request_id (or request_id), costed as the exact sum of its
        attempts; its feature is the feature tag of its attempts.
        """
        oracle = Oracle(REFERENCE_FILES)
        requests: dict[str, str] = {}
        cost: dict[str, Fraction] = defaultdict(Fraction)
        for e in events:
            lid = e.get("parent_request_id") or e["request_id"]
            requests[lid] = e["tags"].get("feature_id", "")
            cost[requests[lid]] += oracle.cost(e, datetime.fromisoformat(e["timestamp"]))
        expected = {f: (n, cost[f]) for f, n in Counter(requests.values()).items()}
        rows = self.query("SELECT feature_id, toInt64(sum(sign)) AS n, toString(sum(sign * cost_total_usd)) AS c, "
                          "toString(sum(sign * (cost_wasted_usd + cost_final_usd - cost_total_usd))) AS gap "
                          "FROM tally.logical_requests GROUP BY feature_id")
        assert {r["feature_id"]: (r["n"], Fraction(Decimal(r["c"]))) for r in rows} == expected
        assert all(Decimal(r["gap"]) == 0 for r in rows)
        current = self.query("SELECT count() AS n, uniqExact(logical_request_id) AS u "
                             "FROM tally.logical_requests_current")[0]
        assert current == {"n": len(requests), "u": len(requests)}

    def worker_pid(self) -> int:
        return int((self.settings.data_dir / "run" / "worker-all.pid").read_text())


@pytest.fixture
def stack(kafka_settings: Settings) -> Iterator[Stack]:
    # The offsets audit on: a failed test's worker logs say which input each stage saved, replayed or held back.
    settings = dataclasses.replace(kafka_settings, web_port=free_ports(1)[0], audit_offsets=True)
    st = Stack(settings)
    yield st
    st.tally("down", check=False, timeout=120)
