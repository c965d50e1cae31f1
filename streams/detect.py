"""Detect: per-feature online anomaly detectors over logical requests, in event time (river statistics)."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import pickle
import statistics
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from river import stats

from streams.watermarks import decode_watermarks, encode_watermarks, low_watermark

log = logging.getLogger(__name__)

# The sums a window keeps, in total and per dimension value: every signal is a ratio or a rate of two of them.
REQUESTS, COST, INPUT, OUTPUT, REASONING, RETRIES, FALLBACKS = range(7)
_WIDTH = 7
DIMENSIONS: tuple[str, ...] = ("model", "tenant", "endpoint", "deploy_version")
_MODEL, _DEPLOY = DIMENSIONS.index("model"), DIMENSIONS.index("deploy_version")
_DIM_FIELD = {"model": "final_model", "tenant": "tenant_id", "endpoint": "endpoint", "deploy_version": "deploy_version"}
# The logical_requests columns the detectors read (Detector.observe, request_vector); the detect role decodes only
# these from an Arrow requests message (tests/unit/test_detect.py feeds rows that hold nothing else).
DETECT_COLUMNS: tuple[str, ...] = (
    "logical_request_id", "revision", "sign", "feature_id", "last_ts", "team_id", *_DIM_FIELD.values(),
    "cost_total_usd", "input_tokens", "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens",
    "output_tokens", "reasoning_tokens", "retries", "fallbacks",
)
_MAX_DIM_VALUES = 64  # per feature and dimension; the quietest value is forgotten beyond this
_MAX_COSTS = 2000
_ALONE = 0.9  # a model serving this share of a feature's requests needs no feature × model detectors of its own
_DOMINANT = 0.2  # a dimension value explains an excess when it carries this much more of it than of the traffic
_SLOTS = 24
_MIN_SEASON = 0.05  # daily seasonality: one profile factor per hour of the day (UTC)
STATE_VERSION = 2  # 2: zlib-compressed pickle (1: plain pickle, before buckets; still loads)
# A snapshot is one message on the detect-state changelog: it must stay well under the producer's request size.
MAX_SNAPSHOT_BYTES = 2 * 1024 * 1024

Kind = Literal["ratio", "rate", "mix", "tenant"]
# One window's (or one request's) sums: doubles in a C array, 136 B where a list of seven floats takes 288 B (a
# feature holds dozens: the window's totals per dimension value, the learned rates, its pending requests).
# Snapshots written before hold lists, which read and compute the same.
Vector = array  # array('d') of _WIDTH doubles


@dataclass(frozen=True)
class SignalSpec:
    """One signal: how it is computed from a window's sums and how far it must rise to be anomalous.

    `min_rise` is relative (0.5 = +50 % over the baseline), `abs_rise` absolute, in the signal's unit; both must be
    exceeded, and the z-score must reach the config's z_fire. Only rises are anomalies: cost signals page upwards.
    """

    name: str
    label: str
    unit: Literal["usd", "usd_per_min", "ratio", "share", "per_min", "tokens"]
    kind: Kind
    num: int
    den: int | None
    min_rise: float
    abs_rise: float
    # Judged on the odds of a share (num / den with den the share's complement) and shown as the share
    # num / (num + den): a share near its ceiling moves little however far its cause moves (reasoning tokens ×5 on a
    # 60 % share is 93 %), its odds move with the cause (1.5 → 13).
    odds: bool = False


SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("cost_per_request", "median cost per request", "usd", "ratio", COST, REQUESTS, 0.5, 0.0),
    # A prompt regression (a template or retrieval change that grows every prompt) shows first in what each request
    # sends; a median, so one huge one-off request moves nothing.
    SignalSpec("input_per_request", "median input tokens per request", "tokens", "ratio", INPUT, REQUESTS, 0.5, 200.0),
    SignalSpec("spend_rate", "spend rate", "usd_per_min", "rate", COST, None, 1.0, 0.0),
    SignalSpec("output_input_ratio", "output:input token ratio", "ratio", "ratio", OUTPUT, INPUT, 0.5, 0.02),
    SignalSpec("reasoning_share", "reasoning share of output", "share", "ratio", REASONING, OUTPUT, 1.0, 0.5,
               odds=True),
    SignalSpec("retry_rate", "retry rate", "ratio", "ratio", RETRIES, REQUESTS, 0.5, 0.12),
    SignalSpec("fallback_rate", "fallback rate", "share", "ratio", FALLBACKS, REQUESTS, 0.5, 0.1),
    SignalSpec("model_mix_drift", "share of spend on models new to the feature", "share", "mix", COST, COST,
               0.0, 0.15),
    SignalSpec("tenant_request_rate", "request rate", "per_min", "tenant", REQUESTS, None, 2.0, 5.0),
)
SPECS = {s.name: s for s in SIGNALS}
# The per-request signals a quiet feature also tests request by request (see Sequential).
SEQUENTIAL = tuple(s for s in SIGNALS if s.kind in ("ratio", "mix"))
_SEQ_SD_FLOOR = 0.15
_SEEN = 4096  # per-request values are logs or 0/1: a spread below this is a feature too steady to scale by


def request_value(signal: str, v: Vector, new_model: bool | None) -> float | None:
    """One request's value for a sequential test: a log of its tokens or cost, or 0/1 for what it did or not.

    Logs, so a request ×4 larger moves the value by the same amount on a small feature as on a large one, and one
    huge request moves it by a few spreads at most once clipped. `new_model`: whether the request's model is new to
    the feature (None in warm-up).
    """
    if signal == "cost_per_request":
        return math.log(v[COST] + 1e-6)
    if signal == "input_per_request":
        return math.log1p(v[INPUT])
    if signal == "output_input_ratio":  # what a request writes (the window's ratio confirms against its prompt)
        return math.log1p(v[OUTPUT])
    if signal == "reasoning_share":  # bounded: reasoning and non-reasoning models share a feature
        return v[REASONING] / (v[REASONING] + v[OUTPUT]) if v[REASONING] + v[OUTPUT] > 0 else None
    if signal == "retry_rate":
        return 1.0 if v[RETRIES] > 0 else 0.0
    if signal == "fallback_rate":
        return v[FALLBACKS]
    if signal == "model_mix_drift":
        return None if new_model is None else float(new_model)
    raise ValueError(f"{signal} is not a per-request signal")


@dataclass(frozen=True)
class DetectConfig:
    """Detector settings (event time, seconds).

    A window closes once the partition's event-time clock passes its end by `lateness_s`. Its length, a multiple of
    `window_s` up to `max_window_s`, is planned from the feature's usual request rate so that it should hold
    `volume_requests` (never from its own count: a window cut at its n-th request overstates every rate). Rates are
    judged on every window but rise toward a page only on a window holding `min_requests`; per-request signals on a
    window holding `volume_requests`, or, for a quiet feature, on its consecutive windows gathered until they do
    (over at most `max_volume_window_s`). A signal alerts only after `warmup_windows` windows. A signal fires when
    the CUSUM of its z-scores (each capped at `z_fire`, less `cusum_k`) over consecutive windows that rise past its
    guards reaches `cusum_h` (so at least two windows: one adds at most z_fire - cusum_k); a tenant's request rate
    fires after
    `persistence` anomalous windows. It resolves after `resolve_after` windows back under `z_resolve`.
    `half_life_windows` is the memory of the baselines (river's exponentially weighted mean and variance).

    A quiet feature (windows planned at least `seq_min_span_s` long) also runs a sequential test per per-request
    signal (Sequential): each request's z-score against the feature's earlier requests (memory `seq_half_life`
    requests, active after `seq_warmup`), clipped at `seq_clip`, less `seq_k`, summed while positive; at `seq_h` the
    run of requests behind the sum (at least `seq_min_requests`) is judged as one window and pages if it passes the
    signal's guards with z_fire. A busy feature's tests learn from `seq_busy_learn` requests per window step.
    A per-request signal's window of n requests is judged against its baseline's
    variance scaled to n (Baseline.scaled): a night's small windows vary more than a day's. Measured figures: the
    README's detection section.
    """

    window_s: int = 60
    lateness_s: int = 60
    min_requests: int = 20
    volume_requests: int = 6
    max_window_s: int = 900
    max_volume_window_s: int = 14_400
    warmup_windows: int = 60
    persistence: int = 2
    resolve_after: int = 5
    z_fire: float = 4.0
    cusum_k: float = 2.0
    cusum_h: float = 6.0
    z_resolve: float = 2.0
    critical_ratio: float = 3.0
    half_life_windows: float = 60.0
    seasonal_min_samples: int = 1
    known_model_share: float = 0.03
    new_model_min_requests: float = 0.2
    new_model_min_count: int = 3
    # Sequential tests of a quiet feature (see Sequential): CUSUM of clipped per-request z-scores.
    seq_k: float = 1.0
    seq_clip: float = 3.0
    seq_h: float = 10.0
    seq_warmup: int = 500
    seq_half_life: float = 500.0
    seq_min_requests: int = 4
    seq_min_span_s: int = 180
    seq_busy_learn: int = 3

    @property
    def fading(self) -> float:
        """The river fading factor for a half life of `half_life_windows` updates."""
        return 1.0 - 0.5 ** (1.0 / self.half_life_windows)

    @property
    def seq_fading(self) -> float:
        """The fading factor of the per-request baselines: a half life of `seq_half_life` requests."""
        return 1.0 - 0.5 ** (1.0 / self.seq_half_life)


_ZEROS = array("d", [0.0] * _WIDTH)


def _blank() -> Vector:
    return array("d", _ZEROS)


def request_vector(row: Mapping[str, Any]) -> Vector:
    """The sums one logical-request row adds to a window (floats: detection estimates, never accounting)."""
    v = _blank()
    v[REQUESTS] = 1.0
    v[COST] = float(row["cost_total_usd"])
    v[INPUT] = float(row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"]
                     + row["cache_write_1h_tokens"])
    v[OUTPUT] = float(row["output_tokens"])
    v[REASONING] = float(row["reasoning_tokens"])
    v[RETRIES] = float(row["retries"])
    v[FALLBACKS] = 1.0 if row["fallbacks"] else 0.0
    return v


def _add(into: Vector, v: Vector) -> None:
    # Unrolled (_WIDTH sums): a request adds its vector to ten of these per window; the loop cost twice as much.
    into[0] += v[0]
    into[1] += v[1]
    into[2] += v[2]
    into[3] += v[3]
    into[4] += v[4]
    into[5] += v[5]
    into[6] += v[6]


def _accumulate(into: Vector, vs: list[Vector], stacked: Any) -> None:
    """Add vectors `vs` (also given as the rows of the float64 matrix `stacked`) to `into`, one after the other.

    numpy's add.accumulate adds row after row, never pairwise, so the sum ends bit for bit where adding them one by
    one in Python ends (tests/unit/test_detect.py::test_a_batch_adds_to_its_sums_bit_for_bit_as_row_by_row).
    """
    if len(vs) < _VECTORIZE_FROM or type(into) is not array:  # a list: a sum from an older snapshot
        for v in vs:
            _add(into, v)
        return
    both = np.vstack((np.frombuffer(into, dtype=np.float64), stacked))
    np.frombuffer(into, dtype=np.float64)[:] = np.add.accumulate(both, axis=0)[-1]


_VECTORIZE_FROM = 8  # below this many vectors a sum is added in Python (a numpy call costs ~5 µs)
Counted = tuple[list[Vector], list[tuple[str, ...]], list[str]]


class _Batch:
    """What one observed batch counts in each window, gathered and counted per window at the end of the batch.

    A request adds its vector to ten sums (its window's total and four dimension values, again in its feature ×
    model window); one by one in Python that was most of the detect stage. Per window, the batch's vectors are
    added with numpy in arrival order, so every sum ends as it would row by row (a replay cut into other batches
    gives the same floats, hence the same alerts). Nothing reads a sum while a batch is observed.
    """

    def __init__(self) -> None:
        self.windows: dict[int, tuple[Window, Counted]] = {}

    def count(self, window: Window, v: Vector, dims: tuple[str, ...], team: str) -> None:
        entry = self.windows.get(id(window))
        if entry is None:
            self.windows[id(window)] = (window, ([v], [dims], [team]))
        else:
            counted = entry[1]
            counted[0].append(v)
            counted[1].append(dims)
            counted[2].append(team)

    def apply(self) -> None:
        for window, counted in self.windows.values():
            window.count_all(*counted)
        self.windows.clear()


# One logical-request row as the detectors count it: (feature_id, event time in epoch seconds, logical id hash or 0,
# its sums, its dimension values in DIMENSIONS' order, team_id). Rows of a revision above 1, of sign -1 or without a
# feature are not observed at all. A decoded JSON row stands in for its sums until it is counted: a duplicate is
# passed over before its sums are read, as it always was (a re-emitted row with a field missing is not an error).
Observed = tuple[str, float, int, Vector | Mapping[str, Any], tuple[str, ...], str]


def observed_rows(rows: Iterable[Mapping[str, Any]]) -> Iterator[Observed]:
    """Decoded logical-request rows (JSON or dicts) as the detectors count them."""
    for row in rows:
        if int(row.get("revision", 1)) != 1 or int(row.get("sign", 1)) != 1 or not row.get("feature_id"):
            continue
        lid = row.get("logical_request_id")
        yield (str(row["feature_id"]), _epoch(row["last_ts"]), id_hash(str(lid)) if lid else 0, row, *_labels(row))


def _labels(row: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """A JSON row's dimension values (in DIMENSIONS' order) and team, a missing or null one as empty text."""
    return tuple(str(row.get(_DIM_FIELD[dim]) or "") for dim in DIMENSIONS), str(row.get("team_id") or "")


def observed_table(table: pa.Table) -> list[Observed]:
    """An Arrow table of logical requests (DETECT_COLUMNS at least, REQUEST_SCHEMA's types) as observed_rows gives it.

    Column by column, to the same values: the cost through its decimal text (float() of it rounds exactly as float()
    of the Decimal does), the time as epoch milliseconds / 1000 (what datetime.timestamp() gives for a time in whole
    milliseconds), the input sum in integers before it becomes a float. No dict per row: the detect stage spent more
    building them than counting them.
    """
    t = table.filter(pc.and_(pc.and_(pc.equal(table["revision"], 1), pc.equal(table["sign"], 1)),
                             pc.not_equal(table["feature_id"], "")))
    if t.num_rows == 0:
        return []
    costs = [float(c) for c in pc.cast(t["cost_total_usd"], pa.string()).to_pylist()]
    inputs = pc.add_checked(pc.add_checked(t["input_tokens"], t["cache_read_tokens"]),
                            pc.add_checked(t["cache_write_tokens"], t["cache_write_1h_tokens"])).to_pylist()
    times = [ms / 1000 for ms in t["last_ts"].cast(pa.int64()).to_pylist()]
    dims = zip(*(_texts(t, _DIM_FIELD[dim]) for dim in DIMENSIONS), strict=True)
    out: list[Observed] = []
    for fid, ts, lid, cost, inp, output, reasoning, retries, fallbacks, dim, team in zip(
            t["feature_id"].to_pylist(), times, t["logical_request_id"].to_pylist(), costs, inputs,
            t["output_tokens"].to_pylist(), t["reasoning_tokens"].to_pylist(), t["retries"].to_pylist(),
            t["fallbacks"].to_pylist(), dims, _texts(t, "team_id"), strict=True):
        v = array("d", (1.0, cost, float(inp), float(output), float(reasoning), float(retries),
                        1.0 if fallbacks else 0.0))
        out.append((fid, ts, id_hash(lid) if lid else 0, v, dim, team))
    return out


def _texts(table: pa.Table, column: str) -> list[str]:
    return [x or "" for x in table[column].to_pylist()]


def _ratio(v: Vector, spec: SignalSpec) -> float | None:
    den = v[spec.den] if spec.den is not None else 0.0
    return v[spec.num] / den if den > 0 else None


@dataclass
class Window:
    """What a feature's open window has gathered: totals and the same sums per dimension value."""

    start: int
    end: int
    total: Vector = field(default_factory=_blank)
    by: dict[str, dict[str, Vector]] = field(default_factory=lambda: {d: {} for d in DIMENSIONS})
    team_id: str = ""
    costs: list[float] = field(default_factory=list)  # the first _MAX_COSTS request costs, for the median
    inputs: list[float] = field(default_factory=list)  # and their input tokens (cache included), for theirs
    # Rows older than the window (a backlog replayed unevenly across input partitions, a skewed producer clock):
    # they count in ratios but not in rates, which would otherwise show the backlog as a burst.
    late_cost: float = 0.0
    late_tenants: dict[str, float] = field(default_factory=dict)
    ids: set[int] = field(default_factory=set)  # logical ids counted here (hashed): a re-emitted request counts once
    # A feature's requests not yet seen by its sequential tests: (event time, id hash, vector, dims, team).
    pending: list[tuple[float, int, Vector, tuple[str, ...], str]] = field(default_factory=list)

    def add(self, row: Mapping[str, Any], late: bool = False, ts: float | None = None,
            lid_hash: int | None = None) -> None:
        """Count one request; given its event time `ts`, also keep it for the feature's sequential tests.

        `lid_hash`: its logical id's id_hash when the caller has it (0: none), else computed here.
        """
        lid = row.get("logical_request_id")
        h = lid_hash if lid_hash is not None else (id_hash(str(lid)) if lid else 0)
        self.add_vector(request_vector(row), *_labels(row), late, ts, h)

    def add_vector(self, v: Vector, dims: tuple[str, ...], team: str, late: bool, ts: float | None, h: int,
                   batch: _Batch | None = None) -> None:
        """`add` of a request already reduced to its sums, dimension values, team and id hash (0: none).

        With a `batch`, its sums are counted when the batch is applied (_Batch), else at once.
        """
        if h:
            self.ids.add(h)
        if late:
            self.late_cost += v[COST]
            self.late_tenants[dims[1]] = self.late_tenants.get(dims[1], 0.0) + 1.0
        if batch is None:
            self.count(v, dims, team)
        else:
            batch.count(self, v, dims, team)
        if ts is not None and len(self.pending) < _MAX_COSTS:
            self.pending.append((ts, h, v, dims, team))

    def count(self, v: Vector, dims: tuple[str, ...], team: str) -> None:
        """Add one request's sums, in total and per dimension value (`dims` in DIMENSIONS' order)."""
        _add(self.total, v)
        if len(self.costs) < _MAX_COSTS:
            self.costs.append(v[COST])
            self.inputs.append(v[INPUT])
        for dim, value in zip(DIMENSIONS, dims, strict=True):
            by = self.by[dim]
            into = by.get(value)
            if into is None:
                into = by[value] = _blank()
            _add(into, v)
        self.team_id = team or self.team_id

    def count_all(self, vs: list[Vector], dims: list[tuple[str, ...]], teams: list[str]) -> None:
        """`count` of several requests in order: the same sums, lists and dimension values, added per sum."""
        if len(vs) < _VECTORIZE_FROM:
            for v, d, team in zip(vs, dims, teams, strict=True):
                self.count(v, d, team)
            return
        stacked = np.frombuffer(b"".join(vs), dtype=np.float64).reshape(len(vs), _WIDTH)
        _accumulate(self.total, vs, stacked)
        room = _MAX_COSTS - len(self.costs)
        if room > 0:
            self.costs.extend(v[COST] for v in vs[:room])
            self.inputs.extend(v[INPUT] for v in vs[:room])
        for k, dim in enumerate(DIMENSIONS):
            rows: dict[str, list[int]] = {}  # value → its requests, values in order of first appearance
            for i, d in enumerate(dims):
                at = rows.get(d[k])
                if at is None:
                    rows[d[k]] = [i]
                else:
                    at.append(i)
            by = self.by[dim]
            for value, at in rows.items():
                into = by.get(value)
                if into is None:
                    into = by[value] = _blank()
                _accumulate(into, [vs[i] for i in at], stacked[at])
        self.team_id = next((team for team in reversed(teams) if team), self.team_id)

    def absorb(self, other: Window) -> None:
        """Add another window's sums (a closed bucket joining the window that covers it)."""
        _add(self.total, other.total)
        room = _MAX_COSTS - len(self.costs)
        if room > 0:
            self.costs.extend(other.costs[:room])
            self.inputs.extend(other.inputs[:room])
        for dim, values in other.by.items():
            mine = self.by.setdefault(dim, {})
            for value, v in values.items():
                _add(mine.setdefault(value, _blank()), v)
        self.late_cost += other.late_cost
        for tenant, n in other.late_tenants.items():
            self.late_tenants[tenant] = self.late_tenants.get(tenant, 0.0) + n
        self.ids |= other.ids
        self.pending.extend(other.pending[:max(_MAX_COSTS - len(self.pending), 0)])
        self.team_id = other.team_id or self.team_id

    @property
    def requests(self) -> float:
        return self.total[REQUESTS]


@dataclass
class Baseline:
    """One signal's normal level: river EW mean and variance, and whether it is firing."""

    mean: stats.EWMean
    var: stats.EWVar
    n: int = 0
    anomalous_run: int = 0
    normal_run: int = 0
    cusum: float = 0.0
    firing: dict[str, Any] | None = None
    # The squared deviations times the window's requests (EW mean): a per-request-signal window of n requests varies
    # about this / n, so a night's 6-request windows are judged wider than a day's 60 (None: a rate, or older state).
    scaled: stats.EWMean | None = None

    @classmethod
    def new(cls, fading: float) -> Baseline:
        return cls(stats.EWMean(fading), stats.EWVar(fading))

    def learn(self, x: float, requests: float = 0.0) -> None:
        if requests > 0:
            if self.scaled is None:
                self.scaled = stats.EWMean(self.mean.fading_factor)
            if self.n:
                self.scaled.update((x - self.mean.get()) ** 2 * requests)
        self.mean.update(x)
        self.var.update(x)
        self.n += 1

    def variance(self, requests: float = 0.0) -> float:
        """The variance to judge a window of `requests` by: scaled by its volume when known, else the plain one."""
        if requests > 0 and self.scaled is not None and self.n > 1:
            return self.scaled.get() / requests
        return max(self.var.get(), 0.0)


@dataclass
class Sequential:
    """One per-request signal's sequential test on a quiet feature: a one-sided CUSUM of clipped z-scores.

    Each request's value (request_value) is standardized against the mean and mean absolute deviation of the
    feature's earlier requests (exponentially weighted), clipped at seq_clip, less seq_k, and summed while positive:
    no window, so a feature with one request a minute shows a change after a handful of them. `run` holds the
    requests since the sum last left zero; when the sum reaches seq_h they are judged as one window against the
    signal's window baseline (Detector._confirm): a page needs both.
    """

    fading: float
    mean: float = 0.0
    dev: float = 0.0  # mean absolute deviation: a spread one huge request inflates far less than a variance
    n: int = 0
    cusum: float = 0.0
    run: Window | None = None

    @property
    def sd(self) -> float:
        """The spread as a standard deviation (mean absolute deviation × √(π/2): equal for a normal law)."""
        return max(self.dev * 1.2533, _SEQ_SD_FLOOR)

    def learn(self, x: float) -> None:
        """Learn one request's value: the plain mean of the first ones, then exponentially weighted.

        (Plain at first: an exponentially weighted mean started at the first value keeps it for about a half life.)
        Unclipped: clipping would bias the mean of a skewed or two-peaked law (a feature's reasoning shares).
        """
        self.n += 1
        if self.n > 1:
            self.dev += max(self.fading, 1.0 / (self.n - 1)) * (abs(x - self.mean) - self.dev)
        self.mean += max(self.fading, 1.0 / self.n) * (x - self.mean)


@dataclass
class FeatureState:
    """Everything the detectors know about one feature; pickled whole as its durable snapshot."""

    feature_id: str
    window: Window | None = None
    baselines: dict[str, Baseline] = field(default_factory=dict)
    season: list[float] = field(default_factory=lambda: [1.0] * _SLOTS)
    season_n: list[int] = field(default_factory=lambda: [0] * _SLOTS)
    # Per dimension value: exponentially weighted rate (per minute) of each of the window sums.
    dim_rates: dict[str, dict[str, Vector]] = field(default_factory=lambda: {d: {} for d in DIMENSIONS})
    tenants: dict[str, Baseline] = field(default_factory=dict)
    model_requests: dict[str, float] = field(default_factory=dict)  # cumulative, for "a model new to the feature"
    windows: int = 0
    model: str = ""  # set on a feature × model detector set (they live in their feature's `by_model`)
    quiet: int = 0  # empty windows judged in a row
    by_model: dict[str, FeatureState] = field(default_factory=dict)
    deploy_first_seen: dict[str, int] = field(default_factory=dict)
    # Buckets of `window_s` (by start) after the current window: rows that arrived before the watermark closed them.
    open: dict[int, Window] = field(default_factory=dict)
    # Per-request signals of a quiet feature: the windows judged with too few requests, gathered until they hold
    # volume_requests (or span more than max_volume_window_s, when the oldest are dropped).
    carry: Window | None = None
    # Requests per minute (exponentially weighted over judged windows): the length of the next window comes from it.
    req_rate: float = 0.0
    rate_n: int = 0
    seq: dict[str, Sequential] = field(default_factory=dict)  # per-request signal → its sequential test
    # The last _SEEN logical ids (hashed) through the sequential tests: a request re-emitted after its window closed
    # (an upstream replay, or one re-folded with another end time) is still counted once.
    seen: dict[int, None] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """A closed window's signal values (None: too little volume), for tests and the benchmark."""

    feature_id: str
    start: int
    end: int
    values: dict[str, float | None]
    model: str = ""


def _fmt(value: float, unit: str) -> str:
    if unit == "usd":
        return f"${value:.4g}"
    if unit == "usd_per_min":
        return f"${value:.4g}/min"
    if unit == "share":
        return f"{value * 100:.0f}%"
    if unit == "per_min":
        return f"{value:.3g} requests/min"
    if unit == "tokens":
        return f"{value:,.0f} tokens"
    return f"{value:.3g}"


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(ts: Any) -> float:
    if isinstance(ts, datetime):
        return ts.timestamp()
    return datetime.fromisoformat(str(ts)).timestamp()


class Detector:
    """Per-feature detectors over llm.cost.requests.v1 rows, driven by event time; plain logic, no Kafka.

    Input: logical-request rows (decoded JSON, revision 1 only: a revision re-states a request already counted),
    per partition of the requests topic (keyed by feature_id, so a feature lives on one partition), and the
    watermark messages the process role writes between them (streams.watermarks). Rows only fill windows, whatever
    their order; a partition's event clock moves only with watermarks (the minimum over the input partitions that
    feed it), never with a row's time or the wall clock, so a replay, a slow batch or one row stamped ahead moves
    nothing. `advance` sets a clock directly (one source: tests, benchmarks).
    Output: alert records (contract v1 plus the anomalies table's columns), one `firing` when a signal has been
    anomalous long enough (see DetectConfig; again when it escalates to critical) and one `resolved` when it is back to
    normal. Deterministic: the same rows in the same order give the same alerts, and a restored snapshot continues
    exactly where it was taken. `dirty` names the features changed since the last `take_dirty`.
    """

    def __init__(self, config: DetectConfig) -> None:
        self.config = config
        self.features: dict[str, FeatureState] = {}
        self.partition_of: dict[str, int] = {}
        self.clocks: dict[int, float] = {}
        self.dirty: set[str] = set()
        self.marks: dict[int, dict[int, int]] = {}  # requests partition → input partition → watermark (ms)
        self.sources: dict[int, int] = {}  # requests partition → input partitions feeding it
        self.late_rows = 0  # rows older than their feature's current window (counted in ratios, not rates)
        self.duplicate_rows = 0  # re-emitted requests already counted in their window
        self.evaluations: list[Evaluation] | None = None  # set to a list to record every closed window

    # ------------------------------------------------------------------ input
    def observe(self, rows: Iterable[Mapping[str, Any]], partition: int, now: float | None = None) -> None:
        """Add a requests partition's rows to their features' windows, whatever their event-time order.

        A row whose window is still open (the partition's watermark has not passed its end plus the lateness) counts
        in it; a row older than the current window is late: it counts in the per-request signals of the current
        window but not in its rates, and in `late_rows`. A logical request already counted in its window is passed
        over (an upstream replay re-emits it): `duplicate_rows`. Nothing closes here: see `watermark`. `now`, if
        given (epoch seconds), caps row times.
        """
        self._observe(observed_rows(rows), partition, now)

    def observe_table(self, table: pa.Table, partition: int, now: float | None = None) -> None:
        """`observe` of an Arrow table of logical requests (the requests topic's messages), read column by column."""
        self._observe(observed_table(table), partition, now)

    def _observe(self, requests: Iterable[Observed], partition: int, now: float | None) -> None:
        batch = _Batch()
        try:
            self._count(requests, partition, now, batch)
        finally:
            batch.apply()

    def _count(self, requests: Iterable[Observed], partition: int, now: float | None, batch: _Batch) -> None:
        for fid, at, h, sums, dims, team in requests:
            ts = at if now is None else min(at, now)
            state = self._state(fid, partition)
            target, late = self._target(state, ts)
            if h and (h in target.ids or h in state.seen):
                self.duplicate_rows += 1
                continue
            v = sums if type(sums) is array else request_vector(sums)  # type: ignore[arg-type]
            self.late_rows += late
            target.add_vector(v, dims, team, late, ts, h, batch)
            model = dims[_MODEL]
            pair = state.by_model.get(model)
            if pair is None and len(state.by_model) < _MAX_DIM_VALUES:
                pair = state.by_model[model] = FeatureState(fid, model=model)
                if state.window is not None:
                    pair.window = Window(state.window.start, state.window.end)
            if pair is not None:
                into, pair_late = self._target(pair, ts)
                into.add_vector(v, dims, team, pair_late, None, h, batch)
            dv = dims[_DEPLOY]
            if dv and dv not in state.deploy_first_seen:
                state.deploy_first_seen[dv] = int(ts)
            self.dirty.add(fid)

    def _target(self, state: FeatureState, ts: float) -> tuple[Window, bool]:
        """The window a row of time `ts` joins, and whether it is late (older than the current window)."""
        w = state.window
        if w is not None and ts < w.end:
            return w, ts < w.start
        start = int(ts // self.config.window_s) * self.config.window_s
        bucket = state.open.get(start)
        if bucket is None:
            bucket = state.open[start] = Window(start, start + self.config.window_s)
        return bucket, False

    def watermark(self, partition: int, marks: Mapping[int, int], sources: int) -> list[dict[str, Any]]:
        """A watermark message on a requests partition: per input partition, event time (ms) complete below.

        The partition's clock is the minimum over all `sources` input partitions of the latest watermark of each
        (one never heard from holds it); windows it has passed by the lateness close, in order.
        """
        known = self.marks.setdefault(partition, {})
        for p, ms in marks.items():
            if ms > known.get(p, 0):
                known[p] = ms
        self.sources[partition] = max(sources, self.sources.get(partition, 0))
        return self.advance(partition, low_watermark(known, self.sources[partition]) / 1000.0)

    def advance(self, partition: int, clock: float) -> list[dict[str, Any]]:
        """Move a partition's event clock forward (never back) and close the windows now due."""
        if clock > self.clocks.get(partition, 0.0):
            self.clocks[partition] = clock
        return self._close_due(partition)

    def _state(self, fid: str, partition: int) -> FeatureState:
        state = self.features.get(fid)
        if state is None:
            state = self.features[fid] = FeatureState(fid)
        self.partition_of[fid] = partition
        return state

    # ------------------------------------------------------------------ snapshots
    def take_dirty(self) -> dict[str, bytes]:
        """Snapshots of the features changed since the last call (what the durable table should hold)."""
        out = {fid: dump_state(self.features[fid]) for fid in sorted(self.dirty)}
        self.dirty.clear()
        return out

    def marks_of(self, partition: int) -> bytes:
        """A requests partition's watermarks as stored beside the snapshots (see `restore`)."""
        return encode_watermarks(self.marks.get(partition, {}), max(self.sources.get(partition, 1), 1))

    def restore(self, snapshots: Mapping[str, bytes], partition_of: Mapping[str, int],
                marks: Mapping[int, bytes] | None = None, now: float | None = None) -> None:
        """Replace the in-memory state with durable snapshots and watermarks (after a start or a rebalance).

        `now`, if given, is the wall clock: a window that starts after it (opened by a row stamped far ahead, in a
        snapshot written before such rows were refused) moves to the window holding `now`, its sums kept, and is
        marked dirty so the repaired snapshot is written back.
        """
        self.features = {fid: load_state(blob) for fid, blob in snapshots.items()}
        self.partition_of = {fid: partition_of[fid] for fid in self.features}
        self.dirty.clear()
        self.marks, self.sources, self.clocks = {}, {}, {}
        for partition, blob in (marks or {}).items():
            known, sources = decode_watermarks(blob)
            self.marks[partition], self.sources[partition] = known, sources
            self.clocks[partition] = low_watermark(known, sources) / 1000.0
        if now is None:
            return
        current = int(now // self.config.window_s) * self.config.window_s
        for fid, state in self.features.items():
            for one in (state, *state.by_model.values()):
                w = one.window
                if w is not None and w.start > now:
                    w.start, w.end = current, current + (w.end - w.start)
                    self.dirty.add(fid)

    # ------------------------------------------------------------------ windows
    def _close_due(self, partition: int) -> list[dict[str, Any]]:
        """Close every window the partition's clock has passed, each feature's in event-time order.

        A feature's own detectors and its feature × model sets close their windows interleaved by window end (the
        feature first on a tie), one step at a time: a model's detector stays quiet while the feature's fires, so
        the order must not depend on how far one watermark moves (a backfill's watermark moves hours at once; it
        used to close all of the feature's windows before any of its models', and the models paged after the
        feature's incident had resolved).
        """
        clock = self.clocks.get(partition, 0.0)
        alerts: list[dict[str, Any]] = []
        for fid, state in self.features.items():
            if self.partition_of.get(fid) != partition:
                continue
            before = _shape(state)
            ones = (state, *state.by_model.values())
            while True:
                due = [(end, i) for i, one in enumerate(ones)
                       if (end := self._next_end(one)) is not None and clock >= end + self.config.lateness_s]
                if not due:
                    break
                alerts.extend(self._close_step(ones[min(due)[1]], clock, state))
            if _shape(state) != before:
                self.dirty.add(fid)
        return alerts

    def _join(self, state: FeatureState, start: int, end: int) -> None:
        """Extend the current window to [start, end) (or open it), absorbing the buckets it now covers."""
        if state.window is None:
            state.window = Window(start, end)
        else:
            state.window.end = end
        for key in [k for k in state.open if k < end]:
            state.window.absorb(state.open.pop(key))

    def _next_end(self, state: FeatureState) -> int | None:
        """Where the next step of this detector set happens: its window's end, or its first bucket's (none: None)."""
        if state.window is not None:
            return state.window.end
        return min(state.open) + self.config.window_s if state.open else None

    def _close_step(self, state: FeatureState, clock: float, feature: FeatureState) -> list[dict[str, Any]]:
        """One step of a detector set whose window the clock has passed: open, skip a silence, judge or extend."""
        cfg = self.config
        if state.window is None:
            first = min(state.open)
            self._join(state, first, first + cfg.window_s)
            return []
        w = state.window
        alerts = self._sequential(state, w)
        if w.total[REQUESTS] == 0 and state.quiet >= cfg.resolve_after and clock - w.end > cfg.max_window_s:
            # A long silence (traffic stopped, or a replay of old events): enough empty windows have been
            # judged to resolve what was firing; skip to the next bucket with data or the clock's window.
            start = min([int((clock - cfg.lateness_s) // cfg.window_s) * cfg.window_s, *state.open])
            if start > w.start:
                state.window = Window(start, start, team_id=w.team_id)
                self._join(state, start, start + cfg.window_s)
                return alerts
        if w.end - w.start >= self._span(state):
            state.quiet = state.quiet + 1 if w.total[REQUESTS] == 0 else 0
            alerts.extend(self._evaluate(state, w, feature))
            state.window = Window(w.end, w.end, team_id=w.team_id)
            self._join(state, w.end, w.end + cfg.window_s)
            return alerts
        self._join(state, w.start, w.end + cfg.window_s)  # a quiet feature's window is longer
        return alerts

    def _span(self, state: FeatureState) -> int:
        """How long a window of this feature (or feature × model set) is: long enough to expect volume_requests.

        Planned from its usual request rate, never from the window's own count: a window that ended at its n-th
        request would overstate every rate it measures. Between window_s and max_window_s; window_s until three
        windows have been judged (no rate known yet).
        """
        cfg = self.config
        if state.rate_n < 3 or state.req_rate <= 0:
            return cfg.window_s
        windows = math.ceil(cfg.volume_requests / state.req_rate * 60.0 / cfg.window_s)
        return min(max(windows, 1) * cfg.window_s, cfg.max_window_s)

    def _evaluate(self, state: FeatureState, w: Window, feature: FeatureState) -> list[dict[str, Any]]:
        cfg = self.config
        # A feature × model set judges only a model that shares the feature with others: for a model serving
        # (nearly) all of it, the feature's own detectors already say the same.
        total = sum(feature.model_requests.values())
        alone = state.model and total > 0 and feature.model_requests.get(state.model, 0.0) >= _ALONE * total
        minutes = (w.end - w.start) / 60.0
        slot = datetime.fromtimestamp(w.start, UTC).hour
        enough = w.total[REQUESTS] >= cfg.min_requests
        state.rate_n += 1
        state.req_rate += max(cfg.fading, 1.0 / state.rate_n) * (w.total[REQUESTS] / minutes - state.req_rate)
        # Per-request signals need volume, not time: a quiet feature's windows are gathered until they hold enough.
        rw = self._volume_window(state, w)
        state.windows += 1
        values: dict[str, float | None] = {}
        alerts: list[dict[str, Any]] = []
        usual_models = self._usual_models(state)
        for spec in SIGNALS:
            if state.model and (spec.kind != "ratio" or alone):
                continue  # a feature × model set watches the per-request signals; rates and mixes are the feature's
            if spec.kind == "tenant":
                alerts.extend(self._tenants(state, w, minutes))
                continue
            judged = w
            if spec.kind == "rate":
                raw = (w.total[spec.num] - w.late_cost) / minutes
                x: float | None = raw / self._season(state, slot)
            elif rw is None:
                x = None
            else:
                x, judged = self._per_request_value(spec, rw, usual_models), rw
            values[spec.name] = x
            parent = feature.baselines.get(spec.name) if state.model else None
            if x is not None and not (parent is not None and parent.firing is not None and
                                      state.baselines.get(spec.name, parent).firing is None):
                # (one page: the feature's, if it fires)
                # A rate rises only on a window with volume: on a quiet feature a few more requests than usual
                # double its spend rate by chance (its per-request signals see a real change in what it spends).
                alerts.extend(self._judge(state, spec, x, judged, (judged.end - judged.start) / 60.0,
                                          may_rise=spec.kind != "rate" or enough))
        if enough or w.total[REQUESTS] == 0:
            self._learn_season(state, slot, (w.total[COST] - w.late_cost) / minutes, minutes)
        self._learn_dims(state, w, minutes)
        for model, v in w.by["model"].items():
            state.model_requests[model] = state.model_requests.get(model, 0.0) + v[REQUESTS]
        if len(state.model_requests) > _MAX_DIM_VALUES:
            for model in sorted(state.model_requests, key=state.model_requests.__getitem__)[:-_MAX_DIM_VALUES]:
                del state.model_requests[model]
        if self.evaluations is not None:
            self.evaluations.append(Evaluation(state.feature_id, w.start, w.end, values, state.model))
        return alerts

    def _volume_window(self, state: FeatureState, w: Window) -> Window | None:
        """The window the per-request signals judge now (None: not enough requests yet).

        `w` if it holds volume_requests, else the quiet feature's windows gathered since the last judgement once they
        do (an empty window adds nothing). Gathered windows older than max_volume_window_s are dropped.
        """
        cfg = self.config
        if w.total[REQUESTS] >= cfg.volume_requests:
            state.carry = None
            return w
        if w.total[REQUESTS] == 0:
            return None
        carry = state.carry
        if carry is None or w.end - carry.start > cfg.max_volume_window_s:
            carry = state.carry = Window(w.start, w.end, team_id=w.team_id)
        carry.end = w.end
        carry.absorb(w)
        if carry.total[REQUESTS] < cfg.volume_requests:
            return None
        state.carry = None
        return carry

    # ------------------------------------------------------------------ sequential tests (quiet features)
    def _sequential(self, state: FeatureState, w: Window) -> list[dict[str, Any]]:
        """The feature's requests up to `w.end` not yet tested, in event-time order, through its sequential tests.

        Every feature's per-request baselines learn (a busy feature's from its first seq_busy_learn requests of each
        step: enough to be warm when it quietens, ~8 µs a request saved); the tests run only on a quiet feature
        (windows planned at least seq_min_span_s long), where a window-by-window judgement needs several long
        windows. Event-time order (ties by id), whatever the arrival order: the same stream gives the same pages.
        """
        pending, w.pending = w.pending, []
        if state.model or not pending:
            return []
        cfg = self.config
        quiet = self._span(state) >= cfg.seq_min_span_s
        usual = self._usual_models(state)
        alerts: list[dict[str, Any]] = []
        learn = len(pending) if quiet else cfg.seq_busy_learn
        for ts, h, v, dims, team in sorted(pending, key=lambda r: (r[0], r[1])):
            if h:
                if h in state.seen:
                    self.duplicate_rows += 1
                    continue
                state.seen[h] = None
                if len(state.seen) > _SEEN:
                    del state.seen[next(iter(state.seen))]
            if learn <= 0:
                continue  # a busy feature's tests only learn, from the first seq_busy_learn requests of each step
            learn -= 1
            new_model = None if usual is None else dims[0] not in usual
            for spec in SEQUENTIAL:
                x = request_value(spec.name, v, new_model)
                if x is None:
                    continue
                test = state.seq.get(spec.name)
                if test is None:
                    test = state.seq[spec.name] = Sequential(cfg.seq_fading)
                b = state.baselines.get(spec.name)
                mean, sd = test.mean, test.sd
                if quiet and test.n >= cfg.seq_warmup and b is not None and b.n >= cfg.warmup_windows \
                        and b.firing is None:
                    test.cusum = max(0.0, test.cusum + min((x - mean) / sd, cfg.seq_clip) - cfg.seq_k)
                    if test.cusum <= 0.0:
                        test.run = None
                    else:
                        if test.run is None:
                            start = int(ts // cfg.window_s) * cfg.window_s
                            test.run = Window(start, start + cfg.window_s)
                        test.run.count(v, dims, team)
                        test.run.end = max(test.run.end, int(ts // cfg.window_s + 1) * cfg.window_s)
                        if test.cusum >= cfg.seq_h:
                            alerts.extend(self._confirm(state, spec, test, b, w.end, usual))
                else:
                    test.cusum, test.run = 0.0, None
                if b is None or b.firing is None:  # an open incident is never learned as the norm
                    test.learn(x)
        return alerts

    def _confirm(self, state: FeatureState, spec: SignalSpec, test: Sequential, b: Baseline, end: int,
                 usual: set[str] | None) -> list[dict[str, Any]]:
        """A sequential test reached seq_h: its run of requests, judged as one window, pages if it rises.

        Rises: it holds seq_min_requests, and its value (the window signal's: a median, a ratio of sums, a mix)
        passes the signal's guards (min_rise, abs_rise) with a z-score of at least z_fire against the signal's window
        baseline. Either way the test starts over.
        """
        cfg = self.config
        run, test.cusum, test.run = test.run, 0.0, None
        if run is None or run.total[REQUESTS] < cfg.seq_min_requests:
            return []
        x = self._per_request_value(spec, run, usual)
        if x is None:
            return []
        mean = b.mean.get()
        z = self._z(x, mean, b.variance(run.total[REQUESTS]), spec)
        if not (x >= mean * (1.0 + spec.min_rise) and x - mean >= spec.abs_rise and z >= cfg.z_fire):
            return []
        run.end = max(run.end, end)
        minutes = (run.end - run.start) / 60.0
        return self._step(state, b, spec.name, True, False, x, mean, z, run, 1,
                          lambda: self._attribute(state, spec, run, minutes, mean), lambda: None)

    def _per_request_value(self, spec: SignalSpec, w: Window, usual: set[str] | None) -> float | None:
        """A per-request signal's value over a window: a median (one huge request moves none), a mix or a ratio."""
        if spec.kind == "mix":
            return self._mix(w, usual) if w.total[COST] > 0 else None
        if spec.name == "cost_per_request":
            return statistics.median(w.costs) if w.costs else None
        if spec.name == "input_per_request":
            return statistics.median(w.inputs) if w.inputs else None
        return _ratio(w.total, spec)

    # ------------------------------------------------------------------ judging one signal
    def _judge(self, state: FeatureState, spec: SignalSpec, x: float, w: Window,
               minutes: float, may_rise: bool = True) -> list[dict[str, Any]]:
        cfg = self.config
        b = state.baselines.get(spec.name)
        if b is None:
            b = state.baselines[spec.name] = Baseline.new(cfg.fading)
        n = w.total[REQUESTS] if spec.kind in ("ratio", "mix") else 0.0
        if b.n < cfg.warmup_windows:
            b.learn(x, n)
            return []
        mean = b.mean.get()
        var = b.variance(n)
        z = self._z(x, mean, var, spec)
        # Persistence: a one-sided CUSUM of the z-scores of consecutive windows that rise past the signal's guards
        # (min_rise, abs_rise), each z capped at z_fire. One window, however extreme, adds at most
        # z_fire - cusum_k < cusum_h, so only a sustained rise reaches cusum_h; a window within the guards resets it.
        rises = may_rise and x >= mean * (1.0 + spec.min_rise) and x - mean >= spec.abs_rise
        b.cusum = max(0.0, b.cusum + min(z, cfg.z_fire) - cfg.cusum_k) if rises and b.firing is None else 0.0
        anomalous = rises and (b.cusum >= cfg.cusum_h or b.firing is not None)
        recovered = z < cfg.z_resolve or x < mean * (1.0 + spec.min_rise / 2) or x - mean < spec.abs_rise / 2
        # Anomalous windows outside an incident are learned clipped to the alert line: the variance keeps the
        # signal's real spread (a heavy tail) without one outlier moving the mean far.
        ceiling = mean + cfg.z_fire * math.sqrt(var)
        return self._step(state, b, spec.name, anomalous, recovered, x, mean, z, w, 1,
                          lambda: self._attribute(state, spec, w, minutes, mean),
                          lambda: b.learn(min(x, ceiling), n))

    def _z(self, x: float, mean: float, var: float, spec: SignalSpec) -> float:
        floor = max(0.1 * abs(mean), spec.abs_rise / self.config.z_fire, 1e-12)
        return (x - mean) / max(math.sqrt(max(var, 0.0)), floor)

    def _step(self, state: FeatureState, b: Baseline, signal: str, anomalous: bool, recovered: bool, x: float,
              mean: float, z: float, w: Window, confirm_after: int, attribute: Any,
              learn: Any) -> list[dict[str, Any]]:
        """Fire after `confirm_after` anomalous windows, escalate, resolve with hysteresis; the window's alerts.

        Shared by every signal.
        """
        cfg = self.config
        if b.firing is None:
            learn()  # no learning while an incident is open: the anomaly never becomes the norm
        if anomalous:
            b.anomalous_run += 1
            b.normal_run = 0
        else:
            b.anomalous_run = 0
            b.normal_run = b.normal_run + 1 if recovered else 0
        severity = "critical" if x >= mean * cfg.critical_ratio else "warning"
        if b.firing is None and b.anomalous_run >= confirm_after:
            dim, value, why = attribute()
            started = w.start
            b.firing = {"incident_id": f"{_key(state)}:{signal}:{started}", "started": started,
                        "severity": severity, "dimension": dim, "dimension_value": value, "why": why,
                        "baseline": mean}
            return [self._record(state, signal, "firing", x, mean, z, w)]
        if b.firing is not None and anomalous and severity == "critical" and b.firing["severity"] == "warning":
            b.firing["severity"] = "critical"
            return [self._record(state, signal, "firing", x, b.firing["baseline"], z, w)]
        if b.firing is not None and b.normal_run >= cfg.resolve_after:
            record = self._record(state, signal, "resolved", x, b.firing["baseline"], z, w)
            b.firing = None
            return [record]
        return []

    # ------------------------------------------------------------------ tenants (runaway loops)
    def _tenants(self, state: FeatureState, w: Window, minutes: float) -> list[dict[str, Any]]:
        """Per-tenant request rate against its own baseline; the signal is the worst tenant's (Poisson z-score)."""
        cfg = self.config
        spec = SPECS["tenant_request_rate"]
        seen = w.by["tenant"]
        worst: tuple[float, str, float, float] | None = None  # (z, tenant, rate, expected)
        # A tenant new to the feature is judged against the feature's usual rate per tenant.
        usual_per_tenant = sum(t.mean.get() for t in state.tenants.values() if t.n) / max(len(state.tenants), 1)
        warmed = state.windows > cfg.warmup_windows
        for tenant in sorted(set(seen) | set(state.tenants)):
            rate = (seen.get(tenant, _blank())[REQUESTS] - w.late_tenants.get(tenant, 0.0)) / minutes
            b = state.tenants.get(tenant)
            if b is None:
                b = state.tenants[tenant] = Baseline.new(cfg.fading)
            expected = b.mean.get() if b.n >= cfg.warmup_windows else max(b.mean.get() if b.n else 0.0,
                                                                          usual_per_tenant)
            z = (rate - expected) / math.sqrt((expected + 1.0 / minutes) / minutes)
            anomalous = (warmed and z >= cfg.z_fire and rate >= expected * (1 + spec.min_rise)
                         and rate - expected >= spec.abs_rise)
            if anomalous and (worst is None or z > worst[0]):
                worst = (z, tenant, rate, expected)
            elif not anomalous:
                b.learn(rate)
        self._forget_quiet_tenants(state)
        b = state.baselines.get(spec.name)
        if b is None:
            b = state.baselines[spec.name] = Baseline.new(cfg.fading)
        b.n += 1
        if worst is None:
            return self._step(state, b, spec.name, False, True, 0.0, 0.0, 0.0, w, cfg.persistence, None,
                              lambda: None)
        z, tenant, rate, expected = worst
        why = f"tenant {tenant} sends {_fmt(rate, 'per_min')} against its usual {_fmt(expected, 'per_min')}"
        return self._step(state, b, spec.name, True, False, rate, expected, z, w, cfg.persistence,
                          lambda: ("tenant", tenant, why), lambda: None)

    def _forget_quiet_tenants(self, state: FeatureState) -> None:
        if len(state.tenants) <= 4 * _MAX_DIM_VALUES:
            return
        ranked = sorted(state.tenants, key=lambda t: state.tenants[t].mean.get(), reverse=True)
        for tenant in ranked[4 * _MAX_DIM_VALUES:]:
            if state.tenants[tenant].firing is None:
                del state.tenants[tenant]

    # ------------------------------------------------------------------ seasonality, models, dimensions
    def _season(self, state: FeatureState, slot: int) -> float:
        """The hour-of-day factor of the feature's spend rate, once that hour of the day has been judged enough.

        Enough: `seasonal_min_samples` hours of windows, whatever their length (a quiet feature's are long).
        """
        if state.season_n[slot] < self.config.seasonal_min_samples * 60:
            return 1.0
        return max(state.season[slot], _MIN_SEASON)  # a silent hour must not divide by zero

    def _learn_season(self, state: FeatureState, slot: int, rate: float, minutes: float) -> None:
        b = state.baselines.get("spend_rate")
        level = b.mean.get() if b is not None and b.n else 0.0
        if level <= 0:
            return
        state.season_n[slot] += max(int(round(minutes)), 1)
        a = min(1.0, minutes / min(state.season_n[slot], 120))  # mean of the first minutes, then an EW mean
        state.season[slot] += a * (rate / level - state.season[slot])

    def _mix(self, w: Window, usual: set[str] | None) -> float | None:
        """Share of the window's spend on models new to the feature.

        0 unless they also serve `new_model_min_requests` of its requests and at least `new_model_min_count` of them:
        one expensive stray fallback is no drift, nor are two in a night's window of six.
        """
        if usual is None:
            return None
        new = [v for m, v in w.by["model"].items() if m not in usual]
        count = sum(v[REQUESTS] for v in new)
        if count < self.config.new_model_min_requests * w.total[REQUESTS] or count < self.config.new_model_min_count:
            return 0.0
        return sum(v[COST] for v in new) / w.total[COST]

    def _usual_models(self, state: FeatureState) -> set[str] | None:
        """Models that served at least `known_model_share` of the feature's requests so far (None in warm-up)."""
        if state.windows <= self.config.warmup_windows:
            return None
        total = sum(state.model_requests.values())
        return {m for m, n in state.model_requests.items() if n >= self.config.known_model_share * total}

    def _learn_dims(self, state: FeatureState, w: Window, minutes: float) -> None:
        a = self.config.fading
        for dim in DIMENSIONS:
            rates = state.dim_rates[dim]
            seen = w.by[dim]
            for value in set(rates) | set(seen):
                now = seen.get(value, _blank())
                old = rates.setdefault(value, _blank())
                for i in range(_WIDTH):
                    old[i] += a * (now[i] / minutes - old[i])
            if len(rates) > _MAX_DIM_VALUES:
                for value in sorted(rates, key=lambda k: rates[k][REQUESTS])[:len(rates) - _MAX_DIM_VALUES]:
                    del rates[value]

    def _attribute(self, state: FeatureState, spec: SignalSpec, w: Window, minutes: float,
                   baseline: float) -> tuple[str, str, str]:
        """The dimension value that carries more of the excess than its share of traffic, and a clause saying so.

        Excess of value v: for ratio signals num_v - baseline × den_v over the window; for rates and the model mix,
        v's rate of the numerator now minus its usual rate. A value is scored by its excess minus its share of the
        window's requests times the total excess, so a dimension with one value (all traffic) explains nothing.
        """
        best: tuple[float, str, str] | None = None
        requests = max(w.total[REQUESTS], 1.0)
        for dim in DIMENSIONS:
            excess: dict[str, float] = {}
            for value, v in w.by[dim].items():
                if spec.kind == "ratio":
                    den = v[spec.den] if spec.den is not None else 0
                    excess[value] = v[spec.num] - baseline * den
                else:
                    usual = state.dim_rates[dim].get(value, _blank())
                    excess[value] = v[spec.num] / minutes - usual[spec.num]
            total = sum(excess.values())
            for value, e in excess.items():
                score = e - w.by[dim][value][REQUESTS] / requests * total
                if score > _DOMINANT * total and (best is None or score > best[0]):
                    best = (score, dim, value)
        if best is None:
            return "", "", ""
        _, dim, value = best
        return dim, value, f"driven by {dim.replace('_', ' ')} {value}"

    # ------------------------------------------------------------------ records
    def _record(self, state: FeatureState, signal: str, status: str, x: float, baseline: float, z: float,
                w: Window) -> dict[str, Any]:
        spec = SPECS[signal]
        if spec.odds:  # shown as the share
            x, baseline = x / (1.0 + x), baseline / (1.0 + baseline)
        inc = state.baselines[signal].firing
        assert inc is not None  # noqa: S101 - only called while an incident is open
        fid = state.feature_id
        subject = f"{fid} on {state.model}" if state.model else fid
        if status == "firing":
            since = self._deploy_since(state, inc["started"])
            parts = [f"{spec.label} of {subject} rose from {_fmt(baseline, spec.unit)} to {_fmt(x, spec.unit)}"]
            if signal == "tenant_request_rate":
                parts = [f"{spec.label} of {fid} rose: {inc['why']}"]
            elif since:
                parts.append(f"since deploy {since}")
            if inc["why"] and signal != "tenant_request_rate":
                parts.append(inc["why"])
            explanation = " ".join(parts)
        else:
            explanation = (f"{spec.label} of {subject} is back to normal: {_fmt(x, spec.unit)} against a baseline of "
                           f"{_fmt(baseline, spec.unit)}")
        dimension, value = (inc["dimension"], inc["dimension_value"]) if inc["dimension"] or not state.model \
            else ("model", state.model)
        return {
            "alert_version": 1, "incident_key": f"anomaly:{_key(state)}:{signal}", "kind": "anomaly",
            "state": status,
            "feature_id": fid, "team_id": state.window.team_id if state.window else w.team_id, "signal": signal,
            "severity": inc["severity"], "value": round(x, 9), "baseline": round(baseline, 9),
            "score": round(z, 3), "dimension": dimension, "dimension_value": value,
            "explanation": explanation, "detected_at": _iso(w.end + self.config.lateness_s),
            "incident_id": inc["incident_id"],
            "started_at": _iso(inc["started"]), "window_start": _iso(w.start), "window_end": _iso(w.end),
            "requests": int(w.total[REQUESTS]),
        }

    def _deploy_since(self, state: FeatureState, started: int) -> str:
        """A deploy_version first seen shortly before (or during) the incident's first window, if any."""
        window = self.config.window_s * 8
        recent = [(t, v) for v, t in state.deploy_first_seen.items() if started - window <= t <= started + window]
        return max(recent)[1] if recent else ""


def _shape(state: FeatureState) -> list[tuple[int, int, int]]:
    """Where a feature's windows (and its feature × model sets') stand: changes when one closes or grows."""
    return [(one.window.start, one.window.end, len(one.open)) if one.window else (0, 0, len(one.open))
            for one in (state, *state.by_model.values())]


def _key(state: FeatureState) -> str:
    """The detector set's name in incident keys: the feature, or feature@model for a feature × model set."""
    return f"{state.feature_id}@{state.model}" if state.model else state.feature_id


def _upgrade(state: FeatureState, version: int) -> FeatureState:
    """An older snapshot in today's shape.

    Version 1 came before buckets, the quiet-feature carry and counted ids; snapshots of either version written before
    the input_per_request signal have windows without `inputs` (that signal then starts from the next window's).
    """
    for one in (state, *state.by_model.values()):
        if version == 1:
            one.__dict__.setdefault("open", {})
            one.__dict__.setdefault("carry", None)
            one.__dict__.setdefault("req_rate", 0.0)
            one.__dict__.setdefault("rate_n", 0)
            if one.window is not None:
                one.window.__dict__["ids"] = set()  # version 1 counted no ids
        one.__dict__.setdefault("seq", {})
        one.__dict__.setdefault("seen", {})
        for w in (one.window, one.carry, *one.open.values()):
            if w is not None:
                w.__dict__.setdefault("inputs", [])
                w.__dict__.setdefault("pending", [])
    return state


def id_hash(logical_id: str) -> int:
    """A logical id as 64 bits, for the windows' duplicate check (a set of ints pickles ~5× smaller than strings)."""
    return int.from_bytes(hashlib.blake2b(logical_id.encode(), digest_size=8).digest(), "big")


def _pack(state: FeatureState) -> bytes:
    return bytes([STATE_VERSION]) + zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), 1)


def dump_state(state: FeatureState, limit: int = MAX_SNAPSHOT_BYTES) -> bytes:
    """A feature's durable snapshot: a version byte and the compressed pickle (river statistics pickle exactly).

    Measured (tests/unit/test_detect.py's case: six hours of open 1-minute buckets of a feature with three models
    and 30 tenants; one-off, 2026-12-04): 438 kB at zlib level 1 in 12 ms, against 389 kB at level 6 in 40 ms. Level
    1, because the process worker takes snapshots on a core it shares with the sink. A snapshot still over `limit` (a
    backlog spanning many hours on a busy feature) drops what only its open buckets hold beyond the signals (counted
    ids, per-request costs past the first 200, the sums per dimension value, the requests kept for the sequential
    tests, which run only on a quiet feature): a replay after a restart may then count a re-emitted request twice,
    and the attribution of those buckets is lost; the signals are kept (the case above, trimmed: 98 kB). Logged as a
    warning.
    """
    blob = _pack(state)
    if len(blob) <= limit:
        return blob
    trimmed = copy.deepcopy(state)
    for one in (trimmed, *trimmed.by_model.values()):
        for w in one.open.values():
            w.ids.clear()
            del w.costs[200:]
            del w.inputs[200:]
            w.pending.clear()  # (a busy feature's: its sequential tests run only once it is quiet)
            w.by = {d: {} for d in DIMENSIONS}
    smaller = _pack(trimmed)
    if len(smaller) > limit:
        log.error("detector snapshot of %s is %d bytes even trimmed (limit %d): the changelog may refuse it",
                  state.feature_id, len(smaller), limit)
    log.warning("detector snapshot of %s is %d bytes (limit %d): its open buckets' ids, costs and dimension sums are "
                "dropped (%d bytes now)", state.feature_id, len(blob), limit, len(smaller))
    return smaller


def load_state(blob: bytes) -> FeatureState:
    """Inverse of dump_state. Snapshots come only from tally's own changelog topic, never from user input."""
    if not blob or blob[0] not in (1, STATE_VERSION):
        raise ValueError(f"detector snapshot version {blob[:1]!r} is not {STATE_VERSION}")
    raw = blob[1:] if blob[0] == 1 else zlib.decompress(blob[1:])
    state = pickle.loads(raw)  # noqa: S301 - written by this module into tally's internal changelog only
    if not isinstance(state, FeatureState):
        raise ValueError("a detector snapshot must hold a FeatureState")
    return _upgrade(state, blob[0])
