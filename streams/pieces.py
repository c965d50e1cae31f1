"""The inserts of a sink batch (pieces), and the journal that makes a replay re-send exactly the same ones.

A sink batch (a run of input messages) becomes a few pieces per table: one insert each, whatever the number of
messages, cut only by UTC day (rollup_minute is partitioned by day and ClickHouse refuses an insert block that
spans more than max_partitions_per_insert_block (100) partitions, so a piece holds at most DAYS_PER_PIECE days).
Each piece carries a deterministic insert_deduplication_token, a hash of its table, its plan, its days and its
rows' keys: re-sent unchanged (same rows, same token, one Arrow record batch), it is absorbed by every table that
took it and fills the ones that did not.

A batch's composition depends on timing (what the take held, which partitions the worker owns), so a replay after
a crash may not cut its messages into the same pieces. The plan is therefore journaled before its first insert
(sink_journal, migration 012): one row per input message it covers, and one row, `plan:<id>`, holding its pieces
as one Arrow IPC stream (the pieces' rows, with their tokens, days and group breaks in the schema's metadata). A
sink that meets a journaled message re-sends that plan's pieces as they were journaled, before it plans anything
else, and plans the rest of its batch without that message's rows; whichever worker meets any of the plan's
messages first re-sends all of it, and a second re-send is absorbed.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from streams.sink_columns import decode_message, ipc_stream

# Days in one piece at most: half of ClickHouse's max_partitions_per_insert_block (100) leaves room.
DAYS_PER_PIECE = 50
JOURNAL_META = b"tally.pieces"  # the schema metadata key of a journal's piece list

Group = tuple[dict[str, Any], ...]  # rows that land in one insert or not at all (a cancel row and its revision)
_EPOCH_DAY = date(1970, 1, 1)


def insert_token(table: str, keys: Iterable[str], scope: Iterable[str] = ()) -> str:
    """Deterministic insert_deduplication_token: the same set of rows (in the same scope) always gets the same token.

    `scope` names what the piece was cut from (its plan and days); it is hashed before the sorted keys.
    """
    h = hashlib.blake2b(digest_size=16)
    for key in (*scope, "", *sorted(keys)) if scope else sorted(keys):
        h.update(key.encode())
        h.update(b"\0")
    return f"{table}:{h.hexdigest()}"


def plan_id(origins: Iterable[str]) -> str:
    """The id of a plan: a hash of the input messages it covers (each message is planned once)."""
    h = hashlib.blake2b(digest_size=16)
    for origin in sorted(set(origins)):
        h.update(origin.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Piece:
    """One insert: whole groups of rows, their UTC days, and the token that makes a re-send a no-op.

    A dict piece holds `groups` of dict rows (anomalies, tools). A columnar piece holds its rows as one Arrow table
    in `data` (every column of the insert, in order), their keys in `keys`, and `breaks`: the row at which each of
    its groups starts, the first at 0 (empty when each row is a group of its own).
    """

    table: str
    groups: tuple[Group, ...]
    token: str
    days: tuple[date, ...]
    data: pa.Table | None = None
    keys: tuple[str, ...] = ()
    breaks: tuple[int, ...] = ()

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self.data is not None:
            raise TypeError("a columnar piece holds an Arrow table (data), not dict rows")
        return [r for g in self.groups for r in g]

    @property
    def size(self) -> int:
        """How many rows the piece inserts."""
        return len(self.keys) if self.data is not None else sum(len(g) for g in self.groups)

    @property
    def splittable(self) -> bool:
        """Whether it has more than one group, so that halves can be sent."""
        if self.data is not None:
            return len(self.breaks) > 1 if self.breaks else self.size > 1
        return len(self.groups) > 1


def make_pieces(table: str, groups: Iterable[Group], key: Callable[[dict[str, Any]], str],
                days: Callable[[Group], Iterable[date]]) -> list[Piece]:
    """Dict pieces: groups split by their set of UTC days, one piece per set, each with the token of its rows."""
    by_days: dict[tuple[date, ...], list[Group]] = {}
    for g in groups:
        by_days.setdefault(tuple(sorted(set(days(g)))), []).append(g)
    return [Piece(table, tuple(gs), insert_token(table, (key(r) for g in gs for r in g), map(str, d)), d)
            for d, gs in sorted(by_days.items())]


def cut_columns(table: str, data: pa.Table, keys: Sequence[str], day_column: str, plan: str,
                groups: Sequence[Sequence[int]] = ()) -> list[Piece]:
    """A plan's rows (`data`, its `keys`) as columnar pieces of at most DAYS_PER_PIECE UTC days each.

    Each row is a group of its own, except the rows of each of `groups` (positions into `data`), which stay
    together in one piece. Groups are taken in order of their days (sorted day sets; rows of one day in plan
    order) and gathered while their days' union stays within DAYS_PER_PIECE. Each piece's token is a hash of the
    table, the plan, its days and its rows' keys.
    """
    if not data.num_rows:
        return []
    day_numbers = pc.cast(pc.cast(data.column(day_column), pa.date32()), pa.int32()).to_numpy(zero_copy_only=False)
    grouped = np.zeros(data.num_rows, dtype=bool)
    cuts: dict[tuple[int, ...], list[list[int]]] = {}  # sorted day numbers → groups (lists of positions)
    for g in groups:
        grouped[list(g)] = True
        cuts.setdefault(tuple(sorted({int(day_numbers[i]) for i in g})), []).append(list(g))
    singles = np.flatnonzero(~grouped)
    if singles.size:
        order = singles[np.argsort(day_numbers[singles], kind="stable")]
        days_sorted = day_numbers[order]
        bounds = np.flatnonzero(np.diff(days_sorted)) + 1
        for chunk in np.split(order, bounds):
            cuts.setdefault((int(day_numbers[chunk[0]]),), []).extend([[int(i)] for i in chunk])
    pieces: list[Piece] = []
    current: list[list[int]] = []
    current_days: set[int] = set()
    for day_set, gs in sorted(cuts.items()):
        if current and len(current_days | set(day_set)) > DAYS_PER_PIECE:
            pieces.append(_columnar(table, data, keys, current, current_days, plan))
            current, current_days = [], set()
        current.extend(gs)
        current_days |= set(day_set)
    pieces.append(_columnar(table, data, keys, current, current_days, plan))
    return pieces


def _columnar(table: str, data: pa.Table, keys: Sequence[str], groups: list[list[int]], days: set[int],
              plan: str) -> Piece:
    positions = [i for g in groups for i in g]
    breaks: list[int] = []
    if any(len(g) > 1 for g in groups):
        at = 0
        for g in groups:
            breaks.append(at)
            at += len(g)
    piece_keys = [keys[i] for i in positions]
    piece_days = tuple(_EPOCH_DAY + timedelta(days=d) for d in sorted(days))
    return columnar_piece(table, data.take(pa.array(positions, pa.int64())), piece_keys, piece_days, plan,
                          tuple(breaks))


def columnar_piece(table: str, data: pa.Table, keys: Sequence[str], days: tuple[date, ...], plan: str,
                   breaks: tuple[int, ...] = ()) -> Piece:
    """A columnar piece with its token: a hash of table, plan, days and keys."""
    return Piece(table, (), insert_token(table, keys, (plan, *map(str, days))), days, data, tuple(keys), breaks)


def split_piece(piece: Piece, key: Callable[[dict[str, Any]], str]) -> list[Piece]:
    """Two halves of a piece ClickHouse found too large, each with the token of its own rows; groups stay whole."""
    if piece.data is not None:
        if not piece.splittable:
            raise ValueError(f"a piece of one group cannot be split ({piece.size} rows)")
        cut = piece.size // 2
        if piece.breaks:
            cut = min(piece.breaks[1:], key=lambda b: abs(b - cut))
        halves = ((0, cut), (cut, piece.size))
        return [columnar_piece(piece.table, piece.data.slice(a, b - a), piece.keys[a:b], piece.days,
                               f"{piece.token}/{n}",
                               tuple(x - a for x in piece.breaks if a <= x < b)) for n, (a, b) in enumerate(halves)]
    half = len(piece.groups) // 2
    return [Piece(piece.table, gs, insert_token(piece.table, (key(r) for g in gs for r in g),
                                                (piece.token, str(n), *map(str, piece.days))), piece.days)
            for n, gs in enumerate((piece.groups[:half], piece.groups[half:]))]


def journal_entry(pieces: Sequence[Piece]) -> str:
    """A plan's columnar pieces (all of one schema) as one Arrow IPC stream, base64: sink_journal.pieces."""
    meta = [{"table": p.table, "token": p.token, "days": [d.isoformat() for d in p.days], "rows": p.size,
             "breaks": list(p.breaks)} for p in pieces]
    data = pa.concat_tables([p.data for p in pieces if p.data is not None])
    data = data.replace_schema_metadata({JOURNAL_META: orjson.dumps(meta)})
    return base64.b64encode(ipc_stream(data)).decode("ascii")


def journaled_pieces(entry: str, schema: pa.Schema, keys_of: Callable[[pa.Table], list[str]]) -> list[Piece]:
    """The pieces of a journal entry (journal_entry), each as it was planned: same rows, token, days and breaks.

    `keys_of` gives a piece's keys from its rows (the writer's key of each row), which the entry does not repeat.
    """
    raw = decode_message(base64.b64decode(entry), schema, "a sink journal")
    meta = orjson.loads(raw.schema.metadata[JOURNAL_META])
    table = raw.replace_schema_metadata(None)
    out: list[Piece] = []
    start = 0
    for m in meta:
        data = table.slice(start, m["rows"])
        out.append(Piece(m["table"], (), m["token"], tuple(date.fromisoformat(d) for d in m["days"]), data,
                         tuple(keys_of(data)), tuple(m["breaks"])))
        start += m["rows"]
    return out
