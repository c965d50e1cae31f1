"""Sink step: a usage row that no longer counts for its physical call is subtracted from every aggregate, once."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.fold import call_rank
from streams.pieces import insert_token
from streams.records import TOKEN_CLASSES
from tally.store import Store, string_array

log = logging.getLogger(__name__)

SUPERSEDED_TABLE = "superseded_events"
# The usage_events columns a row's rollup contribution came from (migration 005) plus what identifies it.
_USAGE_COLUMNS: tuple[str, ...] = (
    "event_id", "request_id", "logical_request_id", "ts", "usage_reported", "pricing_status", "team_id", "product",
    "feature_id", "model_actual", "provider", "tenant_id", "environment", "attribution_status", *TOKEN_CLASSES,
    "cost_input_usd", "cost_output_usd", "cost_reasoning_usd", "cost_cache_read_usd", "cost_cache_write_usd",
    "cost_tools_usd", "cost_total_usd",
)
SUPERSEDED_COLUMNS: tuple[str, ...] = (*_USAGE_COLUMNS, "superseded_by", "superseded_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_CHUNK = 10_000


@dataclass(frozen=True)
class CallRow:
    """One usage_events row of a physical call, as the lookup table call_rows holds it."""

    logical_request_id: str
    request_id: str
    event_id: str
    usage_reported: bool
    ts: datetime
    team_id: str
    feature_id: str
    ingested_at: datetime

    @property
    def rank(self) -> tuple[bool, int, str]:
        return call_rank(self.usage_reported, (self.ts - _EPOCH) // _MS, self.event_id)


@dataclass(frozen=True)
class Supersession:
    """A row to subtract: `row` no longer counts, `by` is the row of its call that does, `at` dates the decision."""

    row: CallRow
    by: CallRow
    at: datetime


Call = tuple[str, str]  # (logical_request_id, request_id): a physical call, as the fold groups attempts


def plan(calls: Mapping[Call, Iterable[tuple[CallRow, bool]]]) -> list[Supersession]:
    """The rows to supersede now, given every (row, already superseded?) marker of each call; a pure function.

    Per call, the row of highest streams.fold.call_rank counts (as in the fold) and every other row must be
    superseded exactly once: the rows not superseded yet are returned. A row may appear twice (once per marker).
    `at` is the latest ingested_at of the call's rows: the same on any replay of the same rows.
    """
    out: list[Supersession] = []
    for call in sorted(calls):
        rows: dict[str, CallRow] = {}
        done: set[str] = set()
        for row, superseded in calls[call]:
            if superseded:  # its marker carries superseded_at as ingested_at: the row's own marker wins
                done.add(row.event_id)
                rows.setdefault(row.event_id, row)
            else:
                rows[row.event_id] = row
        if len(rows) < 2:
            continue
        winner = max(rows.values(), key=lambda r: r.rank)
        at = max(r.ingested_at for r in rows.values())
        out += [Supersession(r, winner, at) for eid, r in sorted(rows.items()) if eid != winner.event_id
                and eid not in done]
    return out


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _calls(store: Store, request_ids: Sequence[str]) -> dict[Call, list[tuple[CallRow, bool]]]:
    """The markers of the calls of `request_ids` that have more than one row (table call_rows)."""
    found: dict[Call, list[tuple[CallRow, bool]]] = {}
    for start in range(0, len(request_ids), _CHUNK):
        res = store.query(
            "SELECT logical_request_id, request_id, groupArray((event_id, usage_reported, ts, team_id, feature_id, "
            "ingested_at, superseded)) FROM {db}.call_rows "
            f"WHERE request_id IN {store.id_set(request_ids[start:start + _CHUNK])} "
            "GROUP BY logical_request_id, request_id HAVING uniqExact(event_id) > 1", lookup=True)
        for lid, request_id, markers in res.rows:
            found[(lid, request_id)] = [
                (CallRow(lid, request_id, eid, bool(reported), _aware(ts), team, feature, _aware(at)),
                 bool(superseded))
                for eid, reported, ts, team, feature, at, superseded in markers]
    return found


def _usage_rows(store: Store, rows: Sequence[CallRow]) -> dict[str, dict[str, Any]]:
    """The usage_events rows of these call rows by event_id, read through usage_events' primary key prefix."""
    res = store.query(
        f"SELECT {', '.join(_USAGE_COLUMNS)} FROM {{db}}.usage_events "
        f"WHERE team_id IN (SELECT arrayJoin({string_array(sorted({r.team_id for r in rows}))})) "
        f"AND ts >= fromUnixTimestamp64Milli({int(min(r.rank[1] for r in rows))}, 'UTC') "
        f"AND ts <= fromUnixTimestamp64Milli({int(max(r.rank[1] for r in rows))}, 'UTC') "
        f"AND event_id IN (SELECT arrayJoin({string_array([r.event_id for r in rows])}))", lookup=True)
    found: dict[str, dict[str, Any]] = {}
    for values in res.rows:
        row = dict(zip(_USAGE_COLUMNS, values, strict=True))
        row["ts"] = _aware(row["ts"])
        found[row["event_id"]] = row
    return found


def supersede(store: Store, rows: Sequence[Mapping[str, Any]]) -> int:
    """Subtract from every aggregate the rows of these rows' calls that no longer count; returns how many.

    Called by the sink after it has saved `rows` (the already-saved ones included), in the same executor thread:
      1. Look up every row of their physical calls (a request_id within its logical request, as in the fold) and
         which are superseded already (call_rows, filled by views of usage_events and superseded_events; TTL = the
         dedup window).
      2. `plan`: per call, the row that counts is the fold's; each other row not superseded yet is to be.
      3. Read those rows back from usage_events and insert them into superseded_events with a deterministic token
         (a hash of their event_ids): its view subtracts them from rollup_minute (→ hour → day), and
         usage_events_current hides them.
    Exactly once: a replayed batch finds its rows superseded (step 1) and writes nothing; a retried insert is
    absorbed by the dedup windows. The estimate and its correction may arrive in one batch, in two, in either
    order: the decision depends only on the set of rows of the call. A failure raises; the sink retries the batch.
    Not guaranteed: a row arriving after the dedup window for a call whose other rows have left call_rows.
    """
    request_ids = sorted({r["request_id"] for r in rows})
    todo = plan(_calls(store, request_ids))
    if not todo:
        return 0
    found = _usage_rows(store, [s.row for s in todo])
    out: list[dict[str, Any]] = []
    for s in todo:
        row = found.get(s.row.event_id)
        if row is None:  # only if usage_events lost a row by hand: nothing of it is left to subtract from
            log.warning("call %s: row %s is in call_rows but not in usage_events; not superseded",
                        s.row.request_id, s.row.event_id)
            continue
        out.append({**row, "superseded_by": s.by.event_id, "superseded_at": s.at})
    if out:
        columns = [[r[c] for r in out] for c in SUPERSEDED_COLUMNS]
        store.insert_columns(SUPERSEDED_TABLE, columns, SUPERSEDED_COLUMNS,
                             insert_token(SUPERSEDED_TABLE, (r["event_id"] for r in out)))
    return len(out)
