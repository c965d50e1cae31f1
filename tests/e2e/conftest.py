"""The e2e tier: the `tally` CLI drives a whole stack (the session broker, a worker, embedded chDB)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tally.config import Settings
from tests.conftest import free_ports

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "reference"


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

    def worker_pid(self) -> int:
        return int((self.settings.data_dir / "run" / "worker-all.pid").read_text())


@pytest.fixture
def stack(kafka_settings: Settings) -> Iterator[Stack]:
    settings = dataclasses.replace(kafka_settings, web_port=free_ports(1)[0])
    st = Stack(settings)
    yield st
    st.tally("down", check=False, timeout=120)
