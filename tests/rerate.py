"""Ground truth for end-to-end tests: re-rate and attribute events from the raw YAML, independently of tally's code.

Rational arithmetic (Fraction) straight from the quoted price strings; no tally module is imported, so a bug in
the enrich stage cannot hide in its own oracle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

STANDARD_TIERS = {"", "default", "standard", "auto"}


class Oracle:
    """Expected cost_total_usd and team_id of a v1 event, from reference YAML files."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.cards: list[tuple[datetime, dict[str, Any]]] = []
        self.owners: list[tuple[datetime, dict[str, Any]]] = []
        for path in paths:
            for doc in yaml.safe_load_all(Path(path).read_text()):
                if not doc:
                    continue
                at = datetime.fromisoformat(doc["effective_at"])
                if doc["kind"] in ("price_card", "owners"):
                    (self.cards if doc["kind"] == "price_card" else self.owners).append((at, doc))
        self.cards.sort(key=lambda x: x[0])
        self.owners.sort(key=lambda x: x[0])

    @staticmethod
    def _at(versions: list[tuple[datetime, dict[str, Any]]], ts: datetime) -> dict[str, Any] | None:
        found = None
        for at, doc in versions:
            if at <= ts:
                found = doc
        return found

    def _model(self, card: dict[str, Any], provider: str, model: str) -> dict[str, Any] | None:
        for m in card["models"]:
            if m["provider"] == provider and (m["model"] == model or model in m.get("aliases", [])):
                merged = dict((card.get("provider_defaults") or {}).get(provider, {}))
                tools = dict(merged.get("tools", {}))
                tools.update(m.get("tools", {}))
                merged.update(m)
                merged["tools"] = tools
                return merged
        return None

    def cost(self, e: Mapping[str, Any], ts: datetime) -> Fraction:
        card = self._at(self.cards, ts)
        m = self._model(card, e["provider"], e["model_actual"]) if card else None
        if m is None:
            return Fraction(0)
        u = e.get("usage", {})
        n_out, n_re = u.get("output_tokens", 0), u.get("reasoning_tokens", 0)
        if e.get("usage_reported", True) is False:
            if e.get("stream_terminated_at_token_n") is None:
                return Fraction(0)
            n_out, n_re = e["stream_terminated_at_token_n"], 0
        n_in, n_cr = u.get("input_tokens", 0), u.get("cache_read_tokens", 0)
        n_cw, n_cw1 = u.get("cache_write_tokens", 0), u.get("cache_write_1h_tokens", 0)
        prices = m
        lc = m.get("long_context")
        if lc and n_in + n_cr + n_cw + n_cw1 > int(lc["above_input_tokens"]):
            prices = lc
        mult = Fraction(1)
        if e.get("batch") and m.get("batch_discount") is not None:
            mult *= Fraction(m["batch_discount"])
        tier = e.get("service_tier", "")
        if tier not in STANDARD_TIERS and tier in m.get("service_tiers", {}):
            mult *= Fraction(m["service_tiers"][tier])

        def p(name: str, fallback: str | None = None) -> Fraction:
            raw = prices.get(name, prices.get(fallback) if fallback else None)
            return Fraction(raw) / 1_000_000 * mult if raw is not None else Fraction(0)

        total = (n_in * p("input") + n_out * p("output") + n_re * p("reasoning", "output")
                 + n_cr * p("cache_read") + n_cw * p("cache_write_5m") + n_cw1 * p("cache_write_1h"))
        for tool, calls in (e.get("tool_calls") or {}).items():
            if tool in m["tools"]:
                total += calls * Fraction(m["tools"][tool])
        return total

    def team(self, e: Mapping[str, Any], ts: datetime) -> str:
        tags = e.get("tags", {})
        reg = self._at(self.owners, ts)
        if reg is None:
            return str(tags.get("team_id", ""))
        teams = reg.get("teams") or {}
        entries = [*(reg.get("features") or {}).values(), *(reg.get("api_keys") or {}).values()]
        centers = {t["cost_center"] for t in teams.values()} | {x["cost_center"] for x in entries if "cost_center" in x}
        tenants = reg.get("tenants")
        if ((tags.get("team_id") and tags["team_id"] not in teams)
                or (tags.get("feature_id") and tags["feature_id"] not in (reg.get("features") or {}))
                or (tags.get("cost_center") and tags["cost_center"] not in centers)
                or (tenants is not None and tags.get("tenant_id") and tags["tenant_id"] not in tenants)):
            return ""  # a tag the registry does not know: unattributed
        if tags.get("team_id"):
            return str(tags["team_id"])
        feature = (reg.get("features") or {}).get(tags.get("feature_id", ""))
        if feature:
            return str(feature["team"])
        key = (reg.get("api_keys") or {}).get(tags.get("api_key_id", ""))
        return str(key["team"]) if key else ""
