"""The one frozen settings object: built from env and flags in one place, passed down explicitly."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from tally.errors import ConfigError
from tally.kafka_auth import KafkaAuth

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = REPO_ROOT / "schemas"

ENV_PREFIX = "TALLY_"

ROLES = ("all", "process", "sink")


@dataclass(frozen=True)
class Topics:
    """Topic names, all derived from one optional prefix (tests use a unique prefix each)."""

    prefix: str = ""
    # The OTLP traces topic the OTel Collector's Kafka exporter writes (its default name); "" turns the input off.
    otlp_name: str = "otlp_spans"

    @property
    def usage(self) -> str:
        return f"{self.prefix}llm.usage.v1"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}llm.usage.dlq.v1"

    @property
    def attempts(self) -> str:
        return f"{self.prefix}llm.cost.attempts.v1"

    @property
    def requests(self) -> str:
        return f"{self.prefix}llm.cost.requests.v1"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}llm.cost.alerts.v1"

    @property
    def price_cards(self) -> str:
        return f"{self.prefix}llm.reference.price_cards"

    @property
    def owners(self) -> str:
        return f"{self.prefix}llm.reference.owners"

    @property
    def budgets(self) -> str:
        return f"{self.prefix}llm.reference.budgets"

    @property
    def policies(self) -> str:
        """Gateways' routing policies (kind: routing_policy), compacted like the other reference data."""
        return f"{self.prefix}llm.reference.policies"

    @property
    def budget_decisions(self) -> str:
        """Admission decisions of the gateways (reserve, deny, settle, …), keyed by budget so each stays ordered."""
        return f"{self.prefix}llm.budget.decisions.v1"

    @property
    def budget_state(self) -> str:
        return f"{self.prefix}llm.budget.state.v1"

    @property
    def otlp(self) -> str:
        """OpenTelemetry GenAI spans from the Collector's Kafka exporter (streams.otlp); "" when the input is off."""
        return f"{self.prefix}{self.otlp_name}" if self.otlp_name else ""

    @property
    def otlp_state(self) -> str:
        """The otlp stage's input positions: the changelog of its Faust table (one entry per OTLP partition)."""
        return f"{self.prefix}tally.otlp.state.changelog"

    @property
    def fold_state(self) -> str:
        """The fold stage's durable state: the changelog of its Faust table (one entry per open request)."""
        return f"{self.prefix}tally.fold.state.changelog"

    @property
    def detect_state(self) -> str:
        """The detect stage's durable state: the changelog of its Faust table (one snapshot per feature)."""
        return f"{self.prefix}tally.detect.state.changelog"

    def reference(self) -> tuple[str, ...]:
        """The compacted reference topics, in load order."""
        return (self.price_cards, self.owners, self.budgets, self.policies)

    def compacted(self) -> tuple[str, ...]:
        otlp = (self.otlp_state,) if self.otlp else ()
        return (*self.reference(), self.budget_state, self.fold_state, self.detect_state, *otlp)

    def all(self) -> tuple[str, ...]:
        otlp = (self.otlp,) if self.otlp else ()
        return (self.usage, self.dlq, self.attempts, self.requests, self.alerts, self.budget_decisions, *otlp,
                *self.compacted())


@dataclass(frozen=True)
class Settings:
    """Everything a tally process needs to know; immutable once built.

    `clickhouse_url` is `chdb:///abs/path` (embedded, the default: under the data directory) or
    `http(s)://user:pass@host:port`. The code paths are the same; only the URL differs.
    """

    data_dir: Path = Path(".tally")
    kafka_bootstrap: str = "127.0.0.1:9092"
    # How every Kafka client connects (tally.kafka_auth): PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; SCRAM-SHA-512,
    # SCRAM-SHA-256 or PLAIN; the CA file that verifies the brokers; an optional client certificate (PEM). The
    # password comes from TALLY_KAFKA_SASL_PASSWORD or the file TALLY_KAFKA_SASL_PASSWORD_FILE names: a secret,
    # never logged or passed on.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)
    kafka_sasl_password_file: str = ""
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_controller_port: int = 9093
    topic_prefix: str = ""
    partitions: int = 4
    app_id: str = "tally"
    clickhouse_url: str = ""
    # https:// servers: the CA (PEM) that signs the server's certificate, when it is not a public one.
    clickhouse_ca_file: str = ""
    database: str = "tally"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # A process worker serves /metrics, /livez and /readyz on this port (0: no HTTP; `tally up` gives its N process
    # workers this port and the next N - 1). Sink and all roles serve them on web_port, beside the API.
    process_web_port: int = 0
    # Readiness of a sink: caught up, i.e. at most this many input messages behind (llm.cost.*).
    ready_max_lag: int = 1000
    # Liveness: the event loop's one-second heartbeat has not beaten for this long → /livez answers 503.
    live_stall_s: float = 30.0
    # Batching: a process agent takes up to this many Kafka messages per batch, waiting at most `batch_within_s`.
    # Kafka messages per batch. SDK messages carry up to 500 events, attempt messages ~400 rows. 100/100 measured
    # best in tests/bench for both batch and one-event messages (40/30: one-event throughput halved, as each sink
    # insert then held a few hundred rows; 200: the saved-id lookup and the event loop stalled).
    process_batch_messages: int = 100
    sink_batch_messages: int = 100
    # A batch's work is also bounded in lines: the messages taken are handled in consecutive runs of at most this
    # many lines (a message never split), each published and its position stored before the next. Python objects
    # cost ~35 KB per event while a run is in hand: `python -m tests.bench.memory` (100 SDK messages, 135,684 events)
    # peaks 4,749 MiB for the whole batch at once (78 us/event), 501 MiB in runs of 10,000 lines (63 us/event); a
    # backfill of 888k events reached 12 GB in role all with no bound, 2.7 GB with it.
    batch_max_lines: int = 10_000
    # How the process role hands priced attempts to the sink on llm.cost.attempts.v1: "arrow" (Arrow IPC record
    # batches, zstd, thousands of rows a message) or "json" (NDJSON, ~400 rows a message). The sink reads both, and
    # inserts a batch of messages as one piece per table and up to 50 UTC days (streams/pieces.py). `tally tail`
    # prints either as JSON lines.
    handoff_format: str = "arrow"
    batch_within_s: float = 0.2
    # OpenTelemetry GenAI spans (streams.otlp, docs/otlp.md): the topic the Collector's Kafka exporter writes ("":
    # no OTLP input); its encoding (auto: JSON when a message opens with "{", else protobuf; or otlp_proto,
    # otlp_json); what groups calls into a logical request (span: nothing, each call is its own; parent: the parent
    # span; trace; conversation: gen_ai.conversation.id or session.id); and owner tags from span or resource
    # attributes, as overrides of the default mapping: "tag=attr[,attr...]" entries separated by ";" ("endpoint="
    # stops filling a tag).
    otlp_topic: str = "otlp_spans"
    otlp_encoding: str = "auto"
    otlp_logical_request: str = "span"
    otlp_tags: str = ""
    # Dead letters: top-level fields whose values are replaced by "[redacted]" in a refused line's stored original
    # (comma-separated; "unknown" = every field event v1 does not have, e.g. a prompt sent by mistake; "" = none).
    dlq_redact_fields: str = "unknown"
    # Exactly-once effect: the window in which ClickHouse remembers event_ids and insert tokens.
    dedup_window_days: int = 7
    # Rollup retention per grain (TTL, whole parts dropped); re-applied by every migrate.
    rollup_minute_retention_days: int = 14
    rollup_hour_retention_days: int = 400
    rollup_day_retention_days: int = 3660
    # The sink retries a failed insert with backoff for this long, then stops the worker without committing.
    sink_retry_s: float = 300.0
    # Fold (event time, seconds): an ok attempt without `final` is emitted after `fold_settle_s` with no further
    # attempt; a request with no ok attempt is emitted as abandoned after `fold_inactivity_s`; an emitted request's
    # state is kept `fold_grace_s` for late attempts. A partition without input for `fold_idle_s` of wall time lets
    # its event clock run on with wall time, so the last requests of a quiet stream are emitted too.
    fold_settle_s: float = 30.0
    fold_inactivity_s: float = 600.0
    fold_grace_s: float = 120.0
    fold_idle_s: float = 5.0
    # Detect (process role, event time, seconds): windows of whole `detect_window_s`, closed `detect_lateness_s`
    # after their end, each as long as the feature's usual rate needs to hold a few requests (streams.detect); a rate
    # rises toward a page only on a window holding `detect_min_requests`; a signal pages only after
    # `detect_warmup_windows` windows. A feature's detector snapshot is written at most every `detect_snapshot_s`
    # of wall time. The detectors' clocks are the process role's watermarks (streams.watermarks), which wall time
    # moves only for a caught-up input partition silent for `fold_idle_s`.
    detect_window_s: int = 60
    detect_lateness_s: int = 60
    detect_min_requests: int = 20
    detect_warmup_windows: int = 60
    detect_snapshot_s: float = 5.0
    # Budgets (sink role): evaluated every `budget_interval_s`; the burn rate is the spend of the last
    # `budget_window_s` seconds.
    budget_interval_s: float = 10.0
    budget_window_s: float = 900.0
    # The gateways' open reservations (budget_decisions) count in the published state for at most this long: a
    # gateway that died holding one stops holding it then.
    budget_hold_ttl_s: float = 3600.0
    # A worker killed without leaving the group holds its partitions until this expires (then a rebalance).
    session_timeout_s: float = 10.0
    max_line_bytes: int = 16 * 1024
    max_message_bytes: int = 1024 * 1024
    # An event stamped more than this far ahead of its ingest time is dead-lettered as future_timestamp.
    max_future_skew_s: float = 900.0
    log_level: str = "INFO"
    # Log every batch's input range per partition and what it produced (logger tally.offsets, at INFO):
    # the trail an operator (or a fault test) reads to see which input a stage saved, replayed or passed over.
    audit_offsets: bool = False
    # The worker's HTTP API (query, status, dashboard data): a bearer token, required when web_host is not a loopback
    # address. From TALLY_API_TOKEN or the file TALLY_API_TOKEN_FILE names; a secret, never logged or passed on.
    api_token: str = field(default="", repr=False)
    api_token_file: str = ""
    # Every query the API accepts runs on its own ClickHouse connection, beside the sink's, with these caps; at most
    # `query_max_concurrent` at once (the API answers 429 past that). `query_max_bytes` caps the SQL text.
    query_max_execution_s: float = 10.0
    query_max_memory_bytes: int = 512 * 1024 * 1024
    query_max_result_rows: int = 100_000
    query_max_result_bytes: int = 64 * 1024 * 1024
    query_max_threads: int = 1
    query_max_concurrent: int = 2
    query_max_bytes: int = 64 * 1024
    # Tests only: a named crash point (tally.failpoints), `name` or `name:n` to crash at its n-th pass.
    failpoint: str = ""
    # Tests only: while a file exists at this path, every ClickHouse call of the worker's store fails as an
    # unreachable server would (the fault suite's ClickHouse outage); empty: never checked.
    store_outage_flag: str = ""
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix, self.otlp_topic)

    @property
    def ch_url(self) -> str:
        """The ClickHouse URL, defaulting to chDB under the data directory."""
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{(self.data_dir / 'chdb').resolve()}"

    @property
    def embedded(self) -> bool:
        return self.ch_url.startswith("chdb:")

    @property
    def dlq_redact(self) -> tuple[str, ...]:
        """dlq_redact_fields as names ("unknown" included as is)."""
        return tuple(f.strip() for f in self.dlq_redact_fields.split(",") if f.strip())

    @property
    def kafka(self) -> KafkaAuth:
        """The brokers and how to reach them, for every Kafka client tally makes."""
        return KafkaAuth(self.kafka_bootstrap, self.kafka_security_protocol, self.kafka_sasl_mechanism,
                         self.kafka_sasl_username, self.kafka_sasl_password, self.kafka_ssl_cafile,
                         self.kafka_ssl_certfile, self.kafka_ssl_keyfile)

    @property
    def web_url(self) -> str:
        return f"http://{self.web_host}:{self.web_port}"

    @property
    def web_loopback(self) -> bool:
        """Whether the API binds to a loopback address only (then a token is optional)."""
        if self.web_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.web_host).is_loopback
        except ValueError:
            return False

    def query_limits(self) -> dict[str, Any]:
        """The ClickHouse settings every API query runs with; `readonly = 1` last, so nothing can lift the rest."""
        return {"max_execution_time": self.query_max_execution_s, "timeout_overflow_mode": "throw",
                "max_memory_usage": self.query_max_memory_bytes, "max_result_rows": self.query_max_result_rows,
                "max_result_bytes": self.query_max_result_bytes, "result_overflow_mode": "throw",
                "max_threads": self.query_max_threads, "max_query_size": self.query_max_bytes, "readonly": 1}

    def group_id(self, role: str) -> str:
        """Kafka consumer group (and Faust app id) of a worker role."""
        return f"{self.topic_prefix}{self.app_id}-{role}"

    def redacted_ch_url(self) -> str:
        """The ClickHouse URL without its password, for logs and status lines."""
        parsed = urlparse(self.ch_url)
        if parsed.password:
            netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
            return urlunparse(parsed._replace(netloc=netloc))
        return self.ch_url

    def problems(self) -> list[str]:
        """Every problem with these settings, all at once (empty when valid)."""
        out: list[str] = []
        if not 1 <= self.partitions <= 1024:
            out.append(f"partitions must be between 1 and 1024, got {self.partitions}")
        if not self.kafka_bootstrap.strip():
            out.append("kafka_bootstrap must not be empty")
        for hostport in filter(None, self.kafka_bootstrap.split(",")):
            host, _, port = hostport.strip().rpartition(":")
            if not host or not port.isdigit():
                out.append(f"kafka_bootstrap entry {hostport!r} is not host:port")
        scheme = urlparse(self.ch_url).scheme
        if self.clickhouse_ca_file and (scheme != "https" or not Path(self.clickhouse_ca_file).is_file()):
            out.append(f"clickhouse_ca_file {self.clickhouse_ca_file} needs an https:// clickhouse_url and a "
                       "readable file")
        if scheme not in ("chdb", "http", "https"):
            out.append(f"clickhouse_url must start with chdb://, http:// or https://, got scheme {scheme!r}")
        if not self.database.isidentifier():
            out.append(f"database must be an identifier, got {self.database!r}")
        for name in ("web_port", "kafka_controller_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                out.append(f"{name} must be a TCP port, got {port}")
        out.extend(self.kafka.problems())
        if self.kafka_controller_port == self.web_port:
            out.append("web_port and kafka_controller_port must differ")
        if self.process_web_port and not 1 <= self.process_web_port <= 65535:
            out.append(f"process_web_port must be 0 (no HTTP) or a TCP port, got {self.process_web_port}")
        if self.process_web_port and self.process_web_port in (self.web_port, self.kafka_controller_port):
            out.append("process_web_port must differ from web_port and kafka_controller_port")
        if self.ready_max_lag < 0:
            out.append(f"ready_max_lag must not be negative, got {self.ready_max_lag}")
        if self.live_stall_s <= 0:
            out.append(f"live_stall_s must be positive, got {self.live_stall_s}")
        for name in ("process_batch_messages", "sink_batch_messages", "batch_max_lines", "dedup_window_days",
                     "rollup_minute_retention_days", "rollup_hour_retention_days", "rollup_day_retention_days"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.handoff_format not in ("arrow", "json"):
            out.append(f"handoff_format must be arrow or json, got {self.handoff_format!r}")
        if self.batch_within_s <= 0:
            out.append(f"batch_within_s must be positive, got {self.batch_within_s}")
        if not 3 <= self.session_timeout_s <= 300:
            out.append(f"session_timeout_s must be between 3 and 300, got {self.session_timeout_s}")
        for name in ("fold_settle_s", "fold_inactivity_s", "fold_grace_s", "fold_idle_s"):
            if getattr(self, name) < 0:
                out.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("detect_window_s", "detect_min_requests", "detect_snapshot_s"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("detect_lateness_s", "detect_warmup_windows"):
            if getattr(self, name) < 0:
                out.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("budget_interval_s", "budget_window_s", "budget_hold_ttl_s"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.fold_inactivity_s < self.fold_settle_s:
            out.append("fold_inactivity_s must be at least fold_settle_s")
        if self.sink_retry_s < 0:
            out.append(f"sink_retry_s must not be negative, got {self.sink_retry_s}")
        if self.max_future_skew_s < 0:
            out.append(f"max_future_skew_s must not be negative, got {self.max_future_skew_s}")
        if self.max_line_bytes > self.max_message_bytes:
            out.append("max_line_bytes must not exceed max_message_bytes")
        if not self.web_loopback and not self.api_token:
            out.append(f"web_host {self.web_host} is not a loopback address: the API needs a bearer token "
                       "(TALLY_API_TOKEN or TALLY_API_TOKEN_FILE)")
        if self.api_token and (len(self.api_token) < 16 or not self.api_token.isprintable() or " " in self.api_token):
            out.append("the API token must be at least 16 printable characters without spaces")
        for name in ("query_max_execution_s", "query_max_memory_bytes", "query_max_result_rows",
                     "query_max_result_bytes", "query_max_threads", "query_max_concurrent", "query_max_bytes"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            out.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.failpoint:
            from tally.failpoints import Failpoints

            try:
                Failpoints(self.failpoint)
            except ValueError as exc:
                out.append(str(exc))
        from streams.otlp import ENCODINGS, LOGICAL_REQUEST_MODES, parse_tag_mapping

        if self.otlp_topic and not all(ch.isalnum() or ch in "._-" for ch in self.otlp_topic):
            out.append(f"otlp_topic may hold only letters, digits and . _ -, got {self.otlp_topic!r}")
        if self.otlp_encoding not in ENCODINGS:
            out.append(f"otlp_encoding must be one of {', '.join(ENCODINGS)}, got {self.otlp_encoding!r}")
        if self.otlp_logical_request not in LOGICAL_REQUEST_MODES:
            out.append(f"otlp_logical_request must be one of {', '.join(LOGICAL_REQUEST_MODES)}, "
                       f"got {self.otlp_logical_request!r}")
        try:
            parse_tag_mapping(self.otlp_tags)
        except ValueError as exc:
            out.append(str(exc))
        if self.topic_prefix and not all(ch.isalnum() or ch in "._-" for ch in self.topic_prefix):
            out.append(f"topic_prefix may hold only letters, digits and . _ -, got {self.topic_prefix!r}")
        return out

    def to_env(self) -> dict[str, str]:
        """These settings as TALLY_* variables, so a child process (a worker started by `tally up`) gets the same."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            # a child reads the token and the password where this process did (its environment, or the file)
            if f.name in ("secrets", "api_token", "kafka_sasl_password"):
                continue
            out[ENV_PREFIX + f.name.upper()] = str(getattr(self, f.name))
        return out

    def validated(self) -> Settings:
        """Return self, or raise ConfigError listing every problem."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


def _coerce(name: str, raw: str, target: Any) -> Any:
    if isinstance(target, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(target, int):
        return int(raw)
    if isinstance(target, float):
        return float(raw)
    if isinstance(target, Path):
        return Path(raw)
    return raw


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from TALLY_* environment variables, then explicit overrides (CLI flags win).

    Overrides whose value is None are ignored, so CLI options can be passed through as they are.
    Malformed values are collected and reported together with every other problem.
    """
    env = os.environ if env is None else env
    defaults = Settings()
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(Settings):
        if f.name == "secrets":
            continue
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        try:
            values[f.name] = _coerce(f.name, raw, getattr(defaults, f.name))
        except ValueError:
            kind = type(getattr(defaults, f.name)).__name__
            problems.append(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in {f.name for f in dataclasses.fields(Settings)}:
            raise TypeError(f"unknown setting {key!r}")
        values[key] = value
    if problems:
        raise ConfigError(problems)
    values["data_dir"] = Path(values.get("data_dir", defaults.data_dir)).expanduser().resolve()
    if values.get("api_token_file") and not values.get("api_token"):
        try:
            values["api_token"] = Path(values["api_token_file"]).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError([f"cannot read the API token file {values['api_token_file']}: {exc.strerror}"]) from None
    if values.get("kafka_sasl_password_file") and not values.get("kafka_sasl_password"):
        try:
            values["kafka_sasl_password"] = Path(values["kafka_sasl_password_file"]).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError([f"cannot read the Kafka password file {values['kafka_sasl_password_file']}: "
                               f"{exc.strerror}"]) from None
    settings = Settings(**values)
    secrets = tuple(filter(None, (urlparse(settings.ch_url).password, settings.api_token,
                                  settings.kafka_sasl_password)))
    if secrets:
        settings = dataclasses.replace(settings, secrets=secrets)
    return settings
