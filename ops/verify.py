"""`tally verify`: every rollup grain against its sources, per UTC day × team × feature, exact."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

Query = Callable[[str], tuple[list[str], list[list[Any]]]]
Cell = tuple[date, str, str]  # (UTC day, team_id, feature_id)

GRAINS: tuple[str, ...] = ("minute", "hour", "day")
# measure → the source it must equal: attempts and cost from usage_events_current (usage_events without the rows
# a later row of the same physical call superseded: the rollups subtract those, migration 009), requests and retry
# waste from logical_requests (each request counted once at its latest revision: sums with sign).
MEASURES: tuple[str, ...] = ("attempts", "cost_total_usd", "requests", "cost_wasted_usd")


@dataclass(frozen=True)
class Difference:
    """One cell where a table disagrees with what its sources say it must hold."""

    day: date
    team_id: str
    feature_id: str
    table: str
    measure: str
    expected: Decimal
    found: Decimal

    def describe(self) -> str:
        return (f"{self.day} {self.team_id or '-'}/{self.feature_id or '-'} {self.table}.{self.measure}: "
                f"expected {self.expected}, found {self.found} (diff {self.found - self.expected})")


@dataclass
class Audit:
    """What `verify` compared and every difference it found (empty: the store is consistent)."""

    since: date
    until: date
    windows: dict[str, tuple[date, date]]  # table → (first, last) UTC day compared; absent: outside its retention
    cells: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences


def compared_days(since: date, until: date, retention_days: int, now: datetime) -> tuple[date, date] | None:
    """The days of [since, until] a grain kept whole at `now`: its TTL (bucket + N days) has dropped none of them.

    Parts are dropped whole once every row in them expired, so a day whose midnight is more than N days before `now`
    may be partly gone; the first day compared is the one after.
    """
    first = max(since, (now - timedelta(days=retention_days)).date() + timedelta(days=1))
    return (first, until) if first <= until else None


def _range(column: str, first: date, last: date) -> str:
    return (f"{column} >= toDateTime64('{first.isoformat()} 00:00:00', 3, 'UTC') AND "
            f"{column} < toDateTime64('{(last + timedelta(days=1)).isoformat()} 00:00:00', 3, 'UTC')")


def _cells(query: Query, sql: str, measures: Iterable[str]) -> dict[Cell, dict[str, Decimal]]:
    """Rows of (day, team_id, feature_id, *measures as exact strings) → cell → measure → Decimal."""
    names = list(measures)
    out: dict[Cell, dict[str, Decimal]] = {}
    for row in query(sql)[1]:
        day = row[0] if isinstance(row[0], date) else date.fromisoformat(str(row[0]))
        out[(day, str(row[1]), str(row[2]))] = {m: Decimal(str(v)) for m, v in zip(names, row[3:], strict=True)}
    return out


def _sources(query: Query, first: date, last: date) -> dict[Cell, dict[str, Decimal]]:
    attempts = _cells(query, "SELECT toDate(ts) AS day, team_id, feature_id, toString(count()), "
                             "toString(sum(cost_total_usd)) FROM {db}.usage_events_current "
                             f"WHERE {_range('ts', first, last)} GROUP BY day, team_id, feature_id",
                      ("attempts", "cost_total_usd"))
    requests = _cells(query, "SELECT toDate(first_ts) AS day, team_id, feature_id, toString(sum(sign)), "
                             "toString(sum(sign * cost_wasted_usd)) FROM {db}.logical_requests "
                             f"WHERE {_range('first_ts', first, last)} GROUP BY day, team_id, feature_id",
                      ("requests", "cost_wasted_usd"))
    for cell, values in requests.items():
        attempts.setdefault(cell, {}).update(values)
    return attempts


def _integrity(query: Query, first: date, last: date) -> list[Difference]:
    """Source rows that break exactly-once: an event_id stored twice, a request counted other than once (sum(sign))."""
    out: list[Difference] = []
    twice = _cells(query, "SELECT toDate(ts) AS day, team_id, feature_id, toString(count() - uniqExact(event_id)) "
                          f"FROM {{db}}.usage_events WHERE {_range('ts', first, last)} "
                          "GROUP BY day, team_id, feature_id HAVING count() != uniqExact(event_id)",
                   ("duplicate_event_ids",))
    counted = _cells(query, "SELECT day, team_id, feature_id, toString(count()) FROM (SELECT logical_request_id, "
                            "toDate(max(first_ts)) AS day, any(team_id) AS team_id, any(feature_id) AS feature_id "
                            f"FROM {{db}}.logical_requests WHERE {_range('first_ts', first, last)} "
                            "GROUP BY logical_request_id HAVING sum(sign) NOT IN (0, 1)) GROUP BY day, team_id, "
                            "feature_id", ("requests_not_counted_once",))
    for table, cells in (("usage_events", twice), ("logical_requests", counted)):
        for (day, team, feature), values in sorted(cells.items()):
            for measure, found in values.items():
                out.append(Difference(day, team, feature, table, measure, Decimal(0), found))
    return out


def verify(query: Query, since: date, until: date, now: datetime, retention_days: dict[str, int]) -> Audit:
    """Compare usage_events and logical_requests with rollup_minute, _hour and _day over the UTC days [since, until].

    Per day × team × feature and per grain: attempts = count() of usage_events_current (superseded rows left out,
    as the rollups subtract them), cost_total_usd = its exact sum,
    requests = sum(sign) of logical_requests, cost_wasted_usd = sum(sign * cost_wasted_usd) (by first_ts). A grain is
    compared only on the days its retention (retention_days[grain], TTL from `now`) has kept whole. Also reports
    source rows that break exactly-once (an event_id twice in usage_events, a request whose signs do not sum to 0
    or 1). `query` runs read-only SQL with {db} placeholders (through the worker's /api/query or directly).
    Not compared: token counts and quantile states; open requests (still in the fold) are in neither side.
    """
    windows = {f"rollup_{g}": w for g in GRAINS
               if (w := compared_days(since, until, retention_days[g], now)) is not None}
    audit = Audit(since, until, windows)
    audit.differences.extend(_integrity(query, since, until))
    if not windows:
        return audit
    first = min(w[0] for w in windows.values())
    sources = _sources(query, first, until)
    for table, (lo, hi) in windows.items():
        rollup = _cells(query, "SELECT toDate(bucket) AS day, team_id, feature_id, toString(sum(attempts)), "
                               "toString(sum(cost_total_usd)), toString(sum(requests)), toString(sum(cost_wasted_usd)) "
                               f"FROM {{db}}.{table} WHERE {_range('bucket', lo, hi)} "
                               "GROUP BY day, team_id, feature_id", MEASURES)
        for cell in sorted(c for c in sources.keys() | rollup.keys() if lo <= c[0] <= hi):
            audit.cells += 1
            want, got = sources.get(cell, {}), rollup.get(cell, {})
            for m in MEASURES:
                expected, found = want.get(m, Decimal(0)), got.get(m, Decimal(0))
                if expected != found:
                    audit.differences.append(Difference(*cell, table, m, expected, found))
    return audit
