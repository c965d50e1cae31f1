"""Reference data: effective-dated price cards and owners registries (formats: docs/reference-data.md)."""

from __future__ import annotations

import difflib
import re
import string
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, TypeVar

import orjson
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tally.errors import ReferenceDataError

KIND_PRICE_CARD = "price_card"
KIND_OWNERS = "owners"
KIND_BUDGETS = "budgets"
KIND_MODEL_ALIASES = "model_aliases"
KIND_ROUTING_POLICY = "routing_policy"
KINDS: tuple[str, ...] = (KIND_PRICE_CARD, KIND_OWNERS, KIND_BUDGETS, KIND_MODEL_ALIASES, KIND_ROUTING_POLICY)
BUDGET_SCOPES: tuple[str, ...] = ("feature", "tenant")
BUDGET_PERIODS: tuple[str, ...] = ("day", "month")
DEFAULT_THRESHOLDS: tuple[int, ...] = (50, 80, 100)

# Exactness bound. A token price has at most 6 decimal places per million tokens (12 per token) and each
# of the at most two multipliers that can apply to it (batch_discount, service tier) at most 3, so every
# token cost has at most 6 + 6 + 3 + 3 = 18 decimal places: exact in ClickHouse Decimal(38, 18), never
# rounded. Tool prices (USD per call, not multiplied) have at most 9. The maxima keep every cost line far
# below 10**20, the integer range of Decimal(38, 18).
PRICE_PLACES = 6
MULTIPLIER_PLACES = 3
TOOL_PRICE_PLACES = 9
PRICE_MAX = Decimal(1_000_000)
MULTIPLIER_MAX = Decimal(100)
TOOL_PRICE_MAX = Decimal(1_000_000)
_PRICE = (PRICE_PLACES, PRICE_MAX, "price per million tokens")
_BUDGET = (6, Decimal("1000000000"), "budget amount in USD")
_MULTIPLIER = (MULTIPLIER_PLACES, MULTIPLIER_MAX, "multiplier")
_TOOL_PRICE = (TOOL_PRICE_PLACES, TOOL_PRICE_MAX, "USD per call")

# Decimal arithmetic for money: wide enough that no valid computation rounds; any rounding at all is an error.
MONEY_CONTEXT = Context(prec=60, rounding=ROUND_HALF_EVEN, Emin=-999_999, Emax=999_999,
                        traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])

# Memoized lookups per card and per model stop growing here (their keys come from producers).
_MEMO_MAX = 4096

# Service tiers that mean "standard price" unless a card lists them with another multiplier.
STANDARD_TIERS: frozenset[str] = frozenset({"", "default", "standard", "auto"})

_VERSION_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_PROVIDER_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_DECIMAL_RE = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_DIGITS_RE = re.compile(r"^[0-9]+$")

# libyaml's parser when present (same nodes and marks, faster); composing never constructs Python values.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_MERGE = "tag:yaml.org,2002:merge"

Path_ = tuple[str | int, ...]
T = TypeVar("T")


class ClassPrices(NamedTuple):
    """USD per million tokens per token class; None = no price (tokens of that class make the row partial)."""

    input: Decimal | None
    output: Decimal | None
    reasoning: Decimal | None
    cache_read: Decimal | None
    cache_write_5m: Decimal | None
    cache_write_1h: Decimal | None


class Rates(NamedTuple):
    """USD per token per class after multipliers (exact, ≤ 18 decimal places), plus why they are partial.

    `filled` holds the six rates in ClassPrices order (reasoning defaults to output) with 0 for a class without a
    price, whose index is then in `missing` (tokens of a missing class make a row partial); `notes` explain
    multipliers that did not apply.
    """

    filled: tuple[Decimal, Decimal, Decimal, Decimal, Decimal, Decimal]
    missing: tuple[int, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LongContextTier:
    """Prices that replace the base prices for the whole request once its prompt exceeds above_input_tokens.

    Prompt = input + cache_read + cache_write (5m) + cache_write_1h tokens. Reasoning defaults to the tier's
    output price; a cache class the tier does not price is unpriced (partial), never the cheaper base price.
    """

    above_input_tokens: int
    prices: ClassPrices


@dataclass(frozen=True)
class ModelPrice:
    """One provider × model entry of a price card (provider defaults already merged in)."""

    provider: str
    model: str
    aliases: tuple[str, ...]
    prices: ClassPrices
    batch_discount: Decimal | None
    long_context: LongContextTier | None
    service_tiers: Mapping[str, Decimal]
    tools: Mapping[str, Decimal]
    # Token classes batch_discount does not apply to (e.g. cached input, which OpenAI and Google bill at the
    # standard rate in batch); ClassPrices field names.
    batch_undiscounted: frozenset[str] = frozenset()
    # True: a name with a date snapshot suffix (-YYYY-MM-DD, -YYYYMMDD) whose base is this entry costs the same
    # (the card says so); False: such a name is unpriced unless it has an entry of its own.
    same_price_snapshots: bool = False
    _rates: dict[tuple[bool, str, bool], Rates] = field(default_factory=dict, compare=False, repr=False)
    # The entry's canonical name, provider/model, as rows record what they were priced as (made once: enrich reads
    # it for every event).
    priced_as: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "priced_as", f"{self.provider}/{self.model}")

    def rates(self, batch: bool, service_tier: str, long_context: bool) -> Rates:
        """Return per-token prices for one (batch, service tier, long context) combination; memoized, exact.

        Contract: batch=True multiplies every token class but those in batch_undiscounted by batch_discount (none
        listed → full price and a note); the service tier multiplier comes from service_tiers, standard names mean
        1, an unknown tier means 1 and a note. long_context=True selects the long-context prices (callers check
        the threshold).
        """
        key = (batch, service_tier, long_context)
        found = self._rates.get(key)
        if found is not None:
            return found
        notes: list[str] = []
        multiplier = Decimal(1)
        batch_multiplier = Decimal(1)
        if batch:
            if self.batch_discount is None:
                notes.append(f"no batch price for {self.provider}/{self.model}: priced at standard rates")
            else:
                batch_multiplier = self.batch_discount
        tier_multiplier = self.service_tiers.get(service_tier)
        if tier_multiplier is not None:
            multiplier = tier_multiplier
        elif service_tier not in STANDARD_TIERS:
            notes.append(f"unknown service tier {service_tier!r} for {self.provider}/{self.model}: "
                         "multiplier 1")
        both = MONEY_CONTEXT.multiply(multiplier, batch_multiplier)
        prices = self.long_context.prices if (long_context and self.long_context) else self.prices
        p_in, p_out, p_re, p_cr, p_cw, p_cw1h = (
            None if p is None else MONEY_CONTEXT.multiply(
                p.scaleb(-6, MONEY_CONTEXT), multiplier if name in self.batch_undiscounted else both)
            for name, p in zip(ClassPrices._fields, prices, strict=True))
        if p_re is None:
            p_re = p_out
        per_token = (p_in, p_out, p_re, p_cr, p_cw, p_cw1h)
        zero = Decimal(0)
        f_in, f_out, f_re, f_cr, f_cw, f_cw1h = (zero if p is None else p for p in per_token)
        missing = tuple(i for i, p in enumerate(per_token) if p is None)
        found = Rates((f_in, f_out, f_re, f_cr, f_cw, f_cw1h), missing, tuple(notes))
        if len(self._rates) < _MEMO_MAX:  # bounded: service tier names come from producers
            self._rates[key] = found
        return found


class Pricing(NamedTuple):
    """Everything needed to price events of one (provider, model, batch, service tier) with one card."""

    entry: ModelPrice
    above_input_tokens: int | None  # the long-context threshold, None without a tier
    base: Rates
    long: Rates | None


_SNAPSHOT_SUFFIX_RE = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


def base_model(model: str) -> str:
    """Return the model name without a trailing date snapshot suffix (-YYYY-MM-DD or -YYYYMMDD), as cards match it."""
    return _SNAPSHOT_SUFFIX_RE.sub("", model)


@dataclass(frozen=True)
class PriceCard:
    """One version of the price card: what each (provider, model) costs from effective_at until the next one.

    YAML (one document per version; see docs/reference-data.md)::

        kind: price_card
        version: "2026-11-01"                  # [A-Za-z0-9._:-]{1,64}
        effective_at: "2026-11-01T00:00:00Z"   # RFC 3339 with an offset
        currency: USD                          # the only currency
        provider_defaults:                     # optional, merged under every model of that provider
          openai: {batch_discount: "0.5", service_tiers: {flex: "0.5"}, tools: {web_search: "0.01"}}
        models:
          - provider: openai
            model: gpt-5
            aliases: [gpt-5-chat-latest]       # optional
            input: "1.25"                      # USD per million tokens, quoted, ≤ 6 decimal places
            output: "10.00"
            reasoning: "10.00"                 # optional, defaults to output
            cache_read: "0.125"                # optional (as are cache_write_5m, cache_write_1h)
            batch_discount: "0.5"              # optional multiplier, ≤ 3 decimal places
            batch_undiscounted: [cache_read]   # optional: classes batch_discount does not apply to
            service_tiers: {priority: "2"}     # optional multipliers by tier name
            long_context: {above_input_tokens: 200000, input: "2.50", output: "15.00"}
            tools: {web_search: "0.01"}        # USD per call, ≤ 9 decimal places

    Model matching (`match`, `find`), first hit wins:
      1. exact (provider, model), or a card alias of an entry;
      2. the name with a trailing date snapshot suffix removed (-YYYY-MM-DD or -YYYYMMDD: gpt-4o-2024-08-06 →
         gpt-4o), only when that entry says `same_price_snapshots: true`; a dated name whose base entry does not
         say so is unpriced, with the reason (a snapshot can cost more than the model's current price:
         gpt-4o-2024-05-13 lists at twice gpt-4o's), never priced at the base's price;
      3. the model alias table in effect (`kind: model_aliases`, bound by the ReferenceSnapshot): each rule that
         matches, in order, renames (provider, model); the first new name found as in 1 or 2 prices the event.
    """

    version: str
    effective_at: datetime
    currency: str
    models: tuple[ModelPrice, ...]
    _index: Mapping[tuple[str, str], ModelPrice] = field(compare=False, repr=False)
    aliases: ModelAliases | None = field(default=None, compare=False)
    _lookup: dict[tuple[str, str], Match] = field(default_factory=dict, compare=False, repr=False)
    _pricing: dict[tuple[str, str, bool, str], Pricing | None] = field(default_factory=dict, compare=False,
                                                                       repr=False)

    def with_aliases(self, aliases: ModelAliases | None) -> PriceCard:
        """Return the card matching names through `aliases` too (fresh memos; this one is unchanged)."""
        return PriceCard(self.version, self.effective_at, self.currency, self.models, self._index, aliases)

    def pricing(self, provider: str, model: str, batch: bool, service_tier: str) -> Pricing | None:
        """Return the entry and per-token rates (base and long context) for these event fields, or None.

        None = the model is not in this card (unpriced; `match` says why). Memoized per card: the hot path is one
        dict lookup.
        """
        key = (provider, model, batch, service_tier)
        try:
            return self._pricing[key]
        except KeyError:
            pass
        entry = self.find(provider, model)
        found = None
        if entry is not None:
            tier = entry.long_context
            found = Pricing(entry, tier.above_input_tokens if tier else None, entry.rates(batch, service_tier, False),
                            entry.rates(batch, service_tier, True) if tier else None)
        if len(self._pricing) < _MEMO_MAX:  # bounded: model and tier names come from producers
            self._pricing[key] = found
        return found

    def find(self, provider: str, model: str) -> ModelPrice | None:
        """Return the entry that prices (provider, model) under the matching rules above, or None."""
        return self.match(provider, model).entry

    def match(self, provider: str, model: str) -> Match:
        """The entry that prices (provider, model) and how it was found, or None and why not (memoized)."""
        key = (provider, model)
        try:
            return self._lookup[key]
        except KeyError:
            pass
        found = self._match(provider, model)
        if len(self._lookup) < _MEMO_MAX:  # bounded: model names come from producers
            self._lookup[key] = found
        return found

    def _match(self, provider: str, model: str) -> Match:
        entry = self._index.get((provider, model))
        if entry is not None:
            how = "exact" if entry.model == model else f"card alias of {entry.priced_as}"
            return Match(entry, how)
        own = self._dated(provider, model)  # the event's own provider first: a snapshot it prices alike
        if own.entry is not None:
            return own
        missed: list[str] = []
        if self.aliases is not None:
            for rule, to_provider, to_model in self.aliases.candidates(provider, model):
                via = (f"alias rule {rule.name!r} of model_aliases {self.aliases.version}: "
                       f"{provider}/{model} → {to_provider}/{to_model}")
                entry = self._index.get((to_provider, to_model))
                if entry is not None:
                    return Match(entry, via)
                found = self._dated(to_provider, to_model)
                if found.entry is not None:
                    return Match(found.entry, f"{via}; {found.how}")
                missed.append(f"{via}, but {found.how}")
        return Match(None, f"{own.how}; " + "; ".join(missed)) if missed else own

    def _dated(self, provider: str, model: str) -> Match:
        base = base_model(model)
        entry = self._index.get((provider, base)) if base != model else None
        if entry is None:
            return Match(None, f"{provider}/{model} is not in price card {self.version}")
        if not entry.same_price_snapshots:
            return Match(None, f"{provider}/{model} is a dated snapshot of {entry.priced_as}, and price card "
                               f"{self.version} neither lists it nor says its snapshots cost the same "
                               "(same_price_snapshots)")
        return Match(entry, f"dated snapshot of {entry.priced_as}, which the card prices alike")


class Match(NamedTuple):
    """What `PriceCard.match` found: the entry (None: unpriced) and how, or why not, in words."""

    entry: ModelPrice | None
    how: str


@dataclass(frozen=True, slots=True)
class AliasRule:
    """One rule of a model alias table: a name as gateways send it → the name the price card knows.

    `equals` matches one name exactly (an Azure deployment); otherwise `pattern` must match the whole name and
    `model` is filled from its named groups ("{model}-{date}"). `price_as` names the card's provider when it is
    not the event's (Bedrock's Claude priced as Anthropic's).
    """

    name: str
    providers: frozenset[str]
    equals: str | None
    pattern: re.Pattern[str] | None
    model: str
    price_as: str | None

    def apply(self, provider: str, model: str) -> tuple[str, str] | None:
        """(provider, model) to price, or None when the rule does not match."""
        if provider not in self.providers:
            return None
        if self.equals is not None:
            return (self.price_as or provider, self.model) if model == self.equals else None
        assert self.pattern is not None
        m = self.pattern.fullmatch(model)
        if m is None:
            return None
        return self.price_as or provider, self.model.format_map(m.groupdict(""))


@dataclass(frozen=True)
class ModelAliases:
    """One effective-dated version of the model alias table (`kind: model_aliases`; docs/reference-data.md).

    YAML::

        kind: model_aliases
        version: "2026-12-01"
        effective_at: "2026-01-01T00:00:00Z"
        rules:                                  # in order: the first whose new name the card prices wins
          - name: gemini-api-resource-name      # [A-Za-z0-9._-]{1,64}, unique
            provider: google                    # the event's provider, or a list of them
            pattern: 'models/(?P<model>.+)'     # a regular expression the whole model name must match
            model: '{model}'                    # the name to price: the pattern's named groups in braces
          - name: azure-prod-gpt5
            provider: azure.ai.openai
            equals: prod-gpt5                   # one name exactly (an Azure deployment is a name of yours)
            model: gpt-5
            price_as: openai                    # optional: the card's provider, when not the event's
    """

    version: str
    effective_at: datetime
    rules: tuple[AliasRule, ...]

    def candidates(self, provider: str, model: str) -> Iterator[tuple[AliasRule, str, str]]:
        """Every rule that renames (provider, model), in order, with the name it gives.

        The card takes the first name it prices (`PriceCard.match`): a later rule is a fallback for names an
        earlier one gives but no card entry holds.
        """
        for rule in self.rules:
            renamed = rule.apply(provider, model)
            if renamed is not None and renamed != (provider, model):
                yield rule, renamed[0], renamed[1]


@dataclass(frozen=True, slots=True)
class Team:
    """A team of the owners registry."""

    team_id: str
    cost_center: str
    business_unit: str


@dataclass(frozen=True, slots=True)
class OwnerEntry:
    """What the registry says about a feature or an API key; '' = not set here (comes from the team)."""

    team: str
    product: str
    cost_center: str
    business_unit: str


@dataclass(frozen=True)
class OwnerRegistry:
    """One version of the owners registry: a complete picture of who owns what from effective_at on.

    YAML (one document per version; a version is complete, not a delta)::

        kind: owners
        version: "2026-02-01"
        effective_at: "2026-02-01T00:00:00Z"
        teams:                       # team_id → cost_center, business_unit
          inbox: {cost_center: CC-2100, business_unit: communication}
        features:                    # feature_id → team (a key of teams), product; optional overrides
          summarize_email_v2: {team: inbox, product: mail, cost_center: CC-2150}
        api_keys:                    # optional: api_key_id → team, optional product and overrides
          key_reports_batch: {team: data, product: analytics}
        tenants: [tenant-000, acme]  # optional: the known tenant ids (absent = tenants are open-ended)

    `cost_centers` are every cost center the version names (its teams' and its entries' overrides). `tenants` is
    None when the version lists none: tenant tags are then not checked (enrich's lenient mode for tenants).
    """

    version: str
    effective_at: datetime
    teams: Mapping[str, Team]
    features: Mapping[str, OwnerEntry]
    api_keys: Mapping[str, OwnerEntry]
    cost_centers: frozenset[str] = frozenset()
    tenants: frozenset[str] | None = None


@dataclass(frozen=True)
class Budget:
    """A spend limit for one feature or tenant per day or month (UTC periods), with alert thresholds in %."""

    scope: str
    ident: str
    period: str
    amount: Decimal
    thresholds: tuple[int, ...]

    @property
    def key(self) -> str:
        """The budget's id on llm.budget.state.v1: scope:id:period."""
        return f"{self.scope}:{self.ident}:{self.period}"


@dataclass(frozen=True)
class BudgetSet:
    """One effective-dated version of all budgets."""

    version: str
    effective_at: datetime
    budgets: tuple[Budget, ...]


@dataclass(frozen=True)
class ReferenceDoc:
    """One validated version of one kind of reference data.

    `body` is the document as written (decimals stay strings, so JSON round-trips exactly); read-only.
    `parsed` is the typed view built from it (PriceCard or OwnerRegistry).
    """

    kind: str
    version: str
    effective_at: datetime
    body: dict[str, Any]
    parsed: PriceCard | OwnerRegistry | BudgetSet | ModelAliases | RoutingPolicy = field(compare=False, repr=False)

    def key(self) -> bytes:
        """Return the compacted-topic key b"kind:version" (a later record with it replaces this version)."""
        return f"{self.kind}:{self.version}".encode()

    def to_json(self) -> bytes:
        """Return the document as JSON bytes (keys sorted; decimals as the strings written in the file)."""
        return orjson.dumps(self.body, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> ReferenceDoc:
        """Parse and validate what to_json produced; raises ReferenceDataError listing every problem."""
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ReferenceDataError([f"<json>: not JSON: {exc}"]) from exc
        problems = _Problems("<json>", {})
        doc = _parse_document(body, problems)
        if problems.items or doc is None:
            raise ReferenceDataError(problems.items or ["<json>: invalid reference document"])
        return doc


class _Problems:
    """Collects "origin:line: path: message" problems; lines come from YAML node marks (none for JSON)."""

    def __init__(self, origin: str, lines: Mapping[Path_, int]) -> None:
        self.origin = origin
        self.lines = lines
        self.items: list[str] = []

    def add(self, path: Path_, message: str) -> None:
        line = None
        probe = path
        while True:
            line = self.lines.get(probe)
            if line is not None or not probe:
                break
            probe = probe[:-1]
        where = f"{self.origin}:{line}" if line is not None else self.origin
        dotted = _dotted(path)
        self.items.append(f"{where}: {dotted}: {message}" if dotted else f"{where}: {message}")


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(frozen=True, slots=True)
class _Unquoted:
    """A YAML scalar resolved to a number type we never construct (float, odd int forms): kept as its text."""

    text: str
    tag: str


def _to_data(node: Node, path: Path_, lines: dict[Path_, int], problems: _Problems) -> Any:
    """Turn a composed YAML node into plain data without PyYAML's constructor (so no float is ever built)."""
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            kpath_line = knode.start_mark.line + 1
            if knode.tag == _TAG_MERGE:
                lines[path + ("<<",)] = kpath_line
                problems.add(path + ("<<",), "merge keys (<<) are not supported: write the keys out")
                continue
            if not isinstance(knode, ScalarNode) or knode.tag not in (_TAG_STR, _TAG_INT):
                lines[path + ("?",)] = kpath_line
                problems.add(path + ("?",), "keys must be plain strings")
                continue
            key = str(knode.value)
            if key in out:
                lines[path + (key,)] = kpath_line
                problems.add(path + (key,), "duplicate key")
                continue
            lines[path + (key,)] = kpath_line
            out[key] = _to_data(vnode, path + (key,), lines, problems)
        return out
    if isinstance(node, SequenceNode):
        items: list[Any] = []
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            items.append(_to_data(item, path + (i,), lines, problems))
        return items
    assert isinstance(node, ScalarNode)
    text = str(node.value)
    if node.tag == _TAG_STR:
        return text
    if node.tag == _TAG_INT and _DIGITS_RE.match(text):
        return int(text)
    if node.tag == _TAG_BOOL:
        return text.lower() in ("true", "yes", "on", "y")
    if node.tag == _TAG_NULL:
        return None
    if node.tag == "tag:yaml.org,2002:timestamp":
        return text
    return _Unquoted(text, node.tag.rsplit(":", 1)[-1])


def _describe(value: Any) -> str:
    if isinstance(value, _Unquoted):
        return f"unquoted YAML {value.tag} {value.text}"
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _mapping(p: _Problems, path: Path_, value: Any, what: str) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    p.add(path, f"must be a mapping of {what}, got {_describe(value)}")
    return None


def _keys(p: _Problems, path: Path_, data: Mapping[str, Any], required: Iterable[str],
          optional: Iterable[str]) -> None:
    """Report missing required keys and unknown keys (with the closest known key, for typos)."""
    required = tuple(required)
    known = (*required, *optional)
    for k in required:
        if k not in data:
            p.add(path, f"missing required key {k!r}")
    for k in data:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            p.add(path + (k,), f"unknown key {k!r}{hint}")


def _string(p: _Problems, path: Path_, value: Any, pattern: re.Pattern[str] | None = None,
            what: str = "a string") -> str | None:
    if not isinstance(value, str):
        p.add(path, f"must be {what} (quote it), got {_describe(value)}")
        return None
    if pattern is not None and not pattern.match(value):
        p.add(path, f"{value!r} is not valid here (expected {pattern.pattern})")
        return None
    if pattern is None and not value.strip():
        p.add(path, "must not be empty")
        return None
    return value


def _decimal(p: _Problems, path: Path_, value: Any, limits: tuple[int, Decimal, str]) -> Decimal | None:
    """Parse a non-negative decimal written as a quoted string; limits = (decimal places, maximum, what)."""
    places, maximum, what = limits
    if not isinstance(value, str):
        example = value.text if isinstance(value, _Unquoted) else str(value)
        p.add(path, f"{what} must be a quoted decimal string such as \"{example}\" (YAML numbers are floats "
                    f"or ints, not exact decimals), got {_describe(value)}")
        return None
    if not _DECIMAL_RE.match(value):
        p.add(path, f"{what} {value!r} is not a plain non-negative decimal such as \"2.50\"")
        return None
    number = Decimal(value)
    if number > maximum:
        p.add(path, f"{what} {value!r} is above the maximum {maximum}")
        return None
    significant = len(value.partition(".")[2].rstrip("0"))  # trailing zeros are not decimal places
    if significant > places:
        p.add(path, f"{what} {value!r} has {significant} decimal places; at most {places} keep every cost "
                    f"exact at 18 decimal places")
        return None
    return number.quantize(Decimal(1).scaleb(-significant), context=MONEY_CONTEXT)


def _timestamp(p: _Problems, path: Path_, value: Any) -> datetime | None:
    if not isinstance(value, str) or not _RFC3339_RE.match(value):
        p.add(path, f"must be an RFC 3339 timestamp with an offset such as \"2026-11-01T00:00:00Z\", "
                    f"got {_describe(value)}")
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError as exc:
        p.add(path, f"invalid timestamp {value!r}: {exc}")
        return None
    return parsed.astimezone(UTC)


def _price_set(p: _Problems, path: Path_, data: Mapping[str, Any]) -> ClassPrices:
    def get(name: str) -> Decimal | None:
        if name not in data:
            return None
        return _decimal(p, path + (name,), data[name], _PRICE)

    return ClassPrices(*(get(name) for name in ClassPrices._fields))


_PRICE_KEYS = ClassPrices._fields
_EXTRAS_KEYS = ("batch_discount", "service_tiers", "tools")


def _extras(p: _Problems, path: Path_, data: Mapping[str, Any]) -> tuple[Decimal | None, dict[str, Decimal],
                                                                            dict[str, Decimal]]:
    batch: Decimal | None = None
    if "batch_discount" in data:
        batch = _decimal(p, path + ("batch_discount",), data["batch_discount"], _MULTIPLIER)
    tiers = _named_decimals(p, path, data, "service_tiers", "tier name → multiplier", _MULTIPLIER)
    tools = _named_decimals(p, path, data, "tools", "tool name → USD per call", _TOOL_PRICE)
    return batch, tiers, tools


def _named_decimals(p: _Problems, path: Path_, data: Mapping[str, Any], key: str, what: str,
                    limits: tuple[int, Decimal, str]) -> dict[str, Decimal]:
    """A mapping of names to validated decimals (service-tier multipliers, tool prices); {} when absent."""
    out: dict[str, Decimal] = {}
    if key not in data:
        return out
    for name, raw in (_mapping(p, path + (key,), data[key], what) or {}).items():
        if _string(p, path + (key, name), name, _NAME_RE) is None:
            continue
        value = _decimal(p, path + (key, name), raw, limits)
        if value is not None:
            out[name] = value
    return out


def _class_names(p: _Problems, path: Path_, value: Any) -> frozenset[str]:
    """A list of distinct token class names (ClassPrices fields), e.g. batch_undiscounted: [cache_read]."""
    if not isinstance(value, list):
        p.add(path, f"must be a list of token classes ({', '.join(_PRICE_KEYS)}), got {_describe(value)}")
        return frozenset()
    names: set[str] = set()
    for i, raw in enumerate(value):
        if raw not in _PRICE_KEYS:
            close = difflib.get_close_matches(str(raw), _PRICE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(_PRICE_KEYS)})"
            shown = repr(raw) if isinstance(raw, str) else _describe(raw)
            p.add(path + (i,), f"unknown token class {shown}{hint}")
        elif raw in names:
            p.add(path + (i,), f"duplicate token class {raw!r}")
        else:
            names.add(raw)
    return frozenset(names)


def _parse_price_card(p: _Problems, body: Mapping[str, Any], version: str,
                      effective_at: datetime) -> PriceCard:
    _keys(p, (), body, ("kind", "version", "effective_at", "currency", "models"),
          ("description", "provider_defaults"))
    currency = body.get("currency")
    if "currency" in body and currency != "USD":
        p.add(("currency",), f"only USD is supported, got {_describe(currency)}")
    defaults: dict[str, tuple[Decimal | None, dict[str, Decimal], dict[str, Decimal]]] = {}
    if "provider_defaults" in body:
        pd = _mapping(p, ("provider_defaults",), body["provider_defaults"], "provider → defaults")
        for name, raw in (pd or {}).items():
            path: Path_ = ("provider_defaults", name)
            _string(p, path, name, _PROVIDER_RE)
            entry = _mapping(p, path, raw, "batch_discount, service_tiers, tools")
            if entry is not None:
                _keys(p, path, entry, (), _EXTRAS_KEYS)
                defaults[name] = _extras(p, path, entry)
    models: list[ModelPrice] = []
    index: dict[tuple[str, str], ModelPrice] = {}
    claimed: dict[tuple[str, str], int] = {}
    raw_models = body.get("models")
    if "models" in body and not isinstance(raw_models, list):
        p.add(("models",), f"must be a list of model entries, got {_describe(raw_models)}")
        raw_models = []
    for i, raw in enumerate(raw_models or []):
        path = ("models", i)
        entry = _mapping(p, path, raw, "model prices")
        if entry is None:
            continue
        before = len(p.items)
        _keys(p, path, entry, ("provider", "model", "input", "output"),
              ("aliases", "reasoning", "cache_read", "cache_write_5m", "cache_write_1h", "long_context",
               "description", "batch_undiscounted", "same_price_snapshots", *_EXTRAS_KEYS))
        provider = (_string(p, path + ("provider",), entry["provider"], _PROVIDER_RE)
                    if "provider" in entry else None)
        model = _string(p, path + ("model",), entry["model"], _NAME_RE) if "model" in entry else None
        aliases: list[str] = []
        if "aliases" in entry:
            raw_aliases = entry["aliases"]
            if not isinstance(raw_aliases, list):
                p.add(path + ("aliases",), f"must be a list of model names, got {_describe(raw_aliases)}")
            else:
                for j, alias in enumerate(raw_aliases):
                    alias_name = _string(p, path + ("aliases", j), alias, _NAME_RE)
                    if alias_name is not None:
                        aliases.append(alias_name)
        prices = _price_set(p, path, entry)
        long_tier: LongContextTier | None = None
        if "long_context" in entry:
            lpath = path + ("long_context",)
            lc = _mapping(p, lpath, entry["long_context"], "long-context prices")
            if lc is not None:
                _keys(p, lpath, lc, ("above_input_tokens", "input", "output"), _PRICE_KEYS)
                threshold = lc.get("above_input_tokens")
                if "above_input_tokens" in lc and (type(threshold) is not int or threshold < 0):
                    p.add(lpath + ("above_input_tokens",), f"must be a non-negative integer, got "
                                                           f"{_describe(threshold)}")
                    threshold = None
                lprices = _price_set(p, lpath, lc)
                if isinstance(threshold, int):
                    long_tier = LongContextTier(threshold, lprices)
        batch, tiers, tools = _extras(p, path, entry)
        undiscounted = _class_names(p, path + ("batch_undiscounted",), entry["batch_undiscounted"]) \
            if "batch_undiscounted" in entry else frozenset()
        same_price_snapshots = entry.get("same_price_snapshots", False)
        if type(same_price_snapshots) is not bool:
            p.add(path + ("same_price_snapshots",), f"must be true or false, got {_describe(same_price_snapshots)}")
        if len(p.items) > before or provider is None or model is None:
            continue
        d_batch, d_tiers, d_tools = defaults.get(provider, (None, {}, {}))
        price = ModelPrice(
            provider=provider, model=model, aliases=tuple(aliases), prices=prices,
            batch_discount=batch if "batch_discount" in entry else d_batch,
            long_context=long_tier,
            service_tiers=MappingProxyType({**d_tiers, **tiers}),
            tools=MappingProxyType({**d_tools, **tools}),
            batch_undiscounted=undiscounted,
            same_price_snapshots=same_price_snapshots is True,
        )
        for name in (model, *aliases):
            if (provider, name) in claimed:
                p.add(path, f"duplicate model {provider}/{name} (also models[{claimed[(provider, name)]}])")
                continue
            claimed[(provider, name)] = i
            index[(provider, name)] = price
        models.append(price)
    return PriceCard(version, effective_at, "USD", tuple(models), MappingProxyType(index))


def _owner_entries(p: _Problems, body: Mapping[str, Any], key: str, teams: set[str],
                   product_required: bool) -> dict[str, OwnerEntry]:
    out: dict[str, OwnerEntry] = {}
    if key not in body:
        return out
    data = _mapping(p, (key,), body[key], f"{key[:-1]} id → owner")
    for ident, raw in (data or {}).items():
        path: Path_ = (key, ident)
        entry = _mapping(p, path, raw, "team, product, cost_center, business_unit")
        if entry is None:
            continue
        before = len(p.items)
        _keys(p, path, entry, ("team", "product") if product_required else ("team",),
              ("cost_center", "business_unit", "description") + (() if product_required else ("product",)))
        team = _string(p, path + ("team",), entry.get("team")) if "team" in entry else None
        if team is not None and team not in teams:
            close = difflib.get_close_matches(team, list(teams), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.add(path + ("team",), f"unknown team {team!r}: not a key of teams{hint}")
        fields = {}
        for name in ("product", "cost_center", "business_unit"):
            fields[name] = (_string(p, path + (name,), entry[name]) or "") if name in entry else ""
        if len(p.items) == before and team is not None:
            out[ident] = OwnerEntry(team, fields["product"], fields["cost_center"], fields["business_unit"])
    return out


def _parse_owners(p: _Problems, body: Mapping[str, Any], version: str,
                  effective_at: datetime) -> OwnerRegistry:
    _keys(p, (), body, ("kind", "version", "effective_at", "teams", "features"),
          ("api_keys", "tenants", "description"))
    teams: dict[str, Team] = {}
    if "teams" in body:
        data = _mapping(p, ("teams",), body["teams"], "team id → cost_center, business_unit")
        for ident, raw in (data or {}).items():
            path: Path_ = ("teams", ident)
            entry = _mapping(p, path, raw, "cost_center, business_unit")
            if entry is None:
                continue
            before = len(p.items)
            _keys(p, path, entry, ("cost_center", "business_unit"), ("description",))
            cc = _string(p, path + ("cost_center",), entry["cost_center"]) if "cost_center" in entry else None
            bu = (_string(p, path + ("business_unit",), entry["business_unit"])
                  if "business_unit" in entry else None)
            if len(p.items) == before and cc is not None and bu is not None:
                teams[ident] = Team(ident, cc, bu)
    # References are checked against every team named, even one whose own entry has a problem.
    named = set(body["teams"]) if isinstance(body.get("teams"), dict) else set()
    features = _owner_entries(p, body, "features", named, product_required=True)
    api_keys = _owner_entries(p, body, "api_keys", named, product_required=False)
    cost_centers = frozenset(t.cost_center for t in teams.values()) | frozenset(
        e.cost_center for e in (*features.values(), *api_keys.values()) if e.cost_center)
    tenants = _tenant_ids(p, body["tenants"]) if "tenants" in body else None
    return OwnerRegistry(version, effective_at, MappingProxyType(teams), MappingProxyType(features),
                         MappingProxyType(api_keys), cost_centers, tenants)


def _tenant_ids(p: _Problems, value: Any) -> frozenset[str]:
    """The `tenants` list of an owners version: distinct, non-empty tenant ids."""
    if not isinstance(value, list):
        p.add(("tenants",), f"must be a list of tenant ids, got {_describe(value)}")
        return frozenset()
    seen: dict[str, int] = {}
    for i, raw in enumerate(value):
        ident = _string(p, ("tenants", i), raw)
        if ident is None:
            continue
        if ident in seen:
            p.add(("tenants", i), f"duplicate tenant {ident!r} (also tenants[{seen[ident]}])")
        seen.setdefault(ident, i)
    return frozenset(seen)


def _parse_budgets(p: _Problems, body: Mapping[str, Any], version: str, effective_at: datetime) -> BudgetSet:
    _keys(p, (), body, ("kind", "version", "effective_at", "budgets"), ("currency", "thresholds", "description"))
    if "currency" in body and body["currency"] != "USD":
        p.add(("currency",), f"only USD is supported, got {_describe(body['currency'])}")
    default = _thresholds(p, ("thresholds",), body["thresholds"]) if "thresholds" in body else DEFAULT_THRESHOLDS
    raw = body.get("budgets")
    if not isinstance(raw, list):
        if "budgets" in body:
            p.add(("budgets",), f"must be a list of budgets, got {_describe(raw)}")
        return BudgetSet(version, effective_at, ())
    out: list[Budget] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path: Path_ = ("budgets", i)
        entry = _mapping(p, path, item, "scope, id, period, amount")
        if entry is None:
            continue
        before = len(p.items)
        _keys(p, path, entry, ("scope", "id", "period", "amount"), ("thresholds", "description"))
        scope, period = entry.get("scope"), entry.get("period")
        if "scope" in entry and scope not in BUDGET_SCOPES:
            p.add(path + ("scope",), f"must be one of {', '.join(BUDGET_SCOPES)}, got {_describe(scope)}")
        if "period" in entry and period not in BUDGET_PERIODS:
            p.add(path + ("period",), f"must be one of {', '.join(BUDGET_PERIODS)}, got {_describe(period)}")
        ident = _string(p, path + ("id",), entry["id"]) if "id" in entry else None
        amount = _decimal(p, path + ("amount",), entry["amount"], _BUDGET) if "amount" in entry else None
        if amount is not None and amount <= 0:
            p.add(path + ("amount",), "must be more than 0")
        thresholds = _thresholds(p, path + ("thresholds",), entry["thresholds"]) if "thresholds" in entry \
            else default
        if len(p.items) > before or ident is None or amount is None:
            continue
        budget = Budget(str(scope), ident, str(period), amount, thresholds)
        if budget.key in seen:
            p.add(path, f"duplicate budget {budget.key} (also budgets[{seen[budget.key]}])")
            continue
        seen[budget.key] = i
        out.append(budget)
    return BudgetSet(version, effective_at, tuple(out))


def _thresholds(p: _Problems, path: Path_, value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or not all(type(t) is int and 1 <= t <= 1000 for t in value) or len(set(value)) != len(value)):
        p.add(path, f"must be a list of distinct whole percentages between 1 and 1000, got {_describe(value)}")
        return DEFAULT_THRESHOLDS
    return tuple(sorted(value))


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """What a routing policy says for one scope (default, a customer tier, a feature); None = not said here.

    reasoning: "allow" or "deny" a reasoning model; max_reasoning_tokens: the reasoning a request may reserve and
    use; fallback_model: (provider, model) to route to instead of a denied or unaffordable one; on_breach:
    "fallback" (to fallback_model) or "deny" when the budget cannot hold the request; max_reasoning_tokens_per_session
    and _per_day: the reasoning tokens a session (the request's session id) and a feature in a UTC day may use, past
    which a reasoning model is routed to the fallback (or denied).
    """

    reasoning: str | None = None
    max_reasoning_tokens: int | None = None
    fallback_model: tuple[str, str] | None = None
    on_breach: str | None = None
    max_reasoning_tokens_per_session: int | None = None
    max_reasoning_tokens_per_day: int | None = None

    def over(self, base: PolicyRule) -> PolicyRule:
        """Return this rule with `base` filling what it does not say."""
        return PolicyRule(*(mine if mine is not None else theirs  # type: ignore[arg-type]
                            for mine, theirs in zip(_rule_values(self), _rule_values(base), strict=True)))


@dataclass(frozen=True)
class RoutingPolicy:
    """One effective-dated version of the gateways' routing policy (`kind: routing_policy`; docs/admission.md).

    YAML::

        kind: routing_policy
        version: "2026-12-01"
        effective_at: "2026-12-01T00:00:00Z"
        reasoning_models: [openai/o3, openai/o4-mini]   # provider/model names that reason
        stream_ceiling: "2"          # a stream may run to this multiple of its reservation, then it is cut
        stale_state_s: 60            # budget state older than this is stale ...
        on_stale_state: open         # ... and then admits (open, reason stale_state) or denies (closed)
        on_unpriced: admit           # a model no card prices: admit (reserve 0) or deny
        default: {reasoning: allow, max_reasoning_tokens: 16000, on_breach: deny}
        # a rule may also cap reasoning per session and per feature and UTC day (tokens), past which a reasoning
        # model is routed to the fallback (on_breach: fallback) or denied (reason reasoning_ceiling):
        #   {max_reasoning_tokens_per_session: 50000, max_reasoning_tokens_per_day: 20000000}
        tiers:                       # customer tiers (the request's tier tag)
          free: {reasoning: deny, fallback_model: openai/gpt-4.1-mini, on_breach: fallback}
        features:                    # a feature's rule wins over its tier's, which wins over the default
          summarize_email_v2: {reasoning: deny, fallback_model: openai/gpt-4.1-mini}
    """

    version: str
    effective_at: datetime
    reasoning_models: frozenset[tuple[str, str]]
    stream_ceiling: Decimal
    stale_state_s: int
    on_stale_state: str
    on_unpriced: str
    default: PolicyRule
    tiers: Mapping[str, PolicyRule]
    features: Mapping[str, PolicyRule]
    _rules: dict[tuple[str, str], PolicyRule] = field(default_factory=dict, compare=False, repr=False)

    def rule(self, feature_id: str, tier: str = "") -> PolicyRule:
        """The rule for a request: its feature's, over its tier's, over the default (memoized, bounded)."""
        key = (feature_id, tier)
        found = self._rules.get(key)
        if found is not None:
            return found
        merged = self.default
        if tier in self.tiers:
            merged = self.tiers[tier].over(merged)
        if feature_id in self.features:
            merged = self.features[feature_id].over(merged)
        if len(self._rules) < _MEMO_MAX:  # feature and tier names come from gateways
            self._rules[key] = merged
        return merged


_POLICY_KEYS = ("reasoning", "max_reasoning_tokens", "fallback_model", "on_breach",
                "max_reasoning_tokens_per_session", "max_reasoning_tokens_per_day")
_TOKEN_LIMITS = ("max_reasoning_tokens", "max_reasoning_tokens_per_session", "max_reasoning_tokens_per_day")


def _rule_values(rule: PolicyRule) -> tuple[Any, ...]:
    return tuple(getattr(rule, k) for k in _POLICY_KEYS)


def _model_ref(p: _Problems, path: Path_, value: Any) -> tuple[str, str] | None:
    text = _string(p, path, value)
    if text is None:
        return None
    provider, sep, model = text.partition("/")
    if not sep or not _PROVIDER_RE.match(provider) or not _NAME_RE.match(model):
        p.add(path, f"{text!r} is not provider/model (e.g. openai/gpt-4.1-mini)")
        return None
    return provider, model


def _choice(p: _Problems, path: Path_, value: Any, allowed: tuple[str, ...]) -> str | None:
    if value not in allowed:
        p.add(path, f"must be one of {', '.join(allowed)}, got {_describe(value)}")
        return None
    return str(value)


def _policy_rule(p: _Problems, path: Path_, value: Any) -> PolicyRule:
    entry = _mapping(p, path, value, ", ".join(_POLICY_KEYS))
    if entry is None:
        return PolicyRule()
    _keys(p, path, entry, (), (*_POLICY_KEYS, "description"))
    limits: dict[str, int | None] = {}
    for key in _TOKEN_LIMITS:
        value = entry.get(key)
        if key in entry and (type(value) is not int or not 0 <= value <= 10_000_000_000):
            p.add(path + (key,), f"must be a whole number of tokens, got {_describe(value)}")
            value = None
        limits[key] = value
    return PolicyRule(
        _choice(p, path + ("reasoning",), entry["reasoning"], ("allow", "deny")) if "reasoning" in entry else None,
        limits["max_reasoning_tokens"],
        _model_ref(p, path + ("fallback_model",), entry["fallback_model"]) if "fallback_model" in entry else None,
        _choice(p, path + ("on_breach",), entry["on_breach"], ("fallback", "deny")) if "on_breach" in entry else None,
        limits["max_reasoning_tokens_per_session"], limits["max_reasoning_tokens_per_day"])


def _parse_routing_policy(p: _Problems, body: Mapping[str, Any], version: str,
                          effective_at: datetime) -> RoutingPolicy:
    _keys(p, (), body, ("kind", "version", "effective_at", "default"),
          ("description", "reasoning_models", "stream_ceiling", "stale_state_s", "on_stale_state", "on_unpriced",
           "tiers", "features"))
    models: set[tuple[str, str]] = set()
    raw_models = body.get("reasoning_models", [])
    if not isinstance(raw_models, list):
        p.add(("reasoning_models",), f"must be a list of provider/model names, got {_describe(raw_models)}")
        raw_models = []
    for i, raw in enumerate(raw_models):
        ref = _model_ref(p, ("reasoning_models", i), raw)
        if ref is not None:
            models.add(ref)
    ceiling = (_decimal(p, ("stream_ceiling",), body["stream_ceiling"], _MULTIPLIER) if "stream_ceiling" in body
               else Decimal(2))
    if ceiling is not None and ceiling < 1:
        p.add(("stream_ceiling",), "must be at least 1 (a multiple of the reservation)")
    stale = body.get("stale_state_s", 60)
    if type(stale) is not int or not 1 <= stale <= 86_400:
        p.add(("stale_state_s",), f"must be whole seconds between 1 and 86400, got {_describe(stale)}")
        stale = 60
    on_stale = _choice(p, ("on_stale_state",), body.get("on_stale_state", "open"), ("open", "closed"))
    on_unpriced = _choice(p, ("on_unpriced",), body.get("on_unpriced", "admit"), ("admit", "deny"))
    default = _policy_rule(p, ("default",), body.get("default"))
    for key in ("reasoning", "on_breach"):
        if "default" in body and getattr(default, key) is None:
            p.add(("default",), f"must say {key} (the default applies where nothing else does)")
    if default.on_breach == "fallback" and default.fallback_model is None:
        p.add(("default",), "on_breach: fallback needs a fallback_model")
    scopes: dict[str, dict[str, PolicyRule]] = {"tiers": {}, "features": {}}
    for scope, rules in scopes.items():
        raw = body.get(scope, {})
        section = _mapping(p, (scope,), raw, f"{scope[:-1]} → rule") if scope in body else {}
        for name, value in (section or {}).items():
            rules[name] = _policy_rule(p, (scope, name), value)
    return RoutingPolicy(version, effective_at, frozenset(models), ceiling or Decimal(2), stale,
                         on_stale or "open", on_unpriced or "admit", default,
                         MappingProxyType(scopes["tiers"]), MappingProxyType(scopes["features"]))


_RULE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PATTERN_MAX = 512


def _parse_model_aliases(p: _Problems, body: Mapping[str, Any], version: str,
                         effective_at: datetime) -> ModelAliases:
    _keys(p, (), body, ("kind", "version", "effective_at", "rules"), ("description",))
    rules: list[AliasRule] = []
    names: dict[str, int] = {}
    raw_rules = body.get("rules")
    if "rules" in body and not isinstance(raw_rules, list):
        p.add(("rules",), f"must be a list of alias rules, got {_describe(raw_rules)}")
        raw_rules = []
    for i, raw in enumerate(raw_rules or []):
        path: Path_ = ("rules", i)
        entry = _mapping(p, path, raw, "name, provider, pattern or equals, model")
        if entry is None:
            continue
        before = len(p.items)
        _keys(p, path, entry, ("name", "provider", "model"), ("pattern", "equals", "price_as", "description"))
        name = _string(p, path + ("name",), entry["name"], _RULE_NAME_RE) if "name" in entry else None
        if name is not None:
            if name in names:
                p.add(path + ("name",), f"duplicate rule name {name!r} (also rules[{names[name]}])")
            names[name] = i
        providers: list[str] = []
        raw_providers = entry.get("provider")
        for j, one in enumerate(raw_providers if isinstance(raw_providers, list) else [raw_providers]):
            where = path + (("provider", j) if isinstance(raw_providers, list) else ("provider",))
            got = _string(p, where, one, _PROVIDER_RE) if "provider" in entry else None
            if got is not None:
                providers.append(got)
        price_as = _string(p, path + ("price_as",), entry["price_as"], _PROVIDER_RE) if "price_as" in entry else None
        template = _string(p, path + ("model",), entry["model"]) if "model" in entry else None
        pattern: re.Pattern[str] | None = None
        equals: str | None = None
        if ("pattern" in entry) == ("equals" in entry):
            p.add(path, "needs exactly one of 'pattern' (a regular expression) and 'equals' (one name)")
        elif "equals" in entry:
            equals = _string(p, path + ("equals",), entry["equals"], _NAME_RE)
            if template is not None and not _NAME_RE.match(template):
                p.add(path + ("model",), f"{template!r} is not a model name (expected {_NAME_RE.pattern})")
        else:
            text = _string(p, path + ("pattern",), entry["pattern"])
            if text is not None and len(text) > _PATTERN_MAX:
                p.add(path + ("pattern",), f"is {len(text)} characters long; at most {_PATTERN_MAX}")
            elif text is not None:
                try:
                    pattern = re.compile(text)
                except re.error as exc:
                    p.add(path + ("pattern",), f"is not a regular expression: {exc}")
            if pattern is not None and template is not None:
                _template_fields(p, path + ("model",), template, set(pattern.groupindex))
        if len(p.items) == before and name is not None and template is not None and providers:
            rules.append(AliasRule(name, frozenset(providers), equals, pattern, template, price_as))
    return ModelAliases(version, effective_at, tuple(rules))


def _template_fields(p: _Problems, path: Path_, template: str, groups: set[str]) -> None:
    """A rule's `model` may name only the pattern's named groups, in plain braces."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        p.add(path, f"{template!r} is not a name template: {exc}")
        return
    for _literal, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in groups or spec or conversion:
            known = ", ".join(sorted(groups)) or "none"
            p.add(path, f"{{{field_name}}} is not a named group of the pattern (its groups: {known}); write "
                        "a group as {name}, without a format")
            return


_PARSERS: dict[str, Callable[[_Problems, Mapping[str, Any], str, datetime],
                             PriceCard | OwnerRegistry | BudgetSet | ModelAliases | RoutingPolicy]] = {
    KIND_PRICE_CARD: _parse_price_card,
    KIND_OWNERS: _parse_owners,
    KIND_BUDGETS: _parse_budgets,
    KIND_MODEL_ALIASES: _parse_model_aliases,
    KIND_ROUTING_POLICY: _parse_routing_policy,
}


def _parse_document(body: Any, p: _Problems) -> ReferenceDoc | None:
    """Validate one document (plain data); problems go to `p`; returns None when there are any."""
    before = len(p.items)
    if not isinstance(body, dict):
        p.add((), f"a reference document must be a mapping with kind, version and effective_at, got "
                  f"{_describe(body)}")
        return None
    kind = body.get("kind")
    if kind not in _PARSERS:
        p.add(("kind",) if "kind" in body else (),
              f"kind must be one of {', '.join(KINDS)}, got {_describe(kind)}")
        return None
    version = _string(p, ("version",), body["version"], _VERSION_RE) if "version" in body else None
    effective_at = _timestamp(p, ("effective_at",), body["effective_at"]) if "effective_at" in body else None
    parsed = _PARSERS[kind](p, body, version or "", effective_at or datetime.min.replace(tzinfo=UTC))
    if len(p.items) > before or version is None or effective_at is None:
        return None
    return ReferenceDoc(kind, version, effective_at, body, parsed)


def parse_reference_yaml(text: str, origin: str) -> list[ReferenceDoc]:
    """Validate every YAML document of one file's text; raises ReferenceDataError with every problem found.

    Problems read "origin:line: key.path: message". Nothing is constructed by PyYAML: scalars keep their text,
    so no price ever passes through a float.
    """
    problems: list[str] = []
    docs = _parse_text(text, origin, problems)
    if problems:
        raise ReferenceDataError(problems)
    return [d for d, _ in docs]


def _parse_text(text: str, origin: str, problems: list[str]) -> list[tuple[ReferenceDoc, int]]:
    out: list[tuple[ReferenceDoc, int]] = []
    try:
        nodes = list(yaml.compose_all(text, Loader=_LOADER))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problems.append(f"{origin}{line}: YAML syntax error: {exc.problem or exc}")
        return out
    except yaml.YAMLError as exc:
        problems.append(f"{origin}: YAML error: {exc}")
        return out
    for node in nodes:
        if node is None:
            continue
        lines: dict[Path_, int] = {(): node.start_mark.line + 1}
        p = _Problems(origin, lines)
        data = _to_data(node, (), lines, p)
        doc = _parse_document(data, p)
        problems.extend(p.items)
        if doc is not None and not p.items:
            out.append((doc, node.start_mark.line + 1))
    return out


def load_reference_files(paths: Sequence[Path]) -> list[ReferenceDoc]:
    """Read and validate reference YAML files (each may hold several documents = several versions).

    Contract: returns every document in file order, or raises ReferenceDataError listing ALL problems as
    "path:line: key.path: message" — unreadable files, YAML syntax, missing/unknown keys, bad decimals, naive
    timestamps, unknown teams, duplicate models, and across files duplicate (kind, version) pairs or two
    versions of one kind with the same effective_at.
    """
    problems: list[str] = []
    docs: list[ReferenceDoc] = []
    seen: dict[tuple[str, str], str] = {}
    starts: dict[tuple[str, datetime], str] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            continue
        for doc, line in _parse_text(text, str(path), problems):
            where = f"{path}:{line}"
            first = seen.get((doc.kind, doc.version))
            if first is not None:
                problems.append(f"{where}: {doc.kind} version {doc.version!r} is defined twice "
                                f"(also {first})")
                continue
            twin = starts.get((doc.kind, doc.effective_at))
            if twin is not None:
                problems.append(f"{where}: {doc.kind} version {doc.version!r} has the same effective_at as "
                                f"{twin}; which one applies would be ambiguous")
                continue
            seen[(doc.kind, doc.version)] = where
            starts[(doc.kind, doc.effective_at)] = f"version {doc.version!r} at {where}"
            docs.append(doc)
    if problems:
        raise ReferenceDataError(problems)
    return docs


_NEVER = datetime.min.replace(tzinfo=UTC)
_FOREVER = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Timeline(Generic[T]):
    """Versions of one kind sorted by (effective_at, version); lookups by time are O(log n)."""

    starts: tuple[datetime, ...] = ()
    items: tuple[T, ...] = ()

    def at(self, ts: datetime) -> T | None:
        """Return the latest version with effective_at ≤ ts, or None when ts is before every version."""
        i = bisect_right(self.starts, ts)
        return self.items[i - 1] if i else None

    def span_at(self, ts: datetime) -> tuple[T | None, datetime, datetime]:
        """Return (version at ts, from, until): the same answer holds for every t with from ≤ t < until."""
        i = bisect_right(self.starts, ts)
        lo = self.starts[i - 1] if i else _NEVER
        hi = self.starts[i] if i < len(self.starts) else _FOREVER
        return (self.items[i - 1] if i else None), lo, hi


class VersionInfo(NamedTuple):
    """One loaded version, for status displays."""

    kind: str
    version: str
    effective_at: datetime


@dataclass(frozen=True)
class ReferenceSnapshot:
    """An immutable view of all reference data at one moment; use one for a whole batch."""

    price_cards: Timeline[PriceCard] = field(default_factory=Timeline)  # each bound to the alias table in effect
    owners: Timeline[OwnerRegistry] = field(default_factory=Timeline)
    budgets: Timeline[BudgetSet] = field(default_factory=Timeline)
    model_aliases: Timeline[ModelAliases] = field(default_factory=Timeline)
    routing_policies: Timeline[RoutingPolicy] = field(default_factory=Timeline)

    def routing_policy_at(self, ts: datetime) -> RoutingPolicy | None:
        """Return the routing policy in effect at ts (latest effective_at ≤ ts), or None."""
        return self.routing_policies.at(ts)

    def budgets_at(self, ts: datetime) -> BudgetSet | None:
        """Return the budgets in effect at ts (latest effective_at ≤ ts), or None."""
        return self.budgets.at(ts)

    def price_card_at(self, ts: datetime) -> PriceCard | None:
        """Return the price card in effect at ts (latest effective_at ≤ ts), or None."""
        return self.price_cards.at(ts)

    def owners_at(self, ts: datetime) -> OwnerRegistry | None:
        """Return the owners registry in effect at ts (latest effective_at ≤ ts), or None."""
        return self.owners.at(ts)

    def versions(self) -> list[VersionInfo]:
        """Return every loaded version, by kind then effective_at."""
        cards = dict.fromkeys(VersionInfo(KIND_PRICE_CARD, c.version, c.effective_at) for c in self.price_cards.items)
        out = list(cards)  # a card spans several items when an alias table changes during it
        out += [VersionInfo(KIND_OWNERS, o.version, o.effective_at) for o in self.owners.items]
        out += [VersionInfo(KIND_BUDGETS, b.version, b.effective_at) for b in self.budgets.items]
        out += [VersionInfo(KIND_MODEL_ALIASES, a.version, a.effective_at) for a in self.model_aliases.items]
        out += [VersionInfo(KIND_ROUTING_POLICY, r.version, r.effective_at) for r in self.routing_policies.items]
        return out


def _timeline(items: Iterable[T], start: Callable[[T], datetime], version: Callable[[T], str]) -> Timeline[T]:
    ordered = sorted(items, key=lambda x: (start(x), version(x)))
    return Timeline(tuple(start(x) for x in ordered), tuple(ordered))


def _bind(cards: Timeline[PriceCard], aliases: Timeline[ModelAliases]) -> Timeline[PriceCard]:
    """The cards' timeline with each card bound to the alias table in effect: a new item wherever either changes."""
    if not aliases.items or not cards.items:
        return cards
    first = cards.starts[0]
    starts = sorted({*cards.starts, *(s for s in aliases.starts if s > first)})
    bound: dict[tuple[int, int], PriceCard] = {}
    items: list[PriceCard] = []
    for start in starts:
        card, table = cards.at(start), aliases.at(start)
        assert card is not None
        key = (id(card), id(table))
        if key not in bound:
            bound[key] = card.with_aliases(table)
        items.append(bound[key])
    return Timeline(tuple(starts), tuple(items))


def snapshot_of(docs: Iterable[ReferenceDoc]) -> ReferenceSnapshot:
    """Return a snapshot holding exactly these documents (a later one with the same kind:version wins)."""
    store = ReferenceStore()
    for doc in docs:
        store.apply(doc)
    return store.snapshot()


class ReferenceStore:
    """The worker's reference data, fed from the compacted topics; readers take immutable snapshots.

    Contract: apply/remove build a new ReferenceSnapshot and swap it in with one assignment, so a reader
    holding a snapshot (a batch in progress) never sees a half-applied change. Versions with equal
    effective_at are ordered by version string (the loader refuses such pairs; a foreign producer might not).
    One writer at a time.
    """

    def __init__(self) -> None:
        self._docs: dict[tuple[str, str], ReferenceDoc] = {}
        self._snapshot = ReferenceSnapshot()

    def apply(self, doc: ReferenceDoc) -> None:
        """Add a version, or replace the version with the same kind and version string."""
        self._docs[(doc.kind, doc.version)] = doc
        self._rebuild()

    def remove(self, kind: str, version: str) -> bool:
        """Drop a version (a compacted-topic tombstone); returns whether it was present."""
        found = self._docs.pop((kind, version), None) is not None
        if found:
            self._rebuild()
        return found

    def snapshot(self) -> ReferenceSnapshot:
        """Return the current immutable view."""
        return self._snapshot

    def price_card_at(self, ts: datetime) -> PriceCard | None:
        """Return the price card in effect at ts in the current snapshot."""
        return self._snapshot.price_card_at(ts)

    def owners_at(self, ts: datetime) -> OwnerRegistry | None:
        """Return the owners registry in effect at ts in the current snapshot."""
        return self._snapshot.owners_at(ts)

    def versions(self) -> list[VersionInfo]:
        """Return every loaded version, by kind then effective_at."""
        return self._snapshot.versions()

    def describe(self) -> str:
        """Return one line for logs: the loaded versions per kind."""
        by_kind: dict[str, list[str]] = {}
        for info in self.versions():
            by_kind.setdefault(info.kind, []).append(info.version)
        if not by_kind:
            return "no reference data"
        return "; ".join(f"{kind}: {', '.join(vs)}" for kind, vs in by_kind.items())

    def _rebuild(self) -> None:
        cards = [d.parsed for d in self._docs.values() if isinstance(d.parsed, PriceCard)]
        owners = [d.parsed for d in self._docs.values() if isinstance(d.parsed, OwnerRegistry)]
        budgets = [d.parsed for d in self._docs.values() if isinstance(d.parsed, BudgetSet)]
        aliases = [d.parsed for d in self._docs.values() if isinstance(d.parsed, ModelAliases)]
        policies = [d.parsed for d in self._docs.values() if isinstance(d.parsed, RoutingPolicy)]
        alias_timeline = _timeline(aliases, lambda a: a.effective_at, lambda a: a.version)
        self._snapshot = ReferenceSnapshot(
            _bind(_timeline(cards, lambda c: c.effective_at, lambda c: c.version), alias_timeline),
            _timeline(owners, lambda o: o.effective_at, lambda o: o.version),
            _timeline(budgets, lambda b: b.effective_at, lambda b: b.version),
            alias_timeline,
            _timeline(policies, lambda r: r.effective_at, lambda r: r.version),
        )
