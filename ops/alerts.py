"""The alert consumer: llm.cost.alerts.v1 → deduplicated pages to PagerDuty, Slack, a JSON webhook or stdout.

Input: NDJSON alert records (one or more per Kafka message), keyed by `incident_key` so that the records of one
incident stay in order on one partition. A malformed line is logged with topic[partition]@offset and skipped.

Protocol, per consumed batch (at-least-once delivery, one page per open incident):
  1. Decide: each record goes through `decide` against the open-incident table (in memory).
  2. Deliver: every sink gets the batch's notifications in order; a retryable failure (connection error, HTTP 5xx
     or 429) is retried with exponential backoff until it succeeds or `stop` is set; a permanent failure (any other
     4xx) is logged and that notification is skipped for that sink.
  3. Write the incident table to `<data_dir>/alerts/incidents.json` atomically (temp file, fsync, os.replace).
  4. Commit the batch's offsets. Nothing is committed while a retryable delivery is still failing.
A restart reloads the table and resumes from the committed offsets, so a page is neither lost nor repeated, except:
a crash between step 2 and step 3 replays the batch and re-sends its notifications. PagerDuty absorbs that through
the dedup_key (the incident key); Slack, the webhook and stdout may show it twice. The table is local: run one
`tally alerts` process per consumer group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from tally.config import Settings
from tally.errors import ConfigError, TallyError
from tally.failpoints import Failpoints

log = logging.getLogger("tally.alerts")

ALERT_VERSION = 1
STATE_VERSION = 1
SINKS = ("stdout", "pagerduty", "slack", "webhook")
DEFAULT_PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
DEFAULT_RENOTIFY_S = 1800.0
KINDS = ("anomaly", "budget")
STATES = ("firing", "resolved")
SEVERITY_RANK = {"warning": 1, "critical": 2}
MAX_INCIDENT_KEY = 255  # PagerDuty's dedup_key limit
MAX_SUMMARY = 1024  # PagerDuty's payload.summary limit
MAX_LINE_BYTES = 64 * 1024
_MAX_RESPONSE_BYTES = 64 * 1024
# RFC 3339 date-time with a mandatory offset (Z or ±hh:mm), as streams/validate.py accepts for usage events.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:[Zz]|[+-]\d\d:\d\d)\Z")

Action = Literal["trigger", "renotify", "resolve"]
Reason = Literal["opened", "escalated", "reminder", "resolved"]


class MalformedAlert(TallyError, ValueError):
    """An alert line that does not follow the alert record contract (v1); it is logged and skipped."""


class AlertStateError(TallyError):
    """The incident table on disk cannot be read or written; the consumer stops without committing."""


class DeliveryError(TallyError):
    """A sink did not accept a notification; `retryable` says whether trying again can help."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AlertsConfig:
    """What `tally alerts` pages, and how. Secrets (the routing key, webhook URLs) are never logged or repr'd."""

    sinks: tuple[str, ...] = ("stdout",)
    pagerduty_url: str = DEFAULT_PAGERDUTY_URL
    pagerduty_routing_key: str = field(default="", repr=False)
    slack_webhook_url: str = field(default="", repr=False)
    webhook_url: str = field(default="", repr=False)
    renotify_s: float = DEFAULT_RENOTIFY_S
    http_timeout_s: float = 10.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    poll_timeout_s: float = 0.5
    batch_messages: int = 100
    group_id: str = ""  # empty: settings.group_id("alerts")

    def problems(self) -> list[str]:
        """Every problem with this configuration, all at once (empty when valid); never echoes a secret."""
        out: list[str] = []
        if not self.sinks:
            out.append(f"alerts need at least one sink (one of {', '.join(SINKS)})")
        for sink in self.sinks:
            if sink not in SINKS:
                out.append(f"unknown sink {sink!r}; choose from {', '.join(SINKS)}")
        if len(set(self.sinks)) != len(self.sinks):
            out.append("each sink may be named once")
        needs = (("pagerduty", "pagerduty_routing_key", "--pagerduty-routing-key"),
                 ("slack", "slack_webhook_url", "--slack-webhook-url"),
                 ("webhook", "webhook_url", "--webhook-url"))
        for sink, name, option in needs:
            if sink in self.sinks and not getattr(self, name).strip():
                out.append(f"{sink} sink needs {option}")
        urls = (("pagerduty", "pagerduty_url"), ("slack", "slack_webhook_url"), ("webhook", "webhook_url"))
        for sink, name in urls:
            value = getattr(self, name).strip()
            if sink in self.sinks and value and not value.lower().startswith(("http://", "https://")):
                out.append(f"{name} must be an http:// or https:// URL")
        if not self.renotify_s > 0:
            out.append(f"renotify_s must be positive, got {self.renotify_s}")
        for name in ("http_timeout_s", "retry_initial_s", "poll_timeout_s"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be positive, got {getattr(self, name)}")
        if not self.retry_max_s >= self.retry_initial_s:
            out.append("retry_max_s must be at least retry_initial_s")
        if self.batch_messages < 1:
            out.append(f"batch_messages must be at least 1, got {self.batch_messages}")
        return out

    def validated(self) -> AlertsConfig:
        """Return self, or raise ConfigError (a TallyError) listing every problem."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def secrets(self) -> tuple[str, ...]:
        """The secret values, to scrub from any text that is logged."""
        values = (self.pagerduty_routing_key, self.slack_webhook_url, self.webhook_url)
        return tuple(v for v in (s.strip() for s in values) if v)

    def redacted(self) -> dict[str, Any]:
        """The configuration for display, with every secret shown as *** (or empty when unset)."""
        out = dataclasses.asdict(self)
        for name in ("pagerduty_routing_key", "slack_webhook_url", "webhook_url"):
            out[name] = "***" if out[name] else ""
        return out


# ---------------------------------------------------------------- records and decisions


@dataclass(frozen=True)
class Alert:
    """One valid alert record (contract v1); `record` is the record as received, unknown fields included."""

    incident_key: str
    kind: str
    state: str
    feature_id: str
    team_id: str
    signal: str
    severity: str
    value: Any  # number or string, display only: kept exactly as given (JSON numbers parse to Decimal)
    baseline: Any
    score: Any
    dimension: str
    explanation: str
    detected_at: str
    record: Mapping[str, Any]


@dataclass
class Incident:
    """An open incident: what was paged for it, and when last."""

    incident_key: str
    kind: str
    feature_id: str
    team_id: str
    signal: str
    severity: str  # the highest severity paged while open
    opened_at: datetime
    last_notified_at: datetime
    notifications: int = 1

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["opened_at"] = self.opened_at.isoformat()
        out["last_notified_at"] = self.last_notified_at.isoformat()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Incident:
        values = dict(obj)
        for name in ("opened_at", "last_notified_at"):
            ts = datetime.fromisoformat(values[name])
            if ts.tzinfo is None:
                raise ValueError(f"{name} has no offset")
            values[name] = ts
        return cls(**values)


@dataclass(frozen=True)
class Notification:
    """One thing to tell every sink: trigger (new or escalated), renotify (a reminder) or resolve."""

    action: Action
    reason: Reason
    severity: str  # the severity to page with
    alert: Alert

    @property
    def incident_key(self) -> str:
        return self.alert.incident_key


def _is_number(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float | Decimal):
        return math.isfinite(v)
    return False


def _is_rfc3339(text: str) -> bool:
    if not _RFC3339.match(text):
        return False
    try:
        return datetime.fromisoformat(text.upper()).tzinfo is not None
    except ValueError:
        return False


def parse_alert(record: Any) -> Alert:
    """Check one decoded alert line against the record contract v1; MalformedAlert names the first problem."""
    if not isinstance(record, Mapping):
        raise MalformedAlert(f"an alert record must be a JSON object, got {type(record).__name__}")
    version = record.get("alert_version")
    if type(version) is not int or version != ALERT_VERSION:
        raise MalformedAlert(f"alert_version must be {ALERT_VERSION}, got {version!r}")
    problems: list[str] = []

    def text(name: str, non_empty: bool = True, limit: int | None = None) -> str:
        v = record.get(name)
        if not isinstance(v, str):
            problems.append(f"{name} must be a string, got {type(v).__name__}")
            return ""
        if non_empty and not v.strip():
            problems.append(f"{name} must not be empty")
        if limit is not None and len(v) > limit:
            problems.append(f"{name} is longer than {limit} characters")
        return v

    def choice(name: str, allowed: Sequence[str]) -> str:
        v = record.get(name)
        if v not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
            return ""
        return str(v)

    key = text("incident_key", limit=MAX_INCIDENT_KEY)
    kind = choice("kind", KINDS)
    state = choice("state", STATES)
    feature_id = text("feature_id", non_empty=kind != "budget")  # a tenant's budget has no feature
    team_id = text("team_id", non_empty=False)
    signal = text("signal")
    severity = choice("severity", tuple(SEVERITY_RANK))
    for name in ("value", "baseline"):
        v = record.get(name)
        if not (_is_number(v) or isinstance(v, str)):
            problems.append(f"{name} must be a finite number or a string, got {v!r}")
    if not _is_number(record.get("score")):
        problems.append(f"score must be a finite number, got {record.get('score')!r}")
    dimension = text("dimension", non_empty=False)
    explanation = text("explanation", non_empty=False)
    detected_at = text("detected_at")
    if detected_at and not _is_rfc3339(detected_at):
        problems.append(f"detected_at must be an RFC 3339 date-time with an offset, got {detected_at!r}")
    if problems:
        raise MalformedAlert("; ".join(problems))
    return Alert(incident_key=key, kind=kind, state=state, feature_id=feature_id, team_id=team_id, signal=signal,
                 severity=severity, value=record["value"], baseline=record["baseline"], score=record["score"],
                 dimension=dimension, explanation=explanation, detected_at=detected_at, record=record)


def decide(record: Mapping[str, Any], incidents: dict[str, Incident], now: datetime,
           renotify_s: float = DEFAULT_RENOTIFY_S) -> list[Notification]:
    """The notifications one alert record causes, given the open incidents at wall-clock time `now`.

    No I/O and no clock: it updates `incidents` in place (opens, escalates, re-stamps, closes) and returns what to
    send. Rules: a firing record for an unknown incident opens it and triggers; for an open one it triggers again
    only on escalation (warning → critical), sends a renotify once `renotify_s` has passed since the last
    notification, and is otherwise suppressed. A resolved record closes an open incident with a resolve; one for an
    unknown incident is ignored. MalformedAlert (before any change) when the record breaks the contract.
    """
    alert = parse_alert(record)
    key = alert.incident_key
    open_incident = incidents.get(key)
    if alert.state == "resolved":
        if open_incident is None:
            log.info("alerts: resolved record for %s, which is not open: ignored", key)
            return []
        del incidents[key]
        return [Notification("resolve", "resolved", open_incident.severity, alert)]
    if open_incident is None:
        incidents[key] = Incident(incident_key=key, kind=alert.kind, feature_id=alert.feature_id,
                                  team_id=alert.team_id, signal=alert.signal, severity=alert.severity,
                                  opened_at=now, last_notified_at=now)
        return [Notification("trigger", "opened", alert.severity, alert)]
    if SEVERITY_RANK[alert.severity] > SEVERITY_RANK[open_incident.severity]:
        open_incident.severity = alert.severity
        open_incident.last_notified_at = now
        open_incident.notifications += 1
        return [Notification("trigger", "escalated", alert.severity, alert)]
    if (now - open_incident.last_notified_at).total_seconds() >= renotify_s:
        open_incident.last_notified_at = now
        open_incident.notifications += 1
        return [Notification("renotify", "reminder", open_incident.severity, alert)]
    log.debug("alerts: %s is already open and was notified at %s: suppressed", key,
              open_incident.last_notified_at.isoformat())
    return []


def decode_line(line: bytes) -> Any:
    """One NDJSON line as Python data; numbers with a fraction or exponent become Decimal, never float."""
    if len(line) > MAX_LINE_BYTES:
        raise MalformedAlert(f"line is longer than {MAX_LINE_BYTES} bytes")
    try:
        return json.loads(line, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedAlert(f"not valid JSON: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------- what each sink receives


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj))  # the number exactly as it was received
    raise TypeError(f"cannot encode {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    """JSON bytes, with Decimal values written as exact JSON numbers."""
    return orjson.dumps(obj, default=_json_default)


def _summary(alert: Alert) -> str:
    text = " ".join(alert.explanation.split()) or f"{alert.kind} {alert.signal} on {alert.feature_id}"
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def pagerduty_event(note: Notification, routing_key: str) -> dict[str, Any]:
    """The PagerDuty Events API v2 event of a notification (renotify is a trigger with the same dedup_key)."""
    alert = note.alert
    if note.action == "resolve":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": alert.incident_key}
    payload: dict[str, Any] = {
        "summary": _summary(alert),
        "source": "tally",
        "severity": note.severity,
        "timestamp": alert.detected_at,
        "component": alert.feature_id,
        "class": alert.signal,
        "custom_details": {"value": alert.value, "baseline": alert.baseline, "score": alert.score,
                           "dimension": alert.dimension},
    }
    if alert.team_id:
        payload["group"] = alert.team_id
    return {"routing_key": routing_key, "event_action": "trigger", "dedup_key": alert.incident_key,
            "payload": payload}


def _slack_escape(text: str) -> str:
    return " ".join(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").split())


def slack_text(note: Notification) -> str:
    """A one-line human message for a Slack-compatible incoming webhook."""
    a = note.alert
    what = _slack_escape(f"{a.kind} {a.signal} on {a.feature_id} (team {a.team_id or 'unknown'})")
    key = _slack_escape(a.incident_key)
    explanation = _slack_escape(_summary(a))
    if note.action == "resolve":
        return f":white_check_mark: Resolved: {what}: {explanation} [{key}]"
    lead = {"opened": "", "escalated": "Escalated: ", "reminder": "Reminder, still firing: "}.get(note.reason, "")
    numbers = _slack_escape(f"value {a.value}, baseline {a.baseline}, score {a.score}"
                            + (f" ({a.dimension})" if a.dimension else ""))
    return f":rotating_light: {lead}[{note.severity.upper()}] {what}: {explanation} ({numbers}) [{key}]"


def webhook_body(note: Notification) -> dict[str, Any]:
    """The generic JSON webhook body (also the stdout line): the alert record plus `notification`."""
    return {**note.alert.record, "notification": note.action}


# ---------------------------------------------------------------- sinks


class Sink(Protocol):
    """Delivers one notification, or raises DeliveryError."""

    name: str

    def send(self, note: Notification) -> None: ...


class StdoutSink:
    """One JSON line per notification on standard output."""

    name = "stdout"

    def send(self, note: Notification) -> None:
        try:
            sys.stdout.write(dumps(webhook_body(note)).decode() + "\n")
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"cannot write to stdout: {exc}", retryable=False) from exc


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: re-posting a page elsewhere is not ours to decide."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


class HttpSink:
    """POSTs one JSON body per notification (standard library only, with a timeout); 2xx is delivered.

    Connection errors, timeouts, HTTP 5xx and 429 are retryable; any other status is permanent.
    """

    def __init__(self, name: str, url: str, body: Callable[[Notification], Mapping[str, Any]], timeout: float,
                 secrets: Sequence[str]) -> None:
        self.name = name
        self._url = url.strip()
        self._body = body
        self._timeout = timeout
        self._secrets = tuple(secrets)
        self._opener = urllib.request.build_opener(_NoRedirects())

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def send(self, note: Notification) -> None:
        request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked (http/https) by AlertsConfig
            self._url, data=dumps(self._body(note)), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "tally-alerts"},
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                response.read(_MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            detail = ""
            with contextlib.suppress(Exception):
                detail = exc.read(500).decode("utf-8", "replace").strip()
            message = self._scrub(f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else ""))
            retryable = exc.code == 429 or exc.code >= 500
            retry_after = _retry_after(exc.headers.get("Retry-After")) if exc.headers else None
            raise DeliveryError(message, retryable, retry_after) from None
        except urllib.error.URLError as exc:
            raise DeliveryError(self._scrub(f"cannot connect: {exc.reason}"), retryable=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryError(self._scrub(f"{type(exc).__name__}: {exc}"), retryable=True) from None


def build_sinks(config: AlertsConfig) -> list[Sink]:
    """The configured sinks, in the configured order."""
    secrets = config.secrets()
    sinks: list[Sink] = []
    for name in config.sinks:
        if name == "stdout":
            sinks.append(StdoutSink())
        elif name == "pagerduty":
            key = config.pagerduty_routing_key.strip()
            sinks.append(HttpSink(name, config.pagerduty_url, functools.partial(pagerduty_event, routing_key=key),
                                  config.http_timeout_s, secrets))
        elif name == "slack":
            sinks.append(HttpSink(name, config.slack_webhook_url, lambda n: {"text": slack_text(n)},
                                  config.http_timeout_s, secrets))
        elif name == "webhook":
            sinks.append(HttpSink(name, config.webhook_url, webhook_body, config.http_timeout_s, secrets))
    return sinks


# ---------------------------------------------------------------- durable incident table


def state_path(settings: Settings) -> Path:
    """Where the open-incident table lives."""
    return settings.data_dir / "alerts" / "incidents.json"


def load_incidents(path: Path) -> dict[str, Incident]:
    """The open incidents saved at `path` (none when the file does not exist); AlertStateError if unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise AlertStateError(f"cannot read the incident table {path}: {exc}") from exc
    try:
        doc = orjson.loads(raw)
        if doc.get("state_version") != STATE_VERSION:
            raise ValueError(f"state_version is {doc.get('state_version')!r}, expected {STATE_VERSION}")
        return {key: Incident.from_json(value) for key, value in doc["incidents"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AlertStateError(
            f"the incident table {path} is corrupt ({exc}); fix it, or delete it to forget every open incident "
            "(their resolves will then be ignored and a firing record pages again)"
        ) from exc


def save_incidents(path: Path, incidents: Mapping[str, Incident]) -> None:
    """Write the open incidents to `path` atomically: a temp file in the same directory, fsync, os.replace."""
    doc = {"state_version": STATE_VERSION,
           "incidents": {key: incidents[key].to_json() for key in sorted(incidents)}}
    tmp_name = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incidents.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = ""
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise AlertStateError(f"cannot write the incident table {path}: {exc}") from exc
    finally:
        if tmp_name:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


# ---------------------------------------------------------------- the loop


@dataclass
class AlertsStats:
    """What one run of the alert consumer did."""

    messages: int = 0
    records: int = 0
    malformed: int = 0
    suppressed: int = 0  # valid records that caused no notification (duplicates, unknown resolves, …)
    notifications: dict[str, int] = field(default_factory=dict)  # decided, by action
    delivered: dict[str, int] = field(default_factory=dict)  # by sink
    rejected: dict[str, int] = field(default_factory=dict)  # permanent failures, by sink
    retries: int = 0
    commits: int = 0
    open_incidents: int = 0  # in the saved table when the run ended


def deliver(notes: Sequence[Notification], sinks: Sequence[Sink], config: AlertsConfig, stop: threading.Event,
            stats: AlertsStats) -> bool:
    """Deliver every notification to every sink, in order per sink; True when done, False if `stop` came first.

    A retryable failure stops that sink's queue (order is kept) and is retried with exponential backoff, from
    `retry_initial_s` doubling to `retry_max_s` (or the server's Retry-After, within that bound), for as long as it
    takes; the other sinks go on meanwhile. A permanent failure is logged and that notification skipped.
    """
    pending = {sink.name: list(notes) for sink in sinks}
    delay = config.retry_initial_s
    while True:
        wait = 0.0
        for sink in sinks:
            queue = pending[sink.name]
            while queue:
                note = queue[0]
                try:
                    sink.send(note)
                except DeliveryError as exc:
                    if exc.retryable:
                        stats.retries += 1
                        this_wait = min(max(delay, exc.retry_after or 0.0), config.retry_max_s)
                        wait = max(wait, this_wait)
                        log.warning("alerts: sink %s: %s of %s failed (%s); retrying in %g s, offsets not "
                                    "committed", sink.name, note.action, note.incident_key, exc, this_wait)
                        break
                    stats.rejected[sink.name] = stats.rejected.get(sink.name, 0) + 1
                    log.error("alerts: sink %s rejected %s of %s permanently (%s): this notification is dropped "
                              "for %s", sink.name, note.action, note.incident_key, exc, sink.name)
                    queue.pop(0)
                    continue
                stats.delivered[sink.name] = stats.delivered.get(sink.name, 0) + 1
                log.info("alerts: sink %s: %s %s (%s)", sink.name, note.action, note.incident_key, note.severity)
                queue.pop(0)
        if not any(pending.values()):
            return True
        if stop.wait(wait):
            return False
        delay = min(delay * 2, config.retry_max_s)


def _decide_message(msg: Message, incidents: dict[str, Incident], config: AlertsConfig,
                    stats: AlertsStats, now: datetime) -> list[Notification]:
    notes: list[Notification] = []
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    for n, raw in enumerate((msg.value() or b"").split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        stats.records += 1
        record: Any = None
        try:
            record = decode_line(line)
            got = decide(record, incidents, now, config.renotify_s)
        except MalformedAlert as exc:
            stats.malformed += 1
            key = record.get("incident_key") if isinstance(record, dict) else None
            log.error("alerts: %s line %d: malformed alert record skipped (incident_key %r): %s", where, n, key,
                      exc)
            continue
        if not got:
            stats.suppressed += 1
        for note in got:
            stats.notifications[note.action] = stats.notifications.get(note.action, 0) + 1
        notes.extend(got)
    return notes


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def run_alerts(settings: Settings, config: AlertsConfig, stop: threading.Event | None = None,
               max_messages: int | None = None, clock: Callable[[], datetime] = _wall_clock) -> AlertsStats:
    """Consume `settings.topics.alerts` and page through the configured sinks until `stop` or `max_messages`.

    `clock` is read once per message: the "now" of `decide` (incidents opened, reminders due after renotify_s).

    Consumer group `config.group_id` (default `settings.group_id("alerts")`), manual commits; a new group starts
    at the earliest retained alert. Each batch follows the module's numbered protocol: decide, deliver, save the
    incident table, commit. When `stop` is set while a delivery is being retried, the batch is neither saved nor
    committed and is read again on the next start. Raises ConfigError for a bad configuration and AlertStateError
    when the incident table cannot be read or written.
    """
    config = config.validated()
    stop = stop or threading.Event()
    crash = Failpoints(settings.failpoint)  # tests only: inert unless armed
    sinks = build_sinks(config)
    path = state_path(settings)
    incidents = load_incidents(path)
    topic = settings.topics.alerts
    group = config.group_id or settings.group_id("alerts")
    stats = AlertsStats(open_incidents=len(incidents))
    if max_messages is not None and max_messages <= 0:
        return stats
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": int(settings.session_timeout_s * 1000),
        "logger": logging.getLogger("tally.alerts.rdkafka"),
    })
    log.info("alerts: consuming %s as group %s; sinks %s; %d open incidents in %s; renotify after %g s", topic,
             group, ", ".join(config.sinks), len(incidents), path, config.renotify_s)
    try:
        consumer.subscribe([topic])
        while not stop.is_set() and (max_messages is None or stats.messages < max_messages):
            want = config.batch_messages if max_messages is None else min(config.batch_messages,
                                                                           max_messages - stats.messages)
            batch = consumer.consume(num_messages=want, timeout=config.poll_timeout_s)
            if not batch:
                continue
            # 1. Decide.
            offsets: dict[tuple[str, int], int] = {}
            notes: list[Notification] = []
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise TallyError(f"alerts: the Kafka consumer failed: {err}")
                    log.warning("alerts: consumer: %s", err)
                    continue
                stats.messages += 1
                partition, offset = msg.partition(), msg.offset()
                if partition is not None and offset is not None:
                    offsets[(topic, partition)] = offset + 1
                notes.extend(_decide_message(msg, incidents, config, stats, clock()))
            # 2. Deliver, retrying for as long as it takes (or until stop).
            if not deliver(notes, sinks, config, stop, stats):
                log.warning("alerts: stopped while a delivery was failing; %d messages not committed, they are "
                            "read again on the next start", len(offsets))
                break
            if notes:
                crash.hit("alerts.after_delivery")
            # 3. Save the incident table (decide changes it only when it notifies).
            if notes:
                save_incidents(path, incidents)
                stats.open_incidents = len(incidents)
            # 4. Commit.
            if offsets:
                try:
                    consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                    asynchronous=False)
                    stats.commits += 1
                except KafkaException as exc:
                    log.warning("alerts: commit failed (%s); the batch may be read again, and the incident table "
                                "suppresses its duplicates", exc)
    finally:
        consumer.close()
    log.info("alerts: stopped after %d messages, %d records (%d malformed, %d suppressed); delivered %s; "
             "%d open incidents", stats.messages, stats.records, stats.malformed, stats.suppressed,
             stats.delivered or "nothing", stats.open_incidents)
    return stats
