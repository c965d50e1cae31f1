"""Synthetic gateway traffic: realistic usage events (retries, fallbacks, reasoning, cache, batch, bad lines)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from tally.reference import ReferenceDoc

_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "gemini-2.5", "claude-opus", "claude-sonnet")
_ENVIRONMENTS = (("prod", 0.88), ("staging", 0.09), ("dev", 0.03))
_SEGMENTS = ("free", "pro", "enterprise")


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
                 bad_rate: float = 0.003, tenants: int = 60) -> None:
        self.catalog = catalog
        self.rng = random.Random(seed)
        self.seed = seed
        self.clock = start or datetime.now(UTC)
        self.step = timedelta(seconds=1.0 / rate)
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

    def logical_request(self) -> list[dict[str, Any]]:
        """The attempts of one logical request, in the order a gateway emits them."""
        r = self.rng
        self._n += 1
        self.clock += self.step
        tenant = r.choices(self.tenants, self._tenant_weights)[0]
        roll = r.random()
        if roll < 0.02:
            feature: tuple[str, str, str] | None = ("experimental_" + r.choice(("agent", "rerank", "vision")),
                                                    "", "")
        elif roll < 0.03:
            feature = None
        else:
            feature = r.choices(self.catalog.features, self._feature_weights)[0]
        tags = self._base(feature, tenant)
        if feature is not None and not feature[1]:
            tags.pop("team_id", None)
        provider, model = r.choice(self.catalog.models)
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

    def lines(self, count: int) -> Iterator[bytes]:
        """`count` NDJSON lines: good events (all attempts of a request together) and a few bad lines."""
        produced = 0
        while produced < count:
            if self.rng.random() < self.bad_rate:
                yield self.bad_line()
                produced += 1
                continue
            for e in self.logical_request():
                yield orjson.dumps(e)
                produced += 1
