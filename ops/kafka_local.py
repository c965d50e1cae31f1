"""The project's own single-node Kafka broker (KRaft, loopback only): fetch, format, start, stop, topics."""

from __future__ import annotations

import base64
import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from ops.proc import alive, tail
from tally.config import REPO_ROOT, Settings
from tally.errors import KafkaLocalError
from tally.kafka_auth import KafkaAuth, as_auth, metadata, watched

log = logging.getLogger(__name__)

KAFKA_DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"
FETCH_SCRIPT = KAFKA_DEPLOY_DIR / "fetch.sh"
LIBS_DIR = KAFKA_DEPLOY_DIR / "libs"
LIBS_MARKER = LIBS_DIR / ".complete"
LOG4J2_CONFIG = KAFKA_DEPLOY_DIR / "log4j2.yaml"

MIB = 1024 * 1024
# Broker-wide record-batch limit: a DLQ record carries the original (up to 1 MiB) message base64-encoded
# (4/3 of it) plus its reason and metadata, so 8 MiB plus a margin leaves plenty of room.
BROKER_MESSAGE_MAX_BYTES = 8 * MIB + 256 * 1024
DLQ_MAX_MESSAGE_BYTES = BROKER_MESSAGE_MAX_BYTES
# The usage topic accepts messages above the 1 MiB application limit so that they arrive and are rejected
# with a reason instead of failing in the producer.
USAGE_MAX_MESSAGE_BYTES = 2 * MIB

JVM_FLAGS: tuple[str, ...] = (
    "-Xmx512m",
    "-Xms256m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

_LOG_TAIL_LINES = 30
_POLL_S = 0.25



def _split_hostport(hostport: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts; KafkaLocalError when malformed."""
    host, sep, port = hostport.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KafkaLocalError(f"kafka bootstrap {hostport!r} is not host:port")
    return host.strip("[]"), int(port)


def _loopback_addresses(host: str) -> list[tuple[socket.AddressFamily, str]]:
    """Every address `host` resolves to; KafkaLocalError unless all of them are loopback."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise KafkaLocalError(f"cannot resolve Kafka listener host {host!r}: {exc}") from exc
    out: list[tuple[socket.AddressFamily, str]] = []
    for family, _, _, _, sockaddr in infos:
        addr = str(sockaddr[0])
        if not ipaddress.ip_address(addr.split("%", maxsplit=1)[0]).is_loopback:
            raise KafkaLocalError(
                f"the local Kafka broker listens on loopback only, but {host!r} resolves to {addr}; "
                "use 127.0.0.1 (or localhost) in kafka_bootstrap, or point kafka_bootstrap at your own "
                "broker and do not start the local one"
            )
        if (family, addr) not in out:
            out.append((family, addr))
    return out


def _port_in_use(family: socket.AddressFamily, addr: str, port: int) -> bool:
    """Tell whether something already holds `addr:port`, trying to bind as the JVM does (SO_REUSEADDR)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                # e.g. ::1 listed by the resolver but IPv6 disabled: the JVM cannot use it either
                return False
            raise
    return False


def _tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _admin(bootstrap: str | KafkaAuth) -> AdminClient:
    return _watched_admin(bootstrap)[0]


def _watched_admin(bootstrap: str | KafkaAuth) -> tuple[AdminClient, list[Any]]:
    """An admin client and the errors its error_cb hears (`tally.kafka_auth.metadata` fails fast on a refusal)."""
    conf, errors = watched(bootstrap, {
        "socket.connection.setup.timeout.ms": 5000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 500,
        "logger": logging.getLogger(f"{__name__}.rdkafka"),
    })
    return AdminClient(conf), errors


def _answers_metadata(bootstrap: str | KafkaAuth, timeout: float) -> bool:
    """One metadata round trip: True when a broker answered with itself in the cluster metadata."""
    # A cheap TCP probe first: the broker opens its listener late in startup, and librdkafka
    # would log every refused connection.
    entries = [_split_hostport(e) for e in as_auth(bootstrap).bootstrap.split(",") if e.strip()]
    if not any(_tcp_open(host, port, min(timeout, 0.5)) for host, port in entries):
        return False
    try:
        md = _admin(bootstrap).list_topics(timeout=max(timeout, 0.1))
    except KafkaException:
        return False
    return bool(md.brokers)


def _wait(bootstrap: str | KafkaAuth, timeout: float, alive: Callable[[], bool] | None = None) -> bool:
    """Poll until the broker answers metadata (True), the timeout passes or `alive()` turns False (False)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if alive is not None and not alive():
            return False
        if _answers_metadata(bootstrap, min(2.0, max(remaining, 0.1))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def wait_for_broker(bootstrap: str | KafkaAuth, timeout: float) -> None:
    """Block until a broker at `bootstrap` answers a metadata request; KafkaLocalError after `timeout` s."""
    if not _wait(bootstrap, timeout):
        raise KafkaLocalError(
            f"no Kafka broker answered a metadata request at {bootstrap} within {timeout:.0f}s"
        )


def random_cluster_id() -> str:
    """Make a KRaft cluster id as Kafka does: 16 random bytes, base64url unpadded, no leading '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):
            return cid


class LocalKafka:
    """One KRaft broker+controller on loopback, its data under `settings.data_dir / "kafka"`."""

    def __init__(self, settings: Settings, extra_properties: Mapping[str, str] | None = None,
                 format_args: Sequence[str] = ()) -> None:
        """Configure the broker of this data directory (not started yet).

        `extra_properties` are added to (or override) the generated server.properties; `format_args` are passed to
        the storage format (`--add-scram SCRAM-SHA-512=[name=…,password=…]`: SCRAM users exist from the first start).
        """
        self.settings = settings
        self.extra_properties = dict(extra_properties or {})
        self.format_args = tuple(format_args)
        self.bootstrap = settings.kafka_bootstrap.strip()
        self.controller_port = settings.kafka_controller_port
        self.home = (settings.data_dir / "kafka").resolve()
        self.log_dir = self.home / "kraft-logs"
        self.pid_file = self.home / "kafka.pid"
        self.config_file = self.home / "server.properties"
        self.server_log = self.home / "server.log"
        self.console_log = self.home / "kafka.out"
        self._proc: subprocess.Popen[bytes] | None = None

    # --- what and where -------------------------------------------------------------------------------------

    def _listener(self) -> tuple[str, int]:
        if "," in self.bootstrap:
            raise KafkaLocalError(
                "the local Kafka broker is a single node; kafka_bootstrap must be one host:port, "
                f"got {self.bootstrap!r}"
            )
        return _split_hostport(self.bootstrap)

    def server_properties(self) -> str:
        """Render the broker's server.properties for this data directory and these ports."""
        host, port = self._listener()
        lhost = f"[{host}]" if ":" in host else host
        ctrl = f"127.0.0.1:{self.controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": ctrl,
            "listeners": f"PLAINTEXT://{lhost}:{port},CONTROLLER://{ctrl}",
            "advertised.listeners": f"PLAINTEXT://{lhost}:{port},CONTROLLER://{ctrl}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": str(self.settings.partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            "offsets.topic.replication.factor": "1",
            # 50 partitions by default; on one small node fewer make the first consumer group appear faster.
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "8",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(BROKER_MESSAGE_MAX_BYTES),
            "replica.fetch.max.bytes": str(BROKER_MESSAGE_MAX_BYTES + MIB),
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * MIB),
            "log.retention.check.interval.ms": "300000",
            "log.cleaner.dedupe.buffer.size": str(32 * MIB),
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            **self.extra_properties,
        }
        header = "# Generated by ops/kafka_local.py on every start; edit that file, not this one.\n"
        return header + "".join(f"{k}={v}\n" for k, v in props.items())

    # --- jars ---------------------------------------------------------------------------------------------

    def ensure_jars(self) -> Path:
        """Return the directory of broker jars, fetched with Maven (deploy/kafka/fetch.sh) the first time."""
        if LIBS_MARKER.is_file():
            return LIBS_DIR
        if shutil.which("mvn") is None:
            raise KafkaLocalError(
                "Apache Maven (mvn) is needed once to fetch the Kafka broker jars (deploy/kafka/pom.xml) "
                "but is not on PATH; install it (Debian/Ubuntu: apt-get install maven) and retry"
            )
        log.info("fetching Kafka broker jars with Maven (once)")
        try:
            proc = subprocess.run(
                ["bash", str(FETCH_SCRIPT)], cwd=KAFKA_DEPLOY_DIR, capture_output=True, text=True,
                timeout=1800, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaLocalError("fetching the Kafka broker jars with Maven took over 30 minutes") from exc
        if proc.returncode != 0 or not LIBS_MARKER.is_file():
            output = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise KafkaLocalError(
                f"fetching the Kafka broker jars failed (deploy/kafka/fetch.sh exit {proc.returncode}):\n"
                f"{output}"
            )
        log.info("%s", proc.stdout.strip())
        return LIBS_DIR

    # --- process bookkeeping --------------------------------------------------------------------------------

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _pid_alive(self, pid: int) -> bool:
        """Tell whether `pid` is a live (not zombie) process that is this data directory's broker."""
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None
        return alive(pid, b"kafka.Kafka", str(self.config_file).encode())

    def _running_pid(self) -> int | None:
        pid = self._read_pid()
        if pid is not None and self._pid_alive(pid):
            return pid
        return None

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        if java_home and (Path(java_home) / "bin" / "java").is_file():
            return str(Path(java_home) / "bin" / "java")
        java = shutil.which("java")
        if java is None:
            raise KafkaLocalError("java (17 or newer) is needed to run the local Kafka broker; not on PATH")
        return java

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        return [
            self._java(), *JVM_FLAGS,
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self.home}",
            "-cp", str(LIBS_DIR / "*"),
            main, *args,
        ]

    def _check_ports_free(self) -> None:
        host, port = self._listener()
        for family, addr in _loopback_addresses(host):
            if _port_in_use(family, addr, port):
                raise KafkaLocalError(
                    f"port {port} (Kafka listener) is already in use on {addr}; stop whatever holds it "
                    f"(another Kafka?) or choose another port with TALLY_KAFKA_BOOTSTRAP"
                )
        if self.controller_port == port:
            raise KafkaLocalError(f"the Kafka listener and the KRaft controller cannot share port {port}")
        if _port_in_use(socket.AF_INET, "127.0.0.1", self.controller_port):
            raise KafkaLocalError(
                f"port {self.controller_port} (KRaft controller) is already in use on 127.0.0.1; stop "
                "whatever holds it or choose another port with TALLY_KAFKA_CONTROLLER_PORT"
            )

    def _format(self) -> None:
        """Format the KRaft log directory once (a standalone dynamic quorum); no-op when already formatted."""
        if (self.log_dir / "meta.properties").is_file():
            return
        cmd = self._java_cmd(
            "kafka.tools.StorageTool", "format", "--standalone", "-t", random_cluster_id(),
            "-c", str(self.config_file), *self.format_args,
        )
        try:
            proc = subprocess.run(
                cmd, cwd=self.home, capture_output=True, text=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaLocalError("formatting the KRaft log directory took over 120s") from exc
        if proc.returncode != 0:
            output = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_LOG_TAIL_LINES:])
            raise KafkaLocalError(f"formatting the KRaft log directory {self.log_dir} failed:\n{output}")
        log.info("formatted %s: %s", self.log_dir, proc.stdout.strip())

    def _logs_tail(self) -> str:
        """Collect the last lines of server.log and of the console output (the latter if it adds news)."""
        console, server = tail(self.console_log).strip(), tail(self.server_log).strip()
        parts = []
        if console and console not in server:
            parts.append(f"--- last lines of {self.console_log} ---\n{console}")
        if server:
            parts.append(f"--- last lines of {self.server_log} ---\n{server}")
        return "\n".join(parts) or "(the broker wrote no log)"

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker detached and wait until it answers metadata; no-op when it is already running."""
        pid = self._running_pid()
        if pid is not None:
            if _wait(self.bootstrap, timeout, lambda: self._pid_alive(pid)):
                return
            raise KafkaLocalError(
                f"a local Kafka broker (pid {pid}) is running but does not answer at {self.bootstrap}; "
                f"stop it first and retry\n{self._logs_tail()}"
            )
        self.pid_file.unlink(missing_ok=True)  # stale
        self._listener()
        self._check_ports_free()
        self.ensure_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.server_properties())
        self._format()

        started = time.monotonic()
        with self.console_log.open("ab") as out:
            self._proc = subprocess.Popen(
                self._java_cmd("kafka.Kafka", str(self.config_file)),
                cwd=self.home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self._proc
        self.pid_file.write_text(f"{proc.pid}\n")
        if _wait(self.bootstrap, timeout, lambda: proc.poll() is None):
            log.info("local Kafka broker (pid %d) answers at %s after %.1fs",
                     proc.pid, self.bootstrap, time.monotonic() - started)
            return
        if proc.poll() is not None:
            self.pid_file.unlink(missing_ok=True)
            raise KafkaLocalError(
                f"the local Kafka broker exited with status {proc.returncode} while starting\n"
                f"{self._logs_tail()}"
            )
        tail = self._logs_tail()
        self.stop()
        raise KafkaLocalError(
            f"the local Kafka broker did not answer at {self.bootstrap} within {timeout:.0f}s; "
            f"stopped it\n{tail}"
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM the broker, SIGKILL it after `timeout` seconds; True if one was running."""
        pid = self._read_pid()
        if pid is None or not self._pid_alive(pid):
            self.pid_file.unlink(missing_ok=True)
            self._proc = None
            return False
        self._signal(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            log.warning("local Kafka broker (pid %d) did not stop within %.0fs; killing it", pid, timeout)
            self._signal(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10.0):
                raise KafkaLocalError(f"the local Kafka broker (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        self._proc = None
        return True

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def status(self) -> dict[str, object]:
        """Whether the broker runs, its pid, where it listens and keeps its data, and whether it answers."""
        pid = self._running_pid()
        return {
            "running": pid is not None,
            "pid": pid,
            "bootstrap": self.bootstrap,
            "data_dir": str(self.home),
            "answers_metadata": _answers_metadata(self.bootstrap, 2.0),
        }


# --- topics -------------------------------------------------------------------------------------------------


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Map every tally topic to the configuration it is created with."""
    topics = settings.topics
    out: dict[str, dict[str, str]] = {name: {} for name in topics.all()}
    for name in topics.compacted():
        out[name]["cleanup.policy"] = "compact"
    out[topics.dlq]["max.message.bytes"] = str(DLQ_MAX_MESSAGE_BYTES)
    out[topics.usage]["max.message.bytes"] = str(USAGE_MAX_MESSAGE_BYTES)
    if topics.otlp:  # a Collector's batch of spans is as large as an SDK batch message may be
        out[topics.otlp]["max.message.bytes"] = str(USAGE_MAX_MESSAGE_BYTES)
    return out


def _partition_counts(admin: AdminClient, names: Sequence[str], timeout: float,
                      watch: tuple[list[Any], str | KafkaAuth] | None = None) -> dict[str, int]:
    md = admin.list_topics(timeout=timeout) if watch is None else metadata(admin, watch[0], watch[1], timeout)
    return {n: len(md.topics[n].partitions) for n in names if n in md.topics and md.topics[n].error is None}


def _await_topics(admin: AdminClient, names: Sequence[str], timeout: float) -> dict[str, int]:
    """Poll metadata until all of `names` are visible (or `timeout` passes); return their partition counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = _partition_counts(admin, names, timeout)
        if len(counts) == len(names) or time.monotonic() >= deadline:
            return counts
        time.sleep(0.05)


def ensure_topics(settings: Settings, bootstrap: str | KafkaAuth | None = None, timeout: float = 30.0) -> list[str]:
    """Create every tally topic that does not exist yet (idempotent); return the names it created.

    KafkaLocalError if a topic exists with a partition count other than `settings.partitions` (the process
    stage writes each output to the partition number of its input, so usage and attempts must match), or a
    topic that must be compacted is not.
    """
    bootstrap = bootstrap or settings.kafka
    configs = topic_configs(settings)
    admin, errors = _watched_admin(bootstrap)
    try:
        existing = _partition_counts(admin, list(configs), timeout, (errors, bootstrap))
    except KafkaException as exc:
        raise KafkaLocalError(f"cannot list topics at {bootstrap}: {exc}") from exc

    wanted = [NewTopic(name, num_partitions=settings.partitions, replication_factor=1, config=cfg)
              for name, cfg in configs.items() if name not in existing]
    created: list[str] = []
    if wanted:
        futures = admin.create_topics(wanted, operation_timeout=timeout, request_timeout=timeout)
        failures = []
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout)
                created.append(name)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                failures.append(f"{name}: {exc}")
        if failures:
            raise KafkaLocalError(f"creating topics at {bootstrap} failed: " + "; ".join(failures))
        # The broker's metadata shows new topics a moment after CreateTopics returns; concurrent creators
        # may also have won a race. Check what is there once everything is visible.
        existing = _await_topics(admin, list(configs), timeout)

    wrong = {n: c for n, c in existing.items() if c != settings.partitions}
    if wrong:
        detail = ", ".join(f"{n} has {c}" for n, c in sorted(wrong.items()))
        raise KafkaLocalError(
            f"topics exist with a partition count other than {settings.partitions}: {detail}; partition "
            "counts must match across tally topics (delete and recreate them, or set TALLY_PARTITIONS)"
        )
    missing = sorted(set(configs) - set(existing))
    if missing:
        raise KafkaLocalError(f"topics still missing at {bootstrap} after creating: {', '.join(missing)}")
    _check_compacted(admin, settings.topics.compacted(), bootstrap, timeout)
    return [n for n in configs if n in created]


def _check_compacted(admin: AdminClient, names: Sequence[str], bootstrap: str | KafkaAuth, timeout: float) -> None:
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]
    not_compacted = []
    try:
        for res, fut in admin.describe_configs(resources, request_timeout=timeout).items():
            entry = fut.result(timeout=timeout).get("cleanup.policy")
            if entry is None or "compact" not in str(entry.value):
                not_compacted.append(res.name)
    except KafkaException as exc:
        raise KafkaLocalError(f"cannot describe topic configs at {bootstrap}: {exc}") from exc
    if not_compacted:
        raise KafkaLocalError(
            f"topics exist without cleanup.policy=compact: {', '.join(sorted(not_compacted))}; "
            "they hold reference data or state keyed by id and must be compacted"
        )
