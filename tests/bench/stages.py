"""Stage 1: validate + enrich + price + encode, and the sink's decode + ClickHouse write, in process, per event."""

from __future__ import annotations

import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.detect import DETECT_COLUMNS, DetectConfig, Detector
from streams.enrich import enrich
from streams.fold import FoldConfig, Folder, apply_writes
from streams.pipeline import FoldStep, process_messages
from streams.records import ATTEMPT_COLUMNS, COST_COLUMNS, TIME_COLUMNS, Source, encode_row
from streams.roles.context import OUTPUT_MESSAGE_BYTES
from streams.sink import ATTEMPT_ROWS, REQUEST_ROWS, RequestWriter, RowShape, SinkWriter, decode_batch, decode_rows
from streams.sink_columns import (
    REQUEST_SCHEMA,
    SINK_SCHEMA,
    ArrowPart,
    arrow_part,
    decode_attempt_message,
    decode_message,
    encode_attempt_rows,
)
from streams.validate import Validator
from tally.config import Settings
from tally.partitioning import partition_for
from tally.reference import snapshot_of
from tally.sdk.batching import pack_ndjson, partition_of_line
from tally.store import Store
from tests.bench.common import EventPool, reference_docs

MESSAGE_EVENTS = 500


def _messages(pool: EventPool, count: int, partitions: int) -> list[tuple[bytes | None, Source]]:
    """`count` events grouped by partition (partition_of_line) and packed 500 lines to a message."""
    by_partition: dict[int, list[bytes]] = defaultdict(list)
    for n in range(count):
        line = pool.item(n)[0]
        by_partition[partition_of_line(line, partitions)].append(line)
    out: list[tuple[bytes | None, Source]] = []
    for partition, lines in sorted(by_partition.items()):
        for offset, start in enumerate(range(0, len(lines), MESSAGE_EVENTS)):
            (value,) = pack_ndjson(lines[start:start + MESSAGE_EVENTS], 8 * 1024 * 1024)
            out.append((value, Source("bench.llm.usage.v1", partition, offset)))
    return out


def measure_stages(pool: EventPool, count: int, partitions: int, repeats: int = 3) -> dict[str, Any]:
    """µs per event of each step and of process_messages as a whole (median of `repeats` passes)."""
    messages = _messages(pool, count, partitions)
    validator = Validator()
    refs = snapshot_of(reference_docs())
    now = datetime.now(UTC)
    validate_s: list[float] = []
    enrich_s: list[float] = []
    encode_s: list[float] = []
    whole_s: list[float] = []
    fold_s: list[float] = []
    folded_s: list[float] = []
    arrow_s: list[float] = []
    detect_s: list[float] = []
    request_rows = 0
    accepted_n = rejected_n = emitted_n = writes_n = multi_n = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        accepted = []
        for value, source in messages:
            ok, _bad = validator.validate_message(value, source, partitions, now=now)
            accepted.extend(ok)
        t1 = time.perf_counter()
        rows, _rej = enrich(accepted, refs, now)
        t2 = time.perf_counter()
        for row in rows:
            encode_row(row)
        t3 = time.perf_counter()
        out = process_messages(messages, validator, refs, partitions, now)
        t4 = time.perf_counter()
        folder, state = Folder(FoldConfig(), partitions), {}
        res = folder.fold(rows, state, time.time(), now)
        t5 = time.perf_counter()
        process_messages(messages, validator, refs, partitions, now,
                         FoldStep(Folder(FoldConfig(), partitions), {}, partitions), time.time())
        t6 = time.perf_counter()
        # what the process role runs: Arrow hand-off, the fold's singles built from columns
        handed = process_messages(messages, validator, refs, partitions, now,
                                  FoldStep(Folder(FoldConfig(), partitions), {}, partitions), time.time(),
                                  OUTPUT_MESSAGE_BYTES)
        t7 = time.perf_counter()
        detector = Detector(DetectConfig())
        for partition, values in handed.request_messages.items():
            for value in values:
                table = decode_message(value, REQUEST_SCHEMA, "llm.cost.requests.v1")
                detector.observe_table(table.select(list(DETECT_COLUMNS)), partition)
        t8 = time.perf_counter()
        request_rows = handed.request_rows
        arrow_s.append(t7 - t6)
        detect_s.append(t8 - t7)
        validate_s.append(t1 - t0)
        enrich_s.append(t2 - t1)
        encode_s.append(t3 - t2)
        whole_s.append(t4 - t3)
        fold_s.append(t5 - t4)
        folded_s.append(t6 - t5)
        emitted_n, writes_n = len(res.emitted), len(res.writes)
        multi_n = sum(1 for r in res.emitted if r["attempts"] > 1)
        accepted_n, rejected_n = out.accepted, out.rejected
    if accepted_n != count:
        raise RuntimeError(f"process_messages accepted {accepted_n} of {count} events ({rejected_n} rejected)")

    def per_event(samples: list[float]) -> float:
        return round(statistics.median(samples) / count * 1e6, 2)

    whole = per_event(whole_s)
    return {
        "events": count,
        "messages": len(messages),
        "repeats": repeats,
        "validate_us": per_event(validate_s),
        "enrich_price_us": per_event(enrich_s),
        "encode_us": per_event(encode_s),
        "process_messages_us": whole,
        "process_messages_events_per_s": round(1e6 / whole),
        "fold_us": per_event(fold_s),
        "fold_logical_requests": emitted_n,
        "fold_multi_attempt_share": round(multi_n / max(emitted_n, 1), 3),
        "fold_state_writes_per_event": round(writes_n / count, 4),
        "process_with_fold_us": per_event(folded_s),
        "process_with_fold_events_per_s": round(1e6 / per_event(folded_s)),
        "process_arrow_us": per_event(arrow_s),
        "process_arrow_events_per_s": round(1e6 / per_event(arrow_s)),
        "detect_us": per_event(detect_s),
        "detect_us_per_request": round(statistics.median(detect_s) / max(request_rows, 1) * 1e6, 2),
    }


def measure_sink(pool: EventPool, count: int, partitions: int, batch_rows: int = 10_000,
                 lookup_sizes: tuple[int, ...] = (10_000, 20_000, 30_000)) -> dict[str, Any]:
    """The sink's per-row cost in process (embedded chDB in a temporary directory, no Kafka), both paths.

    The process stage's attempt rows in 400-line messages, in batches of about `batch_rows` rows; each batch is
    decoded and written by the row path (decode_batch(columnar=False): dicts with Decimal costs, made Arrow at
    the insert) and then by the columnar path (Arrow tables, insert_arrow), into two databases of one chDB, so both
    see the same load. Logical-request rows (row path only); then the already-saved lookup alone for batches of
    fresh ids of each size in `lookup_sizes` against the rows just written (what every sink batch pays first).
    """
    messages = _messages(pool, count, partitions)
    out = process_messages(messages, Validator(), snapshot_of(reference_docs()), partitions, datetime.now(UTC),
                           FoldStep(Folder(FoldConfig(), partitions), {}, partitions), time.time())
    values = _values(out.attempts)
    requests, request_bytes, request_decode_s = _decoded(out.requests, REQUEST_ROWS)
    per_batch = max(1, batch_rows // SINK_MESSAGE_LINES)
    attempts = [[(v, Source("llm.cost.attempts.v1", 0, start + n))
                 for n, v in enumerate(values[start:start + per_batch])] for start in range(0, len(values), per_batch)]
    rows_n = sum(v.count(b"\n") + 1 for v in values)
    result: dict[str, Any] = {"rows": rows_n, "attempt_line_bytes": round(sum(map(len, values)) / rows_n),
                              "write_batch_rows": per_batch * SINK_MESSAGE_LINES,
                              "requests": len(requests), "request_line_bytes": round(request_bytes / len(requests)),
                              "request_decode_us": round(request_decode_s / len(requests) * 1e6, 2)}
    # The Arrow hand-off: the same rows as the process role publishes them by default (Arrow IPC messages of up to
    # OUTPUT_MESSAGE_BYTES), in batches of about the same number of rows.
    arrow_out = process_messages(messages, Validator(), snapshot_of(reference_docs()), partitions, datetime.now(UTC),
                                 FoldStep(Folder(FoldConfig(), partitions), {}, partitions), time.time(),
                                 OUTPUT_MESSAGE_BYTES)
    arrow_values = [m for ms in arrow_out.attempt_messages.values() for m in ms]
    arrow_requests = [(m, Source("llm.cost.requests.v1", 0, n)) for n, m in enumerate(
        m for ms in arrow_out.request_messages.values() for m in ms)]
    arrow_rows = [decode_attempt_message(v).num_rows for v in arrow_values]
    arrow_batches: list[list[tuple[bytes | None, Source]]] = [[]]
    in_batch = 0
    for n, (v, k) in enumerate(zip(arrow_values, arrow_rows, strict=True)):
        if in_batch and in_batch + k > per_batch * SINK_MESSAGE_LINES:
            arrow_batches.append([])
            in_batch = 0
        arrow_batches[-1].append((v, Source("llm.cost.attempts.v1", 0, n)))
        in_batch += k
    result.update({"arrow_messages": len(arrow_values),
                   "arrow_rows_per_message": round(sum(arrow_rows) / len(arrow_values)),
                   "arrow_bytes_per_row": round(sum(len(v) for v in arrow_values) / sum(arrow_rows), 1)})
    plain = [row for v in values for row in decode_rows(v, Source("llm.cost.attempts.v1", 0, 0))[0]]
    for row in plain:
        row.pop("origin")
    t0 = time.perf_counter()
    for row in plain:
        encode_row(row)
    t1 = time.perf_counter()
    encode_attempt_rows(plain, OUTPUT_MESSAGE_BYTES)
    t2 = time.perf_counter()
    result.update({"encode_json_us": round((t1 - t0) / len(plain) * 1e6, 2),
                   "encode_arrow_us": round((t2 - t1) / len(plain) * 1e6, 2)})
    spent = dict.fromkeys(("decode_us", "write_us", "columnar_decode_us", "columnar_write_us", "arrow_decode_us",
                           "arrow_write_us"), 0.0)
    with tempfile.TemporaryDirectory(prefix="tally-bench-sink-") as tmp:
        store = Store(Settings(data_dir=Path(tmp)))
        columnar_store = Store(Settings(data_dir=Path(tmp), database="tally_columnar"))
        columnar_store._client = store.client  # one chDB engine per process: the same connection, another database
        arrow_store = Store(Settings(data_dir=Path(tmp), database="tally_arrow"))
        arrow_store._client = store.client
        try:
            store.migrate()
            columnar_store.migrate()
            arrow_store.migrate()
            writer, columnar_writer = SinkWriter(store), SinkWriter(columnar_store)
            arrow_writer = SinkWriter(arrow_store)
            for batch in attempts:
                for columnar, w, keys in ((False, writer, ("decode_us", "write_us")),
                                          (True, columnar_writer, ("columnar_decode_us", "columnar_write_us"))):
                    t0 = time.perf_counter()
                    rows, _ = decode_batch(batch, ATTEMPT_ROWS, columnar=columnar)
                    t1 = time.perf_counter()
                    w.write(rows)
                    spent[keys[0]] += t1 - t0
                    spent[keys[1]] += time.perf_counter() - t1
            for batch in arrow_batches:
                t0 = time.perf_counter()
                rows, _ = decode_batch(batch, ATTEMPT_ROWS)
                t1 = time.perf_counter()
                arrow_writer.write(rows)
                spent["arrow_decode_us"] += t1 - t0
                spent["arrow_write_us"] += time.perf_counter() - t1
            result.update({k: round(v / rows_n * 1e6, 2) for k, v in spent.items()})
            held = [int(st.client.query(f"SELECT count() FROM {st.settings.database}.usage_events").result_rows[0][0])
                    for st in (store, arrow_store)]
            result["arrow_rows_equal"] = held[0] == held[1] == rows_n
            result["columnar_fast_share"] = _fast_share(attempts)
            request_writer = RequestWriter(store)
            t0 = time.perf_counter()
            for start in range(0, len(requests), batch_rows):
                request_writer.write(requests[start:start + batch_rows])
            result["request_write_us"] = round((time.perf_counter() - t0) / len(requests) * 1e6, 2)
            # whole messages per batch, about batch_rows rows each, as the sink takes them
            per_message = max(1, round(batch_rows / (len(requests) / len(arrow_requests))))
            arrow_request_writer = RequestWriter(arrow_store)
            decode_s = write_s = 0.0
            arrow_request_n = 0
            for start in range(0, len(arrow_requests), per_message):
                t0 = time.perf_counter()
                arrow_request_rows, _ = decode_batch(arrow_requests[start:start + per_message], REQUEST_ROWS)
                t1 = time.perf_counter()
                arrow_request_writer.write(arrow_request_rows)
                decode_s += t1 - t0
                write_s += time.perf_counter() - t1
                arrow_request_n += len(arrow_request_rows)
            held_requests = arrow_store.query("SELECT sum(sign) FROM {db}.logical_requests").rows[0][0]
            result.update({"arrow_request_messages": len(arrow_requests),
                           "arrow_request_decode_us": round(decode_s / arrow_request_n * 1e6, 2),
                           "arrow_request_write_us": round(write_s / arrow_request_n * 1e6, 2),
                           "arrow_request_rows_equal": arrow_request_n == held_requests == len(requests)})
            lookups: dict[str, float] = {}
            for size in lookup_sizes:
                fresh = [f"ev-lookup-{uuid.uuid4().hex}" for _ in range(size)]
                t0 = time.perf_counter()
                store.saved_events(fresh)
                lookups[str(size)] = round(time.perf_counter() - t0, 2)
            result["lookup_s_by_ids"] = lookups
        finally:
            columnar_store._client = None
            arrow_store._client = None
            store.close()
    result["decoders_us"] = measure_sink_decoders(values)
    return result


def _fast_share(batches: list[list[tuple[bytes | None, Source]]]) -> float:
    """The share of attempt messages the columnar fast path took (the rest went the precise way)."""
    parts = [p for b in batches for p in decode_batch(b, ATTEMPT_ROWS)[0].parts]  # type: ignore[attr-defined]
    return round(sum(isinstance(p, ArrowPart) for p in parts) / max(len(parts), 1), 3)


def measure_sink_decoders(values: list[bytes], repeats: int = 3) -> dict[str, float]:
    """µs per attempt row of each way to decode the sink's messages, interleaved, median of `repeats` passes.

    precise: decode_rows (dicts, Decimal, datetime); orjson_columns: arrow_part, what the sink uses (orjson per
    line, exact key check, Arrow columns); pyarrow_json: pyarrow.json.read_json of the message with an explicit
    schema (money and times as strings, tags and tool_calls inferred as structs) — parsing only, without the exact
    key check it cannot make (a missing Nullable column reads as null) nor maps; msgspec: a typed decode of the
    message's lines into structs, then columns (only if msgspec is installed; tally does not depend on it).
    """
    import io

    import pyarrow as pa
    import pyarrow.json as pj

    source = Source("llm.cost.attempts.v1", 0, 0)
    rows_n = sum(v.count(b"\n") + 1 for v in values)
    text = {c: pa.string() for c in (*COST_COLUMNS, *TIME_COLUMNS)}
    schema = pa.schema([(f.name, text.get(f.name, f.type)) for f in SINK_SCHEMA
                        if f.name in ATTEMPT_COLUMNS and f.name not in ("tags", "tool_calls")])
    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
    read = pj.ReadOptions(use_threads=False, block_size=8 << 20)
    ways: dict[str, Any] = {
        "precise": lambda v: decode_rows(v, source),
        "orjson_columns": lambda v: arrow_part(v, source, "o"),
        "pyarrow_json": lambda v: pj.read_json(io.BytesIO(v), read_options=read, parse_options=parse),
    }
    try:
        import msgspec

        kinds = {**dict.fromkeys((*COST_COLUMNS, *TIME_COLUMNS), str), "tags": dict[str, str],
                 "tool_calls": dict[str, int], "stream_terminated_at_token_n": int | None, "latency_ms": int | None}
        pytypes = {pa.string(): str, pa.bool_(): bool}
        fields = [(c, kinds.get(c) or pytypes.get(SINK_SCHEMA.field(c).type, int)) for c in ATTEMPT_COLUMNS]
        decoder = msgspec.json.Decoder(list[msgspec.defstruct("Row", fields, forbid_unknown_fields=True)])  # type: ignore[misc]

        def with_msgspec(v: bytes) -> list[list[Any]]:
            rows = decoder.decode(b"[" + b",".join(line for line in v.split(b"\n") if line) + b"]")
            return [[getattr(r, c) for r in rows] for c in ATTEMPT_COLUMNS]

        ways["msgspec"] = with_msgspec
    except ImportError:
        pass
    spent: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            t0 = time.perf_counter()
            for v in values:
                way(v)
            spent[name].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) / rows_n * 1e6, 2) for k, v in spent.items()}


SINK_MESSAGE_LINES = 400


def _values(lines_by_partition: dict[int, list[bytes]]) -> list[bytes]:
    """A stage's output as the sink reads it: messages of SINK_MESSAGE_LINES lines."""
    return [b"\n".join(lines[i:i + SINK_MESSAGE_LINES]) for lines in lines_by_partition.values()
            for i in range(0, len(lines), SINK_MESSAGE_LINES)]


def _decoded(lines_by_partition: dict[int, list[bytes]], shape: RowShape) -> tuple[list[dict[str, Any]], int, float]:
    """Decode a stage's output as the sink does (400-line messages): rows, total line bytes, seconds spent."""
    values = _values(lines_by_partition)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for offset, value in enumerate(values):
        rows.extend(decode_rows(value, Source("bench", 0, offset), shape)[0])
    return rows, sum(map(len, values)), time.perf_counter() - t0


def priced_rows(pool: EventPool, partitions: int, now: datetime, events: int = 2000) -> list[dict[str, Any]]:
    """The first `events` pool events validated, enriched and priced: attempt rows as the fold receives them."""
    validator = Validator()
    accepted = [a for v, s in _messages(pool, events, partitions)
                for a in validator.validate_message(v, s, partitions, now=now)[0]]
    rows, _ = enrich(accepted, snapshot_of(reference_docs()), now)
    return rows


def open_request_rows(template: list[dict[str, Any]], start: int, stop: int, partitions: int
                      ) -> list[dict[str, Any]]:
    """Requests `start`..`stop` that stay open: one non-final attempt each, copied from the priced `template`."""
    rows = []
    for n in range(start, stop):
        r = dict(template[n % len(template)])
        lid = f"open-{n:07d}-{r['logical_request_id']}"
        r.update(logical_request_id=lid, event_id=f"ev-open-{n}", final=False,
                 source_partition=partition_for(lid, partitions))
        rows.append(r)
    return rows


def measure_fold_memory(pool: EventPool, in_flight: int = 100_000, batch: int = 10_000) -> dict[str, Any]:
    """Memory held by `in_flight` open logical requests: the fold state (the bytes a Faust memory store keeps per
    key, here a dict) plus the folder's heaps, measured with tracemalloc; and the fold's cost per open request.

    Each request is one non-final attempt, priced from a pool event (real tags and sizes), so it stays open.
    """
    now = datetime.now(UTC)
    partitions = 4
    template = priced_rows(pool, partitions, now)
    folder, state = Folder(FoldConfig(), partitions), {}
    rows = open_request_rows(template, 0, in_flight, partitions)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch):
        res = folder.fold(rows[start:start + batch], state, time.time(), now)
        apply_writes(state, res.writes)
    elapsed = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    if len(state) != in_flight:
        raise RuntimeError(f"expected {in_flight} open requests, state holds {len(state)}")
    return {"in_flight": in_flight, "state_mib": round(held / 2**20, 1),
            "state_bytes_per_request": round(held / in_flight),
            "value_bytes_per_request": round(sum(map(len, state.values())) / in_flight),
            "fold_open_us": round(elapsed / in_flight * 1e6, 2)}
