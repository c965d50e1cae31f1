"""ClickHouse access through one URL: embedded chDB (`chdb:///path`) or a server (`http(s)://…`), same code."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import urlparse

import clickhouse_connect
import pyarrow as pa
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from tally.config import SCHEMAS_DIR, Settings
from tally.errors import QueryRefused, StoreError, StoreLockedError
from tally.query_policy import check_select, parse_explain_ast

MIGRATIONS_DIR = SCHEMAS_DIR / "migrations"
log = logging.getLogger(__name__)
_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


# Every sink insert: deduplicated by its token in its table and in every view target it reaches, synchronous.
_INSERT_SETTINGS: dict[str, Any] = {
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "async_insert": 0,
}


class Saved(NamedTuple):
    """What event_ids holds of a saved event: its content hash and the sink input message that saved it."""

    content_hash: str
    origin: str


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a read-only query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


def migrations(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, str]]:
    """The numbered migration files as (number, name, SQL text), in order; numbers must be unique."""
    found: list[tuple[int, str, str]] = []
    for path in sorted(directory.glob("*.sql")):
        m = _MIGRATION_NAME.match(path.name)
        if not m:
            raise StoreError(f"{path}: migration files are named NNN_lower_snake.sql")
        found.append((int(m.group(1)), path.name, path.read_text()))
    numbers = [n for n, _, _ in found]
    if len(set(numbers)) != len(numbers):
        raise StoreError(f"duplicate migration numbers in {directory}: {numbers}")
    return found


def split_statements(sql: str) -> list[str]:
    """Split a migration into statements: drop `--` comment lines, split on `;` at line ends."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


# Characters a ClickHouse string literal cannot hold as they are, and braces (so a literal never looks like a
# {name:Type} placeholder or one of render()'s names); \xHH is a ClickHouse escape.
_LITERAL_ESCAPES = str.maketrans({"\\": "\\\\", "'": "\\'", "{": "\\x7B", "}": "\\x7D", "\n": "\\n",
                                  "\t": "\\t", "\r": "\\r", "\0": "\\0"})
_NEEDS_ESCAPE = re.compile(r"[\\'{}\n\t\r\0]")


# A lookup's text holds its ids (string_array): room for 10,000 of the longest allowed (default max_query_size 256 KiB).
LOOKUP_SETTINGS: dict[str, Any] = {"max_query_size": 64 * 1024 * 1024}
PLAN_PREFIX = "plan:"  # sink_journal.origin of the row that holds a plan's pieces (migration 012)


def string_array(values: Sequence[str]) -> str:
    """A ClickHouse Array(String) literal of `values`, to write into a query's text.

    The lookups of the sink pass thousands of ids a batch; clickhouse-connect's parameter binding escapes them
    character by character in Python (~7 µs an id under cProfile, one-off), this joins them in C and escapes only a
    value that needs it. The literal holds no brace, so it never reads as a placeholder.
    """
    if not values:
        return "CAST([], 'Array(String)')"
    joined = "','".join(values)
    if _NEEDS_ESCAPE.search(joined) is None:
        return "['" + joined + "']"
    return "[" + ",".join("'" + v.translate(_LITERAL_ESCAPES) + "'" for v in values) + "]"


class Store:
    """One ClickHouse connection. With chDB it holds an exclusive lock on the data directory.

    chDB runs the engine in-process and allows one process per data directory; a second process gets a
    StoreLockedError naming the holder's pid instead of the engine's opaque error. Not thread-safe: the sink
    calls it from one executor thread.

    API queries (`api_query`) run on connections of their own, at most `query_max_concurrent`, each safe to use
    from any one thread at a time: chDB runs queries of different connections side by side (measured: a 38 s scan
    on one, inserts on another took 9-19 ms each), so the sink's inserts never wait behind an API query.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.ch_url
        self.db = settings.database
        self._lock_file: IO[str] | None = None
        self._client: Client | None = None
        self._api_clients: queue.SimpleQueue[Client] = queue.SimpleQueue()
        self._api_opened: list[Client] = []
        self._outage = Path(settings.store_outage_flag) if settings.store_outage_flag else None  # tests only
        self._lanes: list[Store] = []
        self._id_table: bool | None = None  # whether this connection holds the temporary table lookup_ids

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb:")

    @property
    def client(self) -> Client:
        """The connection; every ClickHouse call goes through here.

        Raises StoreError while the test-only outage flag file exists (settings.store_outage_flag), as an
        unreachable server would; when the flag is not set this costs one comparison.
        """
        if self._outage is not None and self._outage.exists():
            raise StoreError(f"ClickHouse unavailable: injected outage while {self._outage.name} exists")
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Client:
        if self.embedded:
            path = Path(urlparse(self.url).path)
            path.mkdir(parents=True, exist_ok=True)
            self._lock(path)
            try:
                # An empty user_files_path: relative paths in file() find nothing (chDB still reads absolute
                # paths; readonly = 1 and the API's parser check stop those, see the README's security section).
                (path / "user_files").mkdir(exist_ok=True)
                return get_chdb_client(str(path), chdb_options={"user_files_path": str(path / "user_files")})
            except Exception as exc:
                self._unlock()
                raise StoreError(f"cannot open chDB at {path}: {exc}") from exc
        try:
            return clickhouse_connect.get_client(dsn=self.url, connect_timeout=10, send_receive_timeout=120,
                                                 **self.tls())
        except Exception as exc:
            raise StoreError(f"cannot connect to ClickHouse at {self.settings.redacted_ch_url()}: {exc}") from exc

    def _lock(self, path: Path) -> None:
        lock_path = path / "tally.lock"
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreLockedError(
                f"the chDB data directory {path} is in use by process {holder}; chDB allows one process per "
                "directory. Query through the running worker (`tally query` does this), stop it first, or run "
                "process-role workers (`tally worker --role process`) beside one sink worker.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def lane(self) -> Store:
        """Another connection to the same database, for a second sink thread; closed with this store.

        Each connection is used from one thread at a time; chDB runs statements of different connections side by
        side, so the logical-request sink's inserts do not queue behind the attempts sink's (see streams.roles.sink).
        An injected outage (store_outage_flag) fails it as it fails this store.
        """
        lane = Store(self.settings)
        if self.embedded:
            self.client  # noqa: B018 - this store's connection opens the engine (and takes the lock) first
            lane._client = get_chdb_client(urlparse(self.url).path)
        self._lanes.append(lane)
        return lane

    def _api_client(self) -> Client:
        """A connection for API queries: the API's limits and readonly = 1 are its session settings."""
        try:
            return self._api_clients.get_nowait()
        except queue.Empty:
            pass
        limits = self.settings.query_limits()
        if self.embedded:
            self.client  # noqa: B018 - the sink's connection opens the engine (and takes the lock) first
            client: Client = get_chdb_client(urlparse(self.url).path, database=self.db, settings=limits)
        else:
            try:
                timeout = int(self.settings.query_max_execution_s) + 10
                client = clickhouse_connect.get_client(dsn=self.url, database=self.db, settings=limits,
                                                       connect_timeout=10, send_receive_timeout=timeout,
                                                       **self.tls())
            except Exception as exc:
                raise StoreError(f"cannot connect to ClickHouse at {self.settings.redacted_ch_url()}: {exc}") from exc
        self._api_opened.append(client)
        return client

    def tls(self) -> dict[str, Any]:
        """clickhouse-connect's TLS arguments for an https:// server: verify it, against clickhouse_ca_file if set."""
        if not self.url.startswith("https:"):
            return {}
        ca = self.settings.clickhouse_ca_file
        return {"verify": True, **({"ca_cert": ca} if ca else {})}

    def api_query(self, sql: str) -> QueryResult:
        """Run SQL an HTTP client sent: refused (QueryRefused) unless one SELECT over this database's tables.

        Steps: the text is capped at `query_max_bytes`; ClickHouse formats it (its parser refuses a second
        statement); `EXPLAIN AST` of that one statement is checked by tally.query_policy; the formatted statement
        (not the text sent, so no comment or spelling trick survives) runs, as `SELECT * FROM (…)`, with the API's
        limits and readonly = 1.
        `{db}` is replaced by the database's name first, as in internal queries. A query cut by a limit raises
        StoreError naming the limit.
        """
        if len(sql.encode()) > self.settings.query_max_bytes:
            raise QueryRefused(f"the query is {len(sql.encode())} bytes; at most {self.settings.query_max_bytes} "
                               "are accepted")
        client = self._api_client()
        try:
            try:
                formatted = client.query("SELECT formatQuery({q:String})",
                                         parameters={"q": self.render(sql)}).result_rows[0][0]
                tree = [r[0] for r in client.query(f"EXPLAIN AST {formatted}").result_rows]
            except ClickHouseError as exc:
                raise QueryRefused(f"not a query tally accepts: {_first_line(exc)}") from exc
            check_select(parse_explain_ast(tree), self.db)
            try:
                # In an outer SELECT: ClickHouse skips the result caps of a query that reads no table at all.
                res = client.query(f"SELECT * FROM ({formatted})")
            except ClickHouseError as exc:
                raise StoreError(_first_line(exc)) from exc
            return QueryResult(list(res.column_names), [tuple(r) for r in res.result_rows])
        finally:
            self._api_clients.put(client)

    def close(self) -> None:
        """Close the clients and release the chDB directory."""
        while self._lanes:
            self._lanes.pop().close()
        while self._api_opened:
            self._api_opened.pop().close()
        self._api_clients = queue.SimpleQueue()
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
                self._id_table = None  # the temporary table went with the connection
        self._unlock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self, sql: str) -> str:
        """Substitute the migration placeholders: {db}, {dedup_window_days} and the rollup retention days."""
        s = self.settings
        for name, value in (("db", self.db), ("dedup_window_days", s.dedup_window_days),
                            ("rollup_minute_retention_days", s.rollup_minute_retention_days),
                            ("rollup_hour_retention_days", s.rollup_hour_retention_days),
                            ("rollup_day_retention_days", s.rollup_day_retention_days)):
            sql = sql.replace("{" + name + "}", str(value))
        return sql

    def command(self, sql: str, settings: dict[str, Any] | None = None) -> Any:
        try:
            return self.client.command(self.render(sql), settings=settings)
        except ClickHouseError as exc:
            raise StoreError(f"ClickHouse refused: {exc}") from exc

    def migrate(self) -> list[str]:
        """Apply the numbered migrations not yet recorded in {db}.schema_migrations; idempotent."""
        self.command("CREATE DATABASE IF NOT EXISTS {db}")
        self.command(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, "
            "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version")
        done = {int(r[0]) for r in self.client.query(self.render("SELECT version FROM {db}.schema_migrations"))
                .result_rows}
        applied: list[str] = []
        for number, name, sql in migrations():
            if number in done:
                continue
            for statement in split_statements(sql):
                self.command(statement)
            self.client.insert(f"{self.db}.schema_migrations", [[number, name]], column_names=["version", "name"])
            applied.append(name)
        for grain in ("minute", "hour", "day"):  # retention follows the settings, not the day the table was made
            self.command(f"ALTER TABLE {{db}}.rollup_{grain} MODIFY TTL bucket + INTERVAL "
                         f"{{rollup_{grain}_retention_days}} DAY")
        return applied

    def query(self, sql: str, parameters: dict[str, Any] | None = None, readonly: bool = True,
              lookup: bool = False) -> QueryResult:
        """Run one query; with readonly (the default) ClickHouse refuses anything that writes.

        `lookup`: the text holds string_array literals of thousands of ids (LOOKUP_SETTINGS).
        """
        settings = ({"readonly": 2} if readonly else {}) | (LOOKUP_SETTINGS if lookup else {})
        try:
            res = self.client.query(self.render(sql), parameters=parameters, settings=settings or None)
        except ClickHouseError as exc:
            raise StoreError(_first_line(exc)) from exc
        return QueryResult(list(res.column_names), [tuple(r) for r in res.result_rows])

    def insert_columns(self, table: str, columns: Sequence[Sequence[Any]], column_names: Sequence[str],
                       token: str) -> None:
        """Column-oriented insert with a deterministic deduplication token; synchronous (async_insert = 0)."""
        self.client.insert(
            f"{self.db}.{table}", list(columns), column_names=list(column_names), column_oriented=True,
            settings=_INSERT_SETTINGS | {"insert_deduplication_token": token})

    def insert_arrow(self, table: str, data: pa.Table, token: str) -> None:
        """insert_columns for an Arrow table: the same deterministic token and settings, one INSERT … FORMAT Arrow.

        Columns go by name, of the table's types: decimal128 for the Decimal columns, never a float. The table
        goes as one record batch: ClickHouse's deduplication id of a block depends on the token and on the chunks
        the insert arrived in, so the same rows re-sent under the same token must arrive chunked the same way.
        """
        self.client.insert_arrow(f"{self.db}.{table}", data.combine_chunks(), settings=_INSERT_SETTINGS | {
            "insert_deduplication_token": token})

    def id_set(self, values: Sequence[str]) -> str:
        """A subquery yielding `values`, for a lookup's `IN`: loaded in binary, not parsed from the query's text.

        ClickHouse parses an array literal at ~6 µs an id (3,333 ids: 21 ms of a 28 ms event_ids lookup, one-off);
        loaded as Arrow into this connection's temporary table `lookup_ids`, the same lookup takes ~10 ms. The table
        is private to the connection (each Store and lane has its own, used from one thread), made again if its
        session dropped it, emptied before each use, and the next lookup on the connection replaces it: call right
        before the query that reads it. Where a connection cannot hold a temporary table (an HTTP connection without
        a session), the literal is used.
        """
        if self._id_table is not False:
            try:  # every time: a server drops a session's temporary tables when the session expires
                self.client.command("CREATE TEMPORARY TABLE IF NOT EXISTS lookup_ids (id String) ENGINE = Memory")
                self._id_table = True
            except ClickHouseError as exc:
                if self._id_table or "session" not in str(exc).lower():
                    raise  # a passing error: the caller's lookup is retried
                log.info("lookups pass their ids as literals: no temporary table on this connection (%s)",
                         _first_line(exc))
                self._id_table = False
        if not self._id_table:
            return f"(SELECT arrayJoin({string_array(values)}))"
        self.client.command("TRUNCATE TABLE lookup_ids")
        if values:
            self.client.insert_arrow("lookup_ids", pa.table({"id": pa.array(list(values), pa.string())}))
        return "(SELECT id FROM lookup_ids)"

    def record_offsets(self, consumer: str, topic: str, offsets: dict[int, int]) -> None:
        """Store the sink's input position: per partition, the last offset whose rows ClickHouse holds."""
        if offsets:
            rows = [[consumer, topic, p, o] for p, o in sorted(offsets.items())]
            self.client.insert(f"{self.db}.sink_offsets", rows,
                               column_names=["consumer", "topic", "partition", "offset"],
                               settings={"async_insert": 0})

    def stored_offsets(self, consumer: str, topic: str) -> dict[int, int]:
        """The sink's stored input position of each partition of `topic` (partitions never written are absent)."""
        res = self.client.query(
            f"SELECT partition, max(offset) FROM {self.db}.sink_offsets "
            "WHERE consumer = {consumer:String} AND topic = {topic:String} GROUP BY partition",
            parameters={"consumer": consumer, "topic": topic})
        return {int(p): int(o) for p, o in res.result_rows}

    def saved_events(self, event_ids: Sequence[str], chunk: int = 10_000) -> dict[str, Saved]:
        """The subset of `event_ids` ClickHouse already holds (event_ids), each with its content hash and origin.

        The origin is the sink's input message that saved the event. The hash is '' for an event saved before
        migration 008, the origin '' before 011. `IN (SELECT arrayJoin(…))` builds one hash set and stays linear;
        a literal `IN {ids:Array}` of more than ~20k ids took seconds (tests/bench). Chunks bound each query's size.
        """
        found: dict[str, Saved] = {}
        for start in range(0, len(event_ids), chunk):
            res = self.client.query(
                f"SELECT event_id, max(content_hash), argMin(origin, ingested_at) FROM {self.db}.event_ids "
                f"WHERE event_id IN {self.id_set(event_ids[start:start + chunk])} "
                "GROUP BY event_id", settings=LOOKUP_SETTINGS)
            found.update((r[0], Saved(r[1], r[2])) for r in res.result_rows)
        return found

    def journal_plan(self, plan: str, origins: Sequence[str], pieces: str) -> None:
        """Journal a sink plan before its first insert (streams.pieces).

        One row per input message it covers and the row `plan:<id>` holding its pieces, in one insert (one block:
        all of it lands or none).
        """
        rows = [[o, plan, ""] for o in origins] + [[PLAN_PREFIX + plan, plan, pieces]]
        self.client.insert(f"{self.db}.sink_journal", rows, column_names=["origin", "plan", "pieces"],
                           settings=_INSERT_SETTINGS | {"insert_deduplication_token": f"sink_journal:{plan}"})

    def journaled_plans(self, origins: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
        """The journaled plans covering any of these input messages: (origin → plan id, plan id → its pieces).

        One point read of the messages; a second of the plans' rows only when a message is journaled (a replay).
        """
        if not origins:
            return {}, {}
        res = self.client.query(
            f"SELECT origin, any(plan) FROM {self.db}.sink_journal "
            f"WHERE origin IN (SELECT arrayJoin({string_array(origins)})) GROUP BY origin", settings=LOOKUP_SETTINGS)
        covered = {r[0]: r[1] for r in res.result_rows}
        if not covered:
            return {}, {}
        keys = [PLAN_PREFIX + p for p in sorted(set(covered.values()))]
        res = self.client.query(
            f"SELECT plan, any(pieces) FROM {self.db}.sink_journal "
            f"WHERE origin IN (SELECT arrayJoin({string_array(keys)})) GROUP BY plan", settings=LOOKUP_SETTINGS)
        return covered, {r[0]: r[1] for r in res.result_rows}

    def drop_completed_journal(self, consumer: str, before: datetime | None = None) -> list[str]:
        """Drop the ten-minute partitions of sink_journal whose plans are all complete; returns the dropped ones.

        A plan is complete once `consumer`'s stored position (sink_offsets) has reached every input message it
        covers: that batch is never replayed. Only partitions that ended before `before` (default: twenty minutes
        before ClickHouse's clock, which stamps planned_at) are considered, so no plan is written into one while it
        is read. A partition with any message beyond its stored position is kept (its sink may replay it), until the
        TTL. Reads the origin column only.
        """
        cutoff = ("now() - INTERVAL 20 MINUTE" if before is None
                  else f"fromUnixTimestamp64Milli({int(before.timestamp() * 1000)}, 'UTC')")
        res = self.client.query(
            "SELECT toString(toStartOfTenMinutes(j.planned_at)) AS part, countIf(j.offset >= o.next) "
            "FROM (SELECT planned_at, extract(origin, '^(.*)\\[[0-9]+\\]@[0-9]+$') AS topic, "
            "toUInt32OrZero(extract(origin, '\\[([0-9]+)\\]@[0-9]+$')) AS partition, "
            "toUInt64OrZero(extract(origin, '@([0-9]+)$')) AS offset "
            f"FROM {self.db}.sink_journal WHERE NOT startsWith(origin, '{PLAN_PREFIX}') "
            f"AND toStartOfTenMinutes(planned_at) + INTERVAL 10 MINUTE <= {cutoff}) AS j "
            "LEFT JOIN (SELECT topic, partition, max(offset) + 1 AS next "
            f"FROM {self.db}.sink_offsets WHERE consumer = {{consumer:String}} GROUP BY topic, partition) AS o "
            "ON j.topic = o.topic AND j.partition = o.partition GROUP BY part ORDER BY part",
            parameters={"consumer": consumer}, settings={"join_use_nulls": 0})  # unmatched: next = 0, pending
        done = [str(part) for part, pending in res.result_rows if not pending]
        for part in done:
            self.client.command(f"ALTER TABLE {self.db}.sink_journal DROP PARTITION '{part}'")  # the key's UTC
        return done

    def held_request_rows(self, keys: Sequence[str]) -> int:
        """How many logical_requests rows have one of these keys (logical_request_id#revision#sign)."""
        ids = sorted({k.split("#", 1)[0] for k in keys})
        res = self.client.query(
            f"SELECT count() FROM {self.db}.logical_requests "
            f"WHERE logical_request_id IN (SELECT arrayJoin({string_array(ids)})) "
            "AND concat(logical_request_id, '#', toString(revision), '#', toString(sign)) "
            f"IN (SELECT arrayJoin({string_array(keys)}))", settings=LOOKUP_SETTINGS)
        return int(res.result_rows[0][0])

    def request_heads(self, logical_ids: Sequence[str], chunk: int = 10_000
                      ) -> dict[str, tuple[int, datetime, str]]:
        """The latest revision ClickHouse holds of each of these logical requests.

        Returns id → (revision, emitted_at, attempts_detail); ids it does not hold are absent.
        """
        found: dict[str, tuple[int, datetime, str]] = {}
        for start in range(0, len(logical_ids), chunk):
            res = self.client.query(
                f"SELECT logical_request_id, revision, emitted_at, attempts_detail "
                f"FROM {self.db}.logical_request_heads "
                f"WHERE logical_request_id IN {self.id_set(logical_ids[start:start + chunk])} "
                "ORDER BY revision DESC LIMIT 1 BY logical_request_id", settings=LOOKUP_SETTINGS)
            for lid, revision, emitted_at, detail in res.result_rows:
                at = emitted_at if emitted_at.tzinfo is not None else emitted_at.replace(tzinfo=UTC)
                found[lid] = (int(revision), at, detail)
        return found


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def get_chdb_client(path: str, **kwargs: Any) -> Client:
    """A new connection to the process's chDB engine at `path` (each its own handle; any number may be open)."""
    return clickhouse_connect.get_client(dsn=f"chdb://{path}", **kwargs)


@contextmanager
def open_store(settings: Settings) -> Iterator[Store]:
    """A store that is closed (and its chDB lock released) on exit."""
    store = Store(settings)
    try:
        yield store
    finally:
        store.close()
