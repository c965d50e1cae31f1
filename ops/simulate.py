"""Synthetic gateway traffic: realistic usage events (retries, fallbacks, reasoning, cache, batch, bad lines)."""

from __future__ import annotations

import math
import random
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from tally.reference import ReferenceDoc

_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "gemini-2.5", "claude-opus", "claude-sonnet")
_ENVIRONMENTS = (("prod", 0.88), ("staging", 0.09), ("dev", 0.03))
_SEGMENTS = ("free", "pro", "enterprise")
INCIDENT_KINDS = ("prompt_regression", "output_inflation", "reasoning_spike", "retry_storm", "silent_fallback",
                  "runaway_loop")
_DAY_S = 86_400.0


@dataclass(frozen=True)
class Incident:
    """An injected incident: `kind` on `feature_id` between `start` and `end` (event time); `tenant` for loops."""

    kind: str
    feature_id: str
    start: datetime
    end: datetime
    tenant: str = ""

    def active(self, ts: datetime) -> bool:
        """Whether the incident shapes traffic at event time `ts`."""
        return self.start <= ts < self.end


@dataclass(frozen=True)
class Profile:
    """How traffic varies in event time: daily seasonality, steady growth, incidents and huge one-off requests.

    The request rate at time t is rate × (1 + seasonality × cos(2π (hour − 14) / 24)) × (1 + growth_per_day × days
    since the start). `one_offs` are (time, feature_id): the first request of that feature after the time is ~200
    times its usual size. `only_incident` sends every request to the incidents' features (the traffic a
    `tally simulate --incident` adds on top of a running stack).
    """

    seasonality: float = 0.0
    growth_per_day: float = 0.0
    incidents: tuple[Incident, ...] = ()
    one_offs: tuple[tuple[datetime, str], ...] = ()
    only_incident: bool = False


@dataclass(frozen=True)
class Catalog:
    """What the simulator draws from: features with their owners, and priced models."""

    features: tuple[tuple[str, str, str], ...]  # feature_id, team_id, product
    models: tuple[tuple[str, str], ...]  # provider, model
    api_keys: tuple[str, ...] = ()


def catalog_from_reference(docs: Sequence[ReferenceDoc]) -> Catalog:
    """Features from the newest owners registry, models from the newest price card."""
    owners = max((d for d in docs if d.kind == "owners"), key=lambda d: d.effective_at, default=None)
    card = max((d for d in docs if d.kind == "price_card"), key=lambda d: d.effective_at, default=None)
    if owners is None or card is None:
        raise ValueError("the simulator needs at least one owners registry and one price card")
    features = tuple(sorted((fid, str(f["team"]), str(f.get("product", "")))
                            for fid, f in owners.body["features"].items()))
    models = tuple(sorted((str(m["provider"]), str(m["model"])) for m in card.body["models"]))
    keys = tuple(sorted(owners.body.get("api_keys", {}) or {}))
    return Catalog(features, models, keys)


def publish_paced(publish: Callable[[bytes], None], lines: Iterable[bytes], rate: float,
                  stop: Callable[[], bool] = lambda: False, sent: list[int] | None = None) -> int:
    """Hand lines to `publish` at `rate` per second until they run out or `stop()` says so; returns how many.

    After a stall of more than a second the pace resumes from there: a gateway does not send a backlog in a burst.

    `sent[0]`, when given, follows the count as it grows (another thread reads it for a status line).
    """
    sent = sent if sent is not None else [0]
    started = time.monotonic()
    for line in lines:
        if stop():
            break
        publish(line)
        sent[0] += 1
        ahead = sent[0] / rate - (time.monotonic() - started)
        if ahead > 0.05:
            time.sleep(ahead)
        elif ahead < -1.0:  # fell behind (a busy machine): go on at the rate, never catch up in a burst
            started += -ahead
    return sent[0]


def _rfc3339(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TrafficGenerator:
    """Deterministic (by seed) stream of NDJSON lines, as gateways would publish them.

    Shapes: ~84 % single successful calls; retries after errors (1-2 failures, then success); fallbacks to another
    model of the same provider; streams cut by the router (some without usage); final errors; batch calls; cache
    reads/writes; reasoning tokens on reasoning models; tool calls; ~2 % events on an unregistered feature and ~1 %
    without a feature tag (unattributed spend); and `bad_rate` malformed lines of several kinds (DLQ traffic).
    """

    def __init__(self, catalog: Catalog, seed: int = 1, start: datetime | None = None, rate: float = 100.0,
                 bad_rate: float = 0.003, tenants: int = 60, profile: Profile | None = None,
                 live: bool = False) -> None:
        self.catalog = catalog
        self.rng = random.Random(seed)
        self.seed = seed
        self.clock = start or datetime.now(UTC)
        self.started = self.clock
        self.rate = rate
        self.step = timedelta(seconds=1.0 / rate)
        self.profile = profile or Profile()
        self.live = live  # stamp requests with the wall clock, as a gateway does, whatever the pace
        self._pending_one_offs = sorted(self.profile.one_offs)
        self.bad_rate = bad_rate
        self.tenants = [f"tenant-{i:03d}" for i in range(tenants)]
        self._tenant_weights = [1.0 / (i + 1) ** 1.1 for i in range(tenants)]
        self._feature_weights = [1.0 / (i + 1) ** 0.8 for i in range(len(catalog.features))]
        self._n = 0

    def _id(self) -> str:
        return f"{self.rng.getrandbits(64):016x}{self.rng.getrandbits(32):08x}"

    def _tokens(self, model: str) -> dict[str, int]:
        r = self.rng
        input_total = int(r.lognormvariate(math.log(1200), 0.9)) + 20
        cached = int(input_total * r.uniform(0.3, 0.9)) if r.random() < 0.3 else 0
        usage = {"input_tokens": input_total - cached, "output_tokens": int(r.lognormvariate(math.log(250), 0.8)) + 1}
        if cached:
            usage["cache_read_tokens"] = cached
        if model.startswith("claude") and r.random() < 0.08:
            usage["cache_write_tokens" if r.random() < 0.8 else "cache_write_1h_tokens"] = int(r.uniform(500, 8000))
        if model.startswith(_REASONING_PREFIXES) and r.random() < 0.7:
            usage["reasoning_tokens"] = int(r.lognormvariate(math.log(900), 1.0))
        return usage

    def _base(self, feature: tuple[str, str, str] | None, tenant: str) -> dict[str, Any]:
        r = self.rng
        env = r.choices([e for e, _ in _ENVIRONMENTS], [w for _, w in _ENVIRONMENTS])[0]
        tags = {"tenant_id": tenant, "environment": env, "user_segment": r.choice(_SEGMENTS)}
        if feature is not None:
            fid, team, product = feature
            tags.update(feature_id=fid, team_id=team, endpoint=f"/v1/{product or 'app'}/{fid}",
                        deploy_version=f"2026.11.{1 + (self._n // 50_000) % 9}")
        elif self.catalog.api_keys and r.random() < 0.5:
            tags["api_key_id"] = r.choice(self.catalog.api_keys)
        return tags

    def _tick(self) -> None:
        if self.live:
            self.clock = max(self.clock, datetime.now(UTC))
            return
        p = self.profile
        if not (p.seasonality or p.growth_per_day):
            self.clock += self.step
            return
        hour = (self.clock.timestamp() % _DAY_S) / 3600.0
        days = (self.clock - self.started).total_seconds() / _DAY_S
        factor = (1.0 + p.seasonality * math.cos(2 * math.pi * (hour - 14.0) / 24.0)) * (1.0 + p.growth_per_day * days)
        self.clock += self.step / max(factor, 0.05)

    def feature_models(self, feature_id: str) -> list[tuple[str, str]]:
        """The two models a feature normally calls (stable per feature); never the catalog's flagship."""
        pick = random.Random(zlib.crc32(feature_id.encode()))
        usual = [m for m in self.catalog.models if m != self.flagship()] or list(self.catalog.models)
        return pick.sample(usual, min(2, len(usual)))

    def flagship(self) -> tuple[str, str]:
        """The catalog's most expensive model (claude-opus in the samples): where silent fallbacks land."""
        names = {m: i for i, m in enumerate(self.catalog.models)}
        return max(self.catalog.models, key=lambda m: ("opus" in m[1], "pro" in m[1], -names[m]))

    def _active(self, feature_id: str | None) -> Incident | None:
        for inc in self.profile.incidents:
            if inc.feature_id == feature_id and inc.active(self.clock):
                return inc
        return None

    def _pick_feature(self, tenant: str) -> tuple[tuple[str, str, str] | None, str]:
        r = self.rng
        for inc in self.profile.incidents:
            if inc.kind == "runaway_loop" and inc.active(self.clock) and (self.profile.only_incident
                                                                          or r.random() < 0.15):
                return self._feature(inc.feature_id), inc.tenant or tenant
        if self.profile.only_incident and self.profile.incidents:
            return self._feature(r.choice(self.profile.incidents).feature_id), tenant
        roll = r.random()
        if roll < 0.02:
            return ("experimental_" + r.choice(("agent", "rerank", "vision")), "", ""), tenant
        if roll < 0.03:
            return None, tenant
        return r.choices(self.catalog.features, self._feature_weights)[0], tenant

    def _feature(self, feature_id: str) -> tuple[str, str, str]:
        for f in self.catalog.features:
            if f[0] == feature_id:
                return f
        raise ValueError(f"feature {feature_id!r} is not in the owners registry the traffic is drawn from")

    def logical_request(self) -> list[dict[str, Any]]:
        """The attempts of one logical request, in the order a gateway emits them."""
        self._n += 1
        self._tick()
        feature, tenant = self._pick_feature(self.rng.choices(self.tenants, self._tenant_weights)[0])
        events = self._request(feature, tenant)
        fid = feature[0] if feature else None
        if fid is not None:
            self._shape(events, fid)
        return events

    def _shape(self, events: list[dict[str, Any]], feature_id: str) -> None:
        """Apply an active incident's or a one-off's effect to a request's attempts."""
        inc = self._active(feature_id)
        kind = inc.kind if inc else ""
        one_off = bool(self._pending_one_offs) and self._pending_one_offs[0][1] == feature_id \
            and self._pending_one_offs[0][0] <= self.clock
        if one_off:
            self._pending_one_offs.pop(0)
        for e in events:
            usage = e.get("usage") or {}
            if one_off:
                usage["input_tokens"] = usage.get("input_tokens", 0) * 200 + 100_000
            if kind == "prompt_regression":
                usage["input_tokens"] = usage.get("input_tokens", 0) * 4 + 3000
            elif kind == "output_inflation" and usage.get("output_tokens"):
                usage["output_tokens"] *= 4
            elif kind == "reasoning_spike" and e["status"] == "ok":
                usage["reasoning_tokens"] = (usage.get("reasoning_tokens", 0) + usage.get("output_tokens", 0)) * 5
            if usage:
                e["usage"] = usage
        if kind == "silent_fallback" and self.rng.random() < 0.6:
            provider, model = self.flagship()
            for e in events:
                e.update(provider=provider, model_requested=model, model_actual=model)
                e.pop("fallback_from", None)
        elif kind == "retry_storm" and len(events) == 1 and events[0]["status"] == "ok" and self.rng.random() < 0.7:
            ok = events[0]
            failures = []
            for i in range(self.rng.randint(1, 3)):
                failed = {**ok, "event_id": f"ev-{self._id()}", "request_id": ok["request_id"] if i == 0 else
                          self._id(), "status": "error", "error": "rate_limited", "final": False, "attempt": i,
                          "usage": {"input_tokens": 0}}
                if i > 0:  # every retry names the logical request it retries, like the gateway's own attempts
                    failed["parent_request_id"] = ok["request_id"]
                failures.append(failed)
            ok.update(request_id=self._id(), attempt=len(failures), parent_request_id=failures[0]["request_id"])
            events[:] = [*failures, ok]

    def _request(self, feature: tuple[str, str, str] | None, tenant: str) -> list[dict[str, Any]]:
        r = self.rng
        tags = self._base(feature, tenant)
        if feature is not None and not feature[1]:
            tags.pop("team_id", None)
        provider, model = r.choice(self.feature_models(feature[0]) if feature else self.catalog.models)
        shape = r.random()
        logical = self._id()
        ok: tuple[str, str, str | None] = ("ok", model, None)  # (status, model, fallback_from)
        err: tuple[str, str, str | None] = ("error", model, None)
        if shape < 0.84:
            attempts = [ok]
        elif shape < 0.90:
            attempts = [err] * r.randint(1, 2) + [ok]
        elif shape < 0.94:
            alt = r.choice([m for p, m in self.catalog.models if p == provider and m != model] or [model])
            attempts = [err, ("ok", alt, model)]
        elif shape < 0.97:
            attempts = [("terminated", model, None)]
        else:
            attempts = [err] * 3
        batch = r.random() < 0.05 and attempts == [ok]
        events: list[dict[str, Any]] = []
        ts = self.clock
        for i, (status, served, fallback_from) in enumerate(attempts):
            ts += timedelta(milliseconds=r.randint(80, 4000))
            request_id = logical if i == 0 else self._id()
            e: dict[str, Any] = {
                "schema_version": 1, "event_id": f"ev-{self._id()}", "request_id": request_id,
                "timestamp": _rfc3339(ts), "provider": provider, "model_requested": model, "model_actual": served,
                "status": status, "attempt": i, "final": i == len(attempts) - 1, "tags": tags,
                "latency_ms": r.randint(150, 30000),
            }
            if i > 0:
                e["parent_request_id"] = logical
            if fallback_from:
                e["fallback_from"] = fallback_from
            if status == "error":
                e["error"] = r.choice(("rate_limited", "timeout", "server_error", "overloaded"))
                e["usage"] = {"input_tokens": 0} if r.random() < 0.6 else self._tokens(served)
            elif status == "terminated":
                n = r.randint(50, 4000)
                e["stream_terminated_at_token_n"] = n
                if r.random() < 0.5:
                    e["usage_reported"] = False
                    e["usage"] = {}
                else:
                    usage = self._tokens(served)
                    usage["output_tokens"] = n
                    e["usage"] = usage
            else:
                e["usage"] = self._tokens(served)
                if r.random() < 0.04:
                    e["tool_calls"] = {"web_search": r.randint(1, 3)}
            if batch:
                e["batch"] = True
            if provider == "openai" and r.random() < 0.05:
                e["service_tier"] = r.choice(("priority", "flex"))
            events.append(e)
        return events

    def bad_line(self) -> bytes:
        """One malformed line of a random kind (each kind maps to a DLQ reason)."""
        r = self.rng
        good = self.logical_request()[0]
        kind = r.randrange(6)
        if kind == 0:
            return b'{"schema_version": 1, "event_id": "truncated'
        if kind == 1:
            good["usage"] = {"input_tokens": -5}
        elif kind == 2:
            good["prompt"] = "text that must never ride along"
        elif kind == 3:
            good["timestamp"] = "yesterday at noon"
        elif kind == 4:
            good["event_id"] = "has spaces and / slashes"
        else:
            return b"[1, 2, 3]"
        return orjson.dumps(good)

    def lines(self, count: int,
              admit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None) -> Iterator[bytes]:
        """`count` NDJSON lines: good events (all attempts of a request together) and a few bad lines.

        `admit` decides each logical request before it is sent (SimulatedGateways.admit): the attempts it returns
        are sent; none (a denied request) are, and the request still took its time to arrive, so the pace holds.
        """
        produced = 0
        while produced < count:
            if self.rng.random() < self.bad_rate:
                yield self.bad_line()
                produced += 1
                continue
            events = self.logical_request()
            sent = admit(events) if admit is not None else events
            if not sent:
                time.sleep(len(events) / self.rate)
            for e in sent:
                yield orjson.dumps(e)
                produced += 1


class SimulatedGateways:
    """Traffic through `tally.sdk.admission`: each logical request is decided before it "leaves", as a gateway would.

    Requests go round-robin to the gateways. A denied request is never sent (no usage event: the call never left);
    a request routed to a fallback model is sent on that model; an admitted one is sent as drawn. Each is settled
    with its attempts' exact cost from the card in effect, so the reservation is released and the spend debited.
    """

    def __init__(self, gateways: Sequence[Any]) -> None:
        self.gateways = list(gateways)
        self.admitted = self.fallbacks = self.denied = 0
        self._next = 0

    def admit(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The attempts to send for one logical request (none when it is denied)."""
        from decimal import Decimal

        from streams.enrich import price_event

        gateway = self.gateways[self._next % len(self.gateways)]
        self._next += 1
        first = events[0]
        usage = first.get("usage") or {}
        asked = max((e.get("usage") or {}).get("output_tokens", 0) + (e.get("usage") or {}).get(
            "reasoning_tokens", 0) for e in events)
        decision = gateway.reserve(
            request_id=first["request_id"], feature_id=first["tags"].get("feature_id", ""),
            tenant_id=first["tags"].get("tenant_id", ""), provider=first["provider"],
            model=first.get("model_requested") or first["model_actual"],
            input_tokens=int(usage.get("input_tokens", 0)), max_output_tokens=max(256, 2 * int(asked)))
        if not decision.admitted:
            self.denied += 1
            return []
        if decision.action == "fallback":
            self.fallbacks += 1
            for e in events:
                e["provider"], e["model_actual"] = decision.provider, decision.model
                e["model_requested"] = decision.model
                e.pop("fallback_from", None)
        else:
            self.admitted += 1
        if decision.reservation is not None and decision.reservation.attempts == 1:  # one settle per request
            cost = Decimal(0)
            for e in events:
                card = gateway.price_card_at(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")))
                cost += price_event(e, card).total
            decision.reservation.settle(cost)
        return events

    def lines(self, gen: TrafficGenerator, count: int) -> Iterator[bytes]:
        """`count` lines of `gen`'s traffic, each logical request decided first (bad lines pass, as they do)."""
        return gen.lines(count, admit=self.admit)
