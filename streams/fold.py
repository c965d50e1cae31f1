"""Fold stage: priced attempts → logical requests (retries, fallbacks, terminated streams, retry waste).

One state machine and pure functions, no Kafka. Its Faust agent (streams.roles.process) owns the durable state
(a Faust table: one entry per open or recently emitted logical request) and hands this module plain mappings.

Vocabulary
- A *fact* is the part of a priced attempt that the fold needs (event_id, request_id, order, status, models, tokens,
  exact costs, owner). Facts are compact dicts whose costs are decimal strings; they are what the state stores and
  what a logical-request row carries in `attempts_detail`, so a row can always be recomputed from its facts.
- `summarize(facts)` is the one definition of a logical request. The fold, the sink's merge and the tests all use it.
- A logical request is *emitted* when a final attempt arrives, when an ok attempt has settled (no further attempt
  within `settle` of event time), or when it has been inactive for `inactivity` (final_status = abandoned).
  An attempt that arrives for an emitted request re-emits it with the next revision.

Event time: each input partition has a clock, the largest event timestamp seen on it, capped at the injected wall
clock plus `future_tolerance_ms` (on every batch and when the clock is rebuilt from the durable state), so no single
event can carry it into the future. When a partition is caught up (nothing left to read) and receives no input for
`idle` seconds of wall time after its last batch finished, its clock runs on with wall time, so the last requests of a
quiet partition are still emitted; a backlog or a slow batch never moves it.
"""

from __future__ import annotations

import heapq
import json
import zlib
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from streams.positions import is_meta_key
from streams.records import TOKEN_CLASSES
from tally.partitioning import partition_for

CLASS_COSTS: tuple[str, ...] = (
    "cost_input_usd", "cost_output_usd", "cost_reasoning_usd", "cost_cache_read_usd", "cost_cache_write_usd",
    "cost_tools_usd",
)
OWNER_COLUMNS: tuple[str, ...] = (
    "tenant_id", "team_id", "feature_id", "product", "endpoint", "environment", "cost_center", "business_unit",
    "deploy_version", "ownership_version", "attribution_status",
)
_FACT_FIELDS: tuple[str, ...] = (
    "event_id", "request_id", "attempt", "final", "status", "error", "usage_reported",
    "stream_terminated_at_token_n", "provider", "model_requested", "model_actual", "fallback_from",
    "pricing_status", "price_card_version", *TOKEN_CLASSES, *OWNER_COLUMNS,
)
# The logical_requests columns (schemas/migrations/004), in order.
REQUEST_COLUMNS: tuple[str, ...] = (
    "logical_request_id", "revision", "sign", "first_ts", "last_ts", "emitted_at", "closed_by",
    "attempts", "retries", "fallbacks", "fallback_chain", "requested_model", "final_model", "final_provider",
    "final_status", "final_event_id", "terminated", "terminated_at_token_n", "usage_complete", "pricing_status",
    *TOKEN_CLASSES, *CLASS_COSTS, "cost_total_usd", "cost_final_usd", "cost_wasted_usd",
    *OWNER_COLUMNS, "price_card_versions", "attempt_event_ids", "attempts_detail",
)
REQUEST_COST_COLUMNS: tuple[str, ...] = (*CLASS_COSTS, "cost_total_usd", "cost_final_usd", "cost_wasted_usd")
REQUEST_TIME_COLUMNS: tuple[str, ...] = ("first_ts", "last_ts", "emitted_at")

# Severity order of pricing statuses: a request is as uncertain as its most uncertain attempt.
_PRICING_ORDER = {"priced": 0, "partial": 1, "estimated": 2, "unpriced": 3, "no_usage": 4}

Fact = dict[str, Any]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


_FACT_COSTS: tuple[str, ...] = (*CLASS_COSTS, "cost_total_usd")


_ATTO = 18  # facts hold costs as integer atto-dollars: exact (costs are Decimal(38, 18)), fast to sum and dump


def to_atto(cost: Decimal) -> int:
    """Exact integer atto-dollars of a cost with at most 18 decimal places (ValueError otherwise)."""
    scaled = cost.scaleb(_ATTO)
    n = int(scaled)
    if n != scaled:
        raise ValueError(f"cost {cost} has more than {_ATTO} decimal places")
    return n


def from_atto(n: int) -> Decimal:
    """Integer atto-dollars back to an exact Decimal."""
    return Decimal(n).scaleb(-_ATTO)


def fact_of(row: Mapping[str, Any]) -> Fact:
    """The fold's view of one priced attempt row (streams.records.ATTEMPT_COLUMNS)."""
    fact = {k: row[k] for k in _FACT_FIELDS}
    fact["ts_ms"] = (row["ts"] - _EPOCH) // _MS  # exact integer milliseconds, no float
    for c in _FACT_COSTS:
        fact[c] = to_atto(row[c])
    return fact


def dump_facts(facts: Any) -> bytes:
    """Facts (or a structure holding them) as compact JSON.

    Copied to an exact-size bytes object: orjson's output keeps a buffer of at least 4 KiB, which a long-lived
    state entry would otherwise hold (measured: 16 KiB per open request instead of ~1 KiB). orjson refuses an
    integer beyond 64 bits, i.e. a cost of $18.45 or more in atto-dollars: such facts are written by the standard
    library's encoder (the same JSON), and load_facts reads them back exactly.
    """
    try:
        return bytes(memoryview(orjson.dumps(facts)))
    except TypeError:
        return json.dumps(facts, separators=(",", ":"), ensure_ascii=False).encode()


def load_facts(raw: bytes | str) -> Any:
    """dump_facts' JSON back: orjson, unless a number is beyond 64 bits (orjson reads it as a float, losing digits)."""
    value = orjson.loads(raw)
    if _has_float(value):
        return json.loads(raw)
    return value


def _has_float(value: Any) -> bool:
    """Whether a cost of a fact is a float: a list of facts, or an entry ([facts, revision, …], facts packed)."""
    facts = value[0] if value and type(value[0]) is list else value
    return any(any(type(f[i]) is float for i in _COST_AT) if type(f) is list and len(f) == len(_FACT_KEYS)
               else type(f) is dict and any(type(f.get(c)) is float for c in _FACT_COSTS) for f in facts)


# The fold state holds a fact as the list of its values in this order: its keys are written here once, not in
# every entry (an open request's state 1,286 -> 665 B, its value 1,027 -> 406 B: the stage bench's fold_memory).
# A fact whose keys are not exactly these (none today) is kept as an object. Adding a fact field changes the
# length: an entry packed before it is refused by _unpack rather than read into the wrong keys.
_FACT_KEYS: tuple[str, ...] = (*_FACT_FIELDS, "ts_ms", *_FACT_COSTS)
_FACT_KEY_SET = frozenset(_FACT_KEYS)
_COST_AT: tuple[int, ...] = tuple(_FACT_KEYS.index(c) for c in _FACT_COSTS)


def _pack(fact: Fact) -> Fact | list[Any]:
    return [fact[k] for k in _FACT_KEYS] if fact.keys() == _FACT_KEY_SET else fact


def _unpack(value: Fact | list[Any]) -> Fact:
    if type(value) is not list:
        return value  # type: ignore[return-value]
    if len(value) != len(_FACT_KEYS):
        raise ValueError(f"a packed fact of {len(value)} values; this version packs {len(_FACT_KEYS)}")
    return dict(zip(_FACT_KEYS, value, strict=True))


def effective(facts: Iterable[Fact]) -> list[Fact]:
    """The facts that count, in attempt order.

    - One fact per event_id (a duplicate changes nothing).
    - One fact per physical call (request_id): a record with real usage supersedes one without (a cut stream whose
      usage arrives later); among several, the latest (timestamp, then event_id) wins.
    Order: attempt number, then timestamp, then event_id.
    """
    by_call: dict[str, Fact] = {}
    seen: set[str] = set()
    for f in facts:
        if f["event_id"] in seen:
            continue
        seen.add(f["event_id"])
        cur = by_call.get(f["request_id"])
        if cur is None or _supersedes(f, cur):
            by_call[f["request_id"]] = f
    return sorted(by_call.values(), key=lambda f: (f["attempt"], f["ts_ms"], f["event_id"]))


def call_rank(usage_reported: bool, ts_ms: int, event_id: str) -> tuple[bool, int, str]:
    """The row of a physical call that counts is the one of highest rank: real usage, then latest ts, then event_id.

    The sink ranks the rows of a call the same way (streams.supersede), so aggregates agree with the fold.
    """
    return bool(usage_reported), ts_ms, event_id


def _supersedes(new: Fact, old: Fact) -> bool:
    return (call_rank(new["usage_reported"], new["ts_ms"], new["event_id"])
            > call_rank(old["usage_reported"], old["ts_ms"], old["event_id"]))


def _answer(ordered: Sequence[Fact]) -> tuple[Fact, str, str]:
    """(the attempt whose outcome is the request's, final_status, closed_by)."""
    finals = [f for f in ordered if f["final"]]
    if finals:
        last = finals[-1]
        return last, last["status"], "final"
    oks = [f for f in ordered if f["status"] == "ok"]
    if oks:
        return oks[-1], "ok", "settled"
    return ordered[-1], "abandoned", "inactive"


def _ts(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def summarize(logical_id: str, facts: Sequence[Fact], revision: int, emitted_at: datetime,
              sign: int = 1) -> dict[str, Any]:
    """The logical_requests row for these facts: a pure function of the facts (plus revision, sign, emitted_at).

    cost_wasted_usd = cost of every attempt except the one whose outcome is the request's (the final attempt, else
    the last ok one, else for an abandoned request the last one), so waste + cost_final_usd = cost_total_usd exactly.
    """
    if len(facts) == 1:
        return _summarize_one(logical_id, facts[0], revision, emitted_at, sign)
    return _summarize_many(logical_id, facts, revision, emitted_at, sign)


def _summarize_many(logical_id: str, facts: Sequence[Fact], revision: int, emitted_at: datetime,
                    sign: int) -> dict[str, Any]:
    ordered = effective(facts)
    if not ordered:
        raise ValueError(f"logical request {logical_id} has no attempts")
    answer, final_status, closed_by = _answer(ordered)
    first = ordered[0]
    chain = [first["model_requested"] or first["model_actual"]]
    fallbacks = 0
    prev_model = None
    for f in ordered:
        if prev_model is not None and (f["fallback_from"] or f["model_actual"] != prev_model):
            fallbacks += 1
        prev_model = f["model_actual"]
        if f["fallback_from"] and chain[-1] != f["fallback_from"]:
            chain.append(f["fallback_from"])
        if chain[-1] != f["model_actual"]:
            chain.append(f["model_actual"])
    if len(ordered) == 1:  # the common case: no sums
        costs = {c: from_atto(first[c]) for c in _FACT_COSTS}
        tokens = {c: first[c] for c in TOKEN_CLASSES}
    else:
        costs = {c: from_atto(sum(f[c] for f in ordered)) for c in _FACT_COSTS}
        tokens = {c: sum(f[c] for f in ordered) for c in TOKEN_CLASSES}
    cost_final = from_atto(answer["cost_total_usd"])
    cut = [f for f in ordered if f["status"] == "terminated"]
    row: dict[str, Any] = {
        "logical_request_id": logical_id,
        "revision": revision,
        "sign": sign,
        "first_ts": _ts(min(f["ts_ms"] for f in ordered)),
        "last_ts": _ts(max(f["ts_ms"] for f in ordered)),
        "emitted_at": emitted_at,
        "closed_by": closed_by,
        "attempts": len(ordered),
        "retries": len(ordered) - 1 - fallbacks,
        "fallbacks": fallbacks,
        "fallback_chain": chain,
        "requested_model": chain[0],
        "final_model": answer["model_actual"],
        "final_provider": answer["provider"],
        "final_status": final_status,
        "final_event_id": answer["event_id"],
        "terminated": bool(cut),
        "terminated_at_token_n": cut[-1]["stream_terminated_at_token_n"] if cut else None,
        "usage_complete": all(f["usage_reported"] for f in ordered),
        "pricing_status": max((f["pricing_status"] for f in ordered), key=lambda s: _PRICING_ORDER.get(s, 5)),
    }
    row.update(tokens)
    row.update(costs)
    row["cost_final_usd"] = cost_final
    row["cost_wasted_usd"] = costs["cost_total_usd"] - cost_final
    for c in OWNER_COLUMNS:
        row[c] = answer[c]
    row["price_card_versions"] = sorted({f["price_card_version"] for f in ordered if f["price_card_version"]})
    row["attempt_event_ids"] = sorted({f["event_id"] for f in facts})
    row["attempts_detail"] = dump_facts(sorted(facts, key=lambda f: f["event_id"])).decode()
    return row


def _summarize_one(logical_id: str, f: Fact, revision: int, emitted_at: datetime, sign: int) -> dict[str, Any]:
    """summarize() of a single attempt (most requests), without the sums, sorts and loops over attempts."""
    if f["final"]:
        final_status, closed_by = f["status"], "final"
    elif f["status"] == "ok":
        final_status, closed_by = "ok", "settled"
    else:
        final_status, closed_by = "abandoned", "inactive"
    chain = [f["model_requested"] or f["model_actual"]]
    if f["fallback_from"] and chain[-1] != f["fallback_from"]:
        chain.append(f["fallback_from"])
    if chain[-1] != f["model_actual"]:
        chain.append(f["model_actual"])
    at = _ts(f["ts_ms"])
    cut = f["status"] == "terminated"
    total = from_atto(f["cost_total_usd"])
    row: dict[str, Any] = {
        "logical_request_id": logical_id, "revision": revision, "sign": sign, "first_ts": at, "last_ts": at,
        "emitted_at": emitted_at, "closed_by": closed_by, "attempts": 1, "retries": 0, "fallbacks": 0,
        "fallback_chain": chain, "requested_model": chain[0], "final_model": f["model_actual"],
        "final_provider": f["provider"], "final_status": final_status, "final_event_id": f["event_id"],
        "terminated": cut, "terminated_at_token_n": f["stream_terminated_at_token_n"] if cut else None,
        "usage_complete": bool(f["usage_reported"]), "pricing_status": f["pricing_status"],
    }
    for c in TOKEN_CLASSES:
        row[c] = f[c]
    for c in CLASS_COSTS:
        row[c] = from_atto(f[c])
    row["cost_total_usd"] = total
    row["cost_final_usd"] = total
    row["cost_wasted_usd"] = total - total
    for c in OWNER_COLUMNS:
        row[c] = f[c]
    row["price_card_versions"] = [f["price_card_version"]] if f["price_card_version"] else []
    row["attempt_event_ids"] = [f["event_id"]]
    row["attempts_detail"] = dump_facts([f]).decode()
    return row


def facts_of_detail(detail: str) -> list[Fact]:
    """The facts a logical_requests row was computed from (its attempts_detail column)."""
    facts: list[Fact] = load_facts(detail)
    return facts


# --- state -------------------------------------------------------------------------------------------------------

OPEN = 0      # attempts seen, not emitted yet (or emitted and changed since: re-emitted at the next decision)
EMITTED = 1   # emitted; kept for the grace period so a late attempt still finds it


# A state entry is its JSON deflated against a preset dictionary of the format's own constant pieces (statuses,
# pricing and attribution statuses, providers, the shape of a packed fact): an open request's value 407 -> 198 B,
# so a worker holding 1,000,000 open requests keeps ~200 MiB less (`python -m tests.bench.state_memory`), and the
# fold-state changelog carries half the bytes. The dictionary holds no deployment's data. It is part of the stored
# format: an entry names its dictionary in its first byte (JSON never starts with one), so a later version that
# changes it adds a byte and keeps reading this one; entries written as plain JSON before are read as they are.
_ZDICT_V1 = (
    b'"attributed","unattributed","default_owner","partial","estimated","unpriced","no_usage",'
    b'"anthropic","google","azure","bedrock","mistral","openai",'
    b'"error","timeout","rate_limited","server_error","cancelled","prod","staging","dev",'
    b',0,0,0,0,0,0,0]],0,0,0,17000000000000,0,0,0,0,0,0,"'
    b',true,null,"openai","gpt-4.1","gpt-4.1","","priced","2026-'
    b',false,"ok","",true,null,"[[["'
)
_ZDICTS = {1: _ZDICT_V1}
_WBITS = -11  # raw deflate, a 2 KiB window: the dictionary and an entry of a few facts fit; smaller state to set up


def compress_entry(raw: bytes) -> bytes:
    """A state entry's JSON as stored: byte 1, then raw deflate against _ZDICT_V1."""
    co = zlib.compressobj(1, zlib.DEFLATED, _WBITS, 4, zlib.Z_DEFAULT_STRATEGY, _ZDICT_V1)
    return b"\x01" + co.compress(raw) + co.flush()


def expand_entry(stored: bytes) -> bytes:
    """compress_entry's output (or an entry stored as plain JSON) back to its JSON."""
    if not stored or stored[0] > 0x08:  # JSON ("[" first); bytes 1-8 name a dictionary
        return stored
    zdict = _ZDICTS.get(stored[0])
    if zdict is None:
        raise ValueError(f"a fold-state entry in format {stored[0]}; this version reads 1 and plain JSON")
    do = zlib.decompressobj(_WBITS, zdict)
    return do.decompress(stored[1:]) + do.flush()


@dataclass(slots=True)
class Entry:
    """The durable state of one logical request (a Faust table value, serialized with `dump`)."""

    facts: list[Fact]
    revision: int = 0          # revisions emitted so far
    emitted_ids: int = 0       # how many distinct event_ids the last emission held
    phase: int = OPEN
    due_ms: int = 0            # event time of the next decision (settle / inactivity / expiry)

    def dump(self) -> bytes:
        """[facts packed (_pack), revision, emitted_ids, phase, due_ms] as JSON, deflated (`compress_entry`)."""
        return compress_entry(dump_facts([[_pack(f) for f in self.facts], self.revision, self.emitted_ids,
                                          self.phase, self.due_ms]))

    @classmethod
    def load(cls, raw: bytes) -> Entry:
        """An entry as dump wrote it, or as earlier versions did (plain JSON; facts as objects before packing)."""
        facts, revision, emitted_ids, phase, due_ms = load_facts(expand_entry(raw))
        return cls([_unpack(f) for f in facts], revision, emitted_ids, phase, due_ms)

    def event_ids(self) -> set[str]:
        return {f["event_id"] for f in self.facts}


@dataclass(frozen=True)
class FoldConfig:
    """Event-time durations in milliseconds, and the wall-clock idle threshold in seconds."""

    settle_ms: int = 30_000
    inactivity_ms: int = 600_000
    grace_ms: int = 120_000
    idle_s: float = 5.0
    # An event timestamp moves its partition's clock at most this far past the wall clock: one event stamped a day
    # ahead (a skewed gateway clock) must not settle or abandon every open request on its partition.
    future_tolerance_ms: int = 300_000


@dataclass
class FoldResult:
    """What one fold step produced: logical-request rows to publish and state writes (None = delete).

    With `fold(..., singles=True)`, a request that is one final attempt met for the first time (most requests) is
    not summarized here: `singles` holds its row's index in the fold's input, and streams.fold_columns builds its
    logical-request row from the attempts' columns, as summarize() would. `order` is every emission in order: -1
    for the next row of `emitted`, else the index of a single.
    """

    emitted: list[dict[str, Any]] = field(default_factory=list)
    writes: dict[bytes, bytes | None] = field(default_factory=dict)
    singles: list[int] = field(default_factory=list)
    order: list[int] = field(default_factory=list)

    def emit(self, row: dict[str, Any]) -> None:
        self.emitted.append(row)
        self.order.append(-1)

    @property
    def count(self) -> int:
        """How many logical-request rows this step emitted, singles included."""
        return len(self.order)


@dataclass
class _Clock:
    event_ms: int = 0          # largest event timestamp seen on the partition
    input_wall: float = 0.0    # wall time of the last input
    now_ms: int = 0            # the clock decisions use: event time, advanced by wall time while idle


class Folder:
    """Folds priced attempts into logical requests, one input partition at a time.

    `state` is the durable store (the Faust table: key = logical id as bytes, value = Entry.dump()); the folder
    reads it and returns writes; the caller applies them after it has published the emitted rows. The folder keeps
    only derived, rebuildable data of its own: per-partition clocks and a heap of decision times.
    """

    def __init__(self, config: FoldConfig, partitions: int) -> None:
        self.config = config
        self.partitions = partitions
        self.clocks: dict[int, _Clock] = {}
        self.heaps: dict[int, list[tuple[int, bytes]]] = {}

    # -- index ---------------------------------------------------------------------------------------------------

    def forget(self) -> None:
        """Drop derived data (after a rebalance); it is rebuilt from the state on the next step per partition."""
        self.clocks.clear()
        self.heaps.clear()

    def _index(self, partition: int, state: Mapping[bytes, bytes], wall: float) -> list[tuple[int, bytes]]:
        heap = self.heaps.get(partition)
        if heap is not None:
            return heap
        heap = []
        clock = _Clock(input_wall=wall)
        horizon = self._horizon(wall)
        for key, raw in list(state.items()):
            if raw is None or is_meta_key(key) or partition_for(key.decode(), self.partitions) != partition:
                continue
            entry = Entry.load(raw)
            heap.append((entry.due_ms, key))
            clock.event_ms = max(clock.event_ms, min(horizon, max(f["ts_ms"] for f in entry.facts)))
        heapq.heapify(heap)
        clock.now_ms = clock.event_ms
        self.heaps[partition] = heap
        self.clocks[partition] = clock
        return heap

    def _horizon(self, wall: float) -> int:
        """The furthest an event timestamp may move a clock: the wall clock plus the tolerance (epoch ms)."""
        return int(wall * 1000) + self.config.future_tolerance_ms

    # -- steps ---------------------------------------------------------------------------------------------------

    def fold(self, rows: Sequence[Mapping[str, Any]], state: Mapping[bytes, bytes], wall: float,
             emitted_at: datetime, singles: bool = False) -> FoldResult:
        """Fold a batch of priced attempt rows (any partitions, in arrival order).

        `singles`: leave the requests that are one final attempt met for the first time to the caller (FoldResult).
        """
        out = FoldResult()
        by_partition: dict[int, dict[str, list[int]]] = {}
        for i, row in enumerate(rows):
            by_partition.setdefault(row["source_partition"], {}).setdefault(row["logical_request_id"], []).append(i)
        for partition, groups in by_partition.items():
            heap = self._index(partition, state, wall)
            clock = self.clocks[partition]
            horizon = self._horizon(wall)
            for at in groups.values():
                clock.event_ms = max(clock.event_ms, min(horizon, max((rows[i]["ts"] - _EPOCH) // _MS for i in at)))
            clock.input_wall = wall
            clock.now_ms = max(clock.now_ms, clock.event_ms)
            for lid, at in groups.items():
                if singles and len(at) == 1 and rows[at[0]]["final"] and self._raw(lid.encode(), state, out) is None:
                    out.singles.append(at[0])  # what _add does for it, as columns: streams.fold_columns
                    out.order.append(at[0])
                    continue
                self._add(lid, [fact_of(rows[i]) for i in at], state, heap, clock.now_ms, out, emitted_at)
            self._sweep(heap, clock.now_ms, state, out, emitted_at)
        return out

    def finished(self, partitions: Iterable[int], wall: float) -> None:
        """A batch of these partitions is done at `wall`: their silence is measured from here, not its start."""
        for partition in partitions:
            clock = self.clocks.get(partition)
            if clock is not None:
                clock.input_wall = max(clock.input_wall, wall)

    def tick(self, partitions: Iterable[int], state: Mapping[bytes, bytes], wall: float,
             emitted_at: datetime) -> FoldResult:
        """Advance the clocks of silent partitions with wall time and make the decisions that fall due.

        The caller passes only partitions that are caught up (nothing left to read) and silent; a partition behind
        its input (a backlog, a replay, a slow batch) never has its clock moved by wall time.
        """
        out = FoldResult()
        for partition in partitions:
            heap = self._index(partition, state, wall)
            clock = self.clocks[partition]
            idle = wall - clock.input_wall - self.config.idle_s
            if idle > 0:
                clock.now_ms = max(clock.now_ms, clock.event_ms + int(idle * 1000))
            self._sweep(heap, clock.now_ms, state, out, emitted_at)
        return out

    def _get(self, key: bytes, state: Mapping[bytes, bytes], out: FoldResult) -> Entry | None:
        raw = self._raw(key, state, out)
        return Entry.load(raw) if raw is not None else None

    @staticmethod
    def _raw(key: bytes, state: Mapping[bytes, bytes], out: FoldResult) -> bytes | None:
        return out.writes[key] if key in out.writes else state.get(key)

    def _add(self, lid: str, facts: list[Fact], state: Mapping[bytes, bytes], heap: list[tuple[int, bytes]],
             now_ms: int, out: FoldResult, emitted_at: datetime) -> None:
        key = lid.encode()
        entry = self._get(key, state, out)
        if entry is None:
            if len(facts) == 1 and facts[0]["final"]:
                # The common case: one attempt, marked final. Emitted at once; no state is written.
                out.emit(summarize(lid, facts, 1, emitted_at))
                return
            entry = Entry([])
        known = entry.event_ids()
        before = len(known)
        for f in facts:
            if f["event_id"] not in known:
                known.add(f["event_id"])
                entry.facts.append(f)
        if len(known) == before:
            return  # duplicates change nothing
        if any(f["final"] for f in entry.facts) or entry.phase == EMITTED:
            self._emit(lid, entry, now_ms, out, emitted_at)
        else:
            entry.due_ms = self._decision_time(entry)
        self._store(key, entry, heap, now_ms, out)

    def _decision_time(self, entry: Entry) -> int:
        last = max(f["ts_ms"] for f in entry.facts)
        if any(f["status"] == "ok" for f in entry.facts):
            return last + self.config.settle_ms
        return last + self.config.inactivity_ms

    def _emit(self, lid: str, entry: Entry, now_ms: int, out: FoldResult, emitted_at: datetime) -> None:
        if len(entry.facts) > entry.emitted_ids:
            entry.revision += 1
            entry.emitted_ids = len(entry.facts)
            out.emit(summarize(lid, entry.facts, entry.revision, emitted_at))
        entry.phase = EMITTED
        entry.due_ms = max(now_ms, *(f["ts_ms"] for f in entry.facts)) + self.config.grace_ms

    def _store(self, key: bytes, entry: Entry, heap: list[tuple[int, bytes]], now_ms: int, out: FoldResult) -> None:
        if entry.phase == EMITTED and entry.due_ms <= now_ms:
            out.writes[key] = None
            return
        out.writes[key] = entry.dump()
        heapq.heappush(heap, (entry.due_ms, key))

    def _sweep(self, heap: list[tuple[int, bytes]], now_ms: int, state: Mapping[bytes, bytes], out: FoldResult,
               emitted_at: datetime) -> None:
        while heap and heap[0][0] <= now_ms:
            due, key = heapq.heappop(heap)
            entry = self._get(key, state, out)
            if entry is None or entry.due_ms != due:
                continue  # superseded heap entry
            if entry.phase == EMITTED:
                out.writes[key] = None  # grace period over
                continue
            self._emit(key.decode(), entry, now_ms, out, emitted_at)
            self._store(key, entry, heap, now_ms, out)


def apply_writes(state: MutableMapping[bytes, bytes], writes: Mapping[bytes, bytes | None]) -> None:
    """Apply a FoldResult's writes to a plain mapping (tests, benchmarks; the worker writes its Faust table)."""
    for key, value in writes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
