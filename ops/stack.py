"""The local stack: Kafka broker, topics and a worker process, in the foreground (`run`) or background (`up`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from ops.kafka_local import LocalKafka, ensure_topics, wait_for_broker
from ops.proc import alive, tail
from tally.config import Settings
from tally.errors import TallyError


class StackError(TallyError):
    """The local stack could not be started or stopped."""


def _pid_file(settings: Settings, role: str) -> Path:
    return settings.data_dir / "run" / f"worker-{role}.pid"


def log_file(settings: Settings, role: str) -> Path:
    """Where a background worker of this role logs."""
    return settings.data_dir / "logs" / f"worker-{role}.log"


def _alive(pid: int) -> bool:
    return alive(pid, b"ops.cli", b"worker")


def worker_pid(settings: Settings, role: str) -> int | None:
    """The pid of the background worker of a role, if it is running."""
    path = _pid_file(settings, role)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def api(settings: Settings, path: str, payload: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Call the worker's HTTP API (GET, or POST with a JSON body); raises OSError when nobody answers."""
    data = orjson.dumps(payload) if payload is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if settings.api_token:
        headers["Authorization"] = f"Bearer {settings.api_token}"
    req = urllib.request.Request(settings.web_url + path, data=data,  # noqa: S310 - the worker own http URL
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the worker's own http URL
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            detail = orjson.loads(body).get("error", body.decode())
        except orjson.JSONDecodeError:
            detail = body.decode("utf-8", "replace")
        raise TallyError(f"worker API {path}: {detail}") from exc


def start_worker(settings: Settings, role: str = "all", wait_s: float = 90.0) -> int:
    """Start `tally worker --role ROLE` detached, logging to the data directory; wait until its API answers."""
    pid = worker_pid(settings, role)
    if pid is not None:
        return pid
    log_path = log_file(settings, role)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(settings, role).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.to_env()}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--role", role], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _pid_file(settings, role).write_text(str(proc.pid))
    if role == "process":
        return proc.pid
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the {role} worker exited with code {proc.returncode}; last lines of {log_path}:\n"
                             + tail(log_path))
        try:
            api(settings, "/api/status", timeout=2)
            return proc.pid
        except (OSError, TallyError):
            time.sleep(0.3)
    raise StackError(f"the {role} worker did not answer on {settings.web_url} within {wait_s:.0f}s; see {log_path}")


def stop_worker(settings: Settings, role: str = "all", timeout: float = 30.0) -> bool:
    """SIGTERM the background worker of a role and wait for it (SIGKILL after the timeout)."""
    pid = worker_pid(settings, role)
    path = _pid_file(settings, role)
    if pid is None:
        path.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True


def ensure_kafka(settings: Settings) -> bool:
    """Use a broker that answers at the bootstrap address, else start the project's local one.

    Returns True when this call started it (a real cluster or an already running broker is left alone).
    """
    try:
        wait_for_broker(settings.kafka_bootstrap, timeout=2.0)
        return False
    except TallyError:
        LocalKafka(settings).start()
        return True


def up(settings: Settings, role: str = "all") -> dict[str, Any]:
    """Kafka (started locally unless one answers), topics, and a background worker. Idempotent."""
    started = ensure_kafka(settings)
    created = ensure_topics(settings)
    pid = start_worker(settings, role)
    return {"kafka": settings.kafka_bootstrap, "kafka_started": started, "topics_created": created,
            "worker_pid": pid, "worker_log": str(log_file(settings, role)), "api": settings.web_url}


def down(settings: Settings) -> list[str]:
    """Stop every background worker, then the local broker."""
    stopped = [role for role in ("process", "sink", "all") if stop_worker(settings, role)]
    if LocalKafka(settings).stop():
        stopped.append("kafka")
    return stopped
