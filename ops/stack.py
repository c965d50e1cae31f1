"""The local stack: Kafka broker, topics and worker processes, in the foreground (`run`) or background (`up`)."""

from __future__ import annotations

import dataclasses
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


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.data_dir / "run" / f"worker-{name}.pid"


def log_file(settings: Settings, name: str) -> Path:
    """Where a background worker logs (`name`: its role, or `process-2`… for the second process worker on)."""
    return settings.data_dir / "logs" / f"worker-{name}.log"


def role_of(name: str) -> str:
    """A background worker's role from its name: `process-2` is the second process worker."""
    return name.split("-", 1)[0]


def default_workers() -> int:
    """Process workers on this machine by default: one a core, less the core the sink keeps (at least one)."""
    return max(1, (os.cpu_count() or 2) - 1)


def worker_settings(settings: Settings, name: str) -> Settings:
    """One background worker's settings: process worker k serves its /metrics and probes on process_web_port + k - 1.

    (Several process workers on one host cannot share a port; in a container or pod each has its own address and
    the same port.)
    """
    if role_of(name) != "process" or not settings.process_web_port:
        return settings
    k = int(name.split("-", 1)[1]) if "-" in name else 1
    port = settings.process_web_port + k - 1
    if port in (settings.web_port, settings.kafka_controller_port) or port > 65535:
        raise StackError(f"process worker {k} would serve on port {port}, which web_port, the controller or the "
                         "port range holds: choose another TALLY_PROCESS_WEB_PORT")
    return dataclasses.replace(settings, process_web_port=port)


def layout(workers: int) -> list[str]:
    """The background workers of the default stack, in start order.

    The sink (it applies the migrations and serves the API), then `workers` process workers, each an OS process of
    its own (validate, enrich, fold, detect).
    """
    if workers < 1:
        raise StackError(f"--workers must be at least 1, not {workers}")
    return ["sink", "process", *(f"process-{i}" for i in range(2, workers + 1))]


def _alive(pid: int) -> bool:
    return alive(pid, b"ops.cli", b"worker")


def worker_pid(settings: Settings, name: str) -> int | None:
    """The pid of a background worker (by role, or name: `process-2`), if it is running."""
    path = _pid_file(settings, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def running_workers(settings: Settings) -> dict[str, int]:
    """Every background worker that is running, by name (`all`, `sink`, `process`, `process-2`, …)."""
    out: dict[str, int] = {}
    for path in sorted((settings.data_dir / "run").glob("worker-*.pid")):
        name = path.stem.removeprefix("worker-")
        pid = worker_pid(settings, name)
        if pid is not None:
            out[name] = pid
    return out


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


def start_worker(settings: Settings, role: str = "all", wait_s: float = 90.0, name: str | None = None) -> int:
    """Start `tally worker --role ROLE` detached, logging to the data directory; wait until its API answers.

    `name` tells several workers of one role apart (pid and log files); a process worker serves no API and is not
    waited for.
    """
    name = name or role
    pid = worker_pid(settings, name)
    if pid is not None:
        return pid
    log_path = log_file(settings, name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _pid_file(settings, name).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.to_env()}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--role", role], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _pid_file(settings, name).write_text(str(proc.pid))
    if role == "process":
        return proc.pid
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the {name} worker exited with code {proc.returncode}; last lines of {log_path}:\n"
                             + tail(log_path))
        try:
            api(settings, "/api/status", timeout=2)
            return proc.pid
        except (OSError, TallyError):
            time.sleep(0.3)
    raise StackError(f"the {name} worker did not answer on {settings.web_url} within {wait_s:.0f}s; see {log_path}")


def stop_worker(settings: Settings, name: str = "all", timeout: float = 30.0) -> bool:
    """SIGTERM a background worker (by role, or name) and wait for it (SIGKILL after the timeout)."""
    pid = worker_pid(settings, name)
    path = _pid_file(settings, name)
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


def stop_workers(settings: Settings) -> list[str]:
    """Stop every background worker: the process workers first (they feed the sink), then the sink or role all."""
    names = sorted(running_workers(settings), key=lambda n: (role_of(n) != "process", n))
    return [name for name in names if stop_worker(settings, name)]


def ensure_kafka(settings: Settings) -> bool:
    """Use a broker that answers at the bootstrap address, else start the project's local one.

    Returns True when this call started it (a real cluster or an already running broker is left alone).
    """
    try:
        wait_for_broker(settings.kafka, timeout=2.0)
        return False
    except TallyError:
        LocalKafka(settings).start()
        return True


def up(settings: Settings, role: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Kafka (started locally unless one answers), topics, and the background workers. Idempotent.

    With a `role`, one worker of that role (`all`: every stage in one process). Without, the default stack: the
    sink and `workers` process workers (default_workers()), each its own OS process, so the stages do not share one
    interpreter lock.
    """
    if role is not None and workers is not None:
        raise StackError("give --role (one worker) or --workers (the default stack), not both")
    started = ensure_kafka(settings)
    created = ensure_topics(settings)
    names = [role] if role is not None else layout(workers or default_workers())
    started_workers = [{"name": name, "role": role_of(name),
                        "pid": start_worker(worker_settings(settings, name), role_of(name), name=name),
                        "log": str(log_file(settings, name))} for name in names]
    return {"kafka": settings.kafka_bootstrap, "kafka_started": started, "topics_created": created,
            "workers": started_workers, "api": settings.web_url}


def down(settings: Settings) -> list[str]:
    """Stop every background worker, then the local broker."""
    stopped = stop_workers(settings)
    if LocalKafka(settings).stop():
        stopped.append("kafka")
    return stopped
