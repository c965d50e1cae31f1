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

from streams.enrich import enrich
from streams.fold import FoldConfig, Folder, apply_writes
from streams.pipeline import FoldStep, process_messages
from streams.records import Source, encode_row
from streams.sink import ATTEMPT_ROWS, REQUEST_ROWS, RequestWriter, RowShape, SinkWriter, decode_rows
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
    }


def measure_sink(pool: EventPool, count: int, partitions: int, batch_rows: int = 10_000,
                 lookup_sizes: tuple[int, ...] = (10_000, 20_000, 30_000)) -> dict[str, Any]:
    """The sink's per-row cost in process (embedded chDB in a temporary directory, no Kafka).

    decode_rows over the process stage's output, SinkWriter.write (lookup + column insert) in batches of
    `batch_rows`, then the already-saved lookup alone for batches of fresh ids of each size in `lookup_sizes`
    against the `count` rows just written (that lookup is what every sink batch pays first).
    """
    messages = _messages(pool, count, partitions)
    out = process_messages(messages, Validator(), snapshot_of(reference_docs()), partitions, datetime.now(UTC),
                           FoldStep(Folder(FoldConfig(), partitions), {}, partitions), time.time())
    rows, line_bytes, decode_s = _decoded(out.attempts, ATTEMPT_ROWS)
    requests, request_bytes, request_decode_s = _decoded(out.requests, REQUEST_ROWS)
    result: dict[str, Any] = {"rows": len(rows), "attempt_line_bytes": round(line_bytes / len(rows)),
                              "decode_us": round(decode_s / len(rows) * 1e6, 2), "write_batch_rows": batch_rows,
                              "requests": len(requests), "request_line_bytes": round(request_bytes / len(requests)),
                              "request_decode_us": round(request_decode_s / len(requests) * 1e6, 2)}
    with tempfile.TemporaryDirectory(prefix="tally-bench-sink-") as tmp:
        store = Store(Settings(data_dir=Path(tmp)))
        try:
            store.migrate()
            writer = SinkWriter(store)
            t0 = time.perf_counter()
            for start in range(0, len(rows), batch_rows):
                writer.write(rows[start:start + batch_rows])
            result["write_us"] = round((time.perf_counter() - t0) / len(rows) * 1e6, 2)
            request_writer = RequestWriter(store)
            t0 = time.perf_counter()
            for start in range(0, len(requests), batch_rows):
                request_writer.write(requests[start:start + batch_rows])
            result["request_write_us"] = round((time.perf_counter() - t0) / len(requests) * 1e6, 2)
            lookups: dict[str, float] = {}
            for size in lookup_sizes:
                fresh = [f"ev-lookup-{uuid.uuid4().hex}" for _ in range(size)]
                t0 = time.perf_counter()
                store.saved_events(fresh)
                lookups[str(size)] = round(time.perf_counter() - t0, 2)
            result["lookup_s_by_ids"] = lookups
        finally:
            store.close()
    return result


def _decoded(lines_by_partition: dict[int, list[bytes]], shape: RowShape) -> tuple[list[dict[str, Any]], int, float]:
    """Decode a stage's output as the sink does (400-line messages): rows, total line bytes, seconds spent."""
    values = [b"\n".join(lines[i:i + 400]) for lines in lines_by_partition.values()
              for i in range(0, len(lines), 400)]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for offset, value in enumerate(values):
        rows.extend(decode_rows(value, Source("bench", 0, offset), shape)[0])
    return rows, sum(map(len, values)), time.perf_counter() - t0


def measure_fold_memory(pool: EventPool, in_flight: int = 100_000, batch: int = 10_000) -> dict[str, Any]:
    """Memory held by `in_flight` open logical requests: the fold state (the bytes a Faust memory store keeps per
    key, here a dict) plus the folder's heaps, measured with tracemalloc; and the fold's cost per open request.

    Each request is one non-final attempt, priced from a pool event (real tags and sizes), so it stays open.
    """
    refs = snapshot_of(reference_docs())
    now = datetime.now(UTC)
    validator = Validator()
    accepted = [a for v, s in _messages(pool, 2000, 4) for a in validator.validate_message(v, s, 4, now=now)[0]]
    template, _ = enrich(accepted, refs, now)
    partitions = 4
    folder, state = Folder(FoldConfig(), partitions), {}
    rows = []
    for n in range(in_flight):
        r = dict(template[n % len(template)])
        lid = f"open-{n:07d}-{r['logical_request_id']}"
        r.update(logical_request_id=lid, event_id=f"ev-open-{n}", final=False,
                 source_partition=partition_for(lid, partitions))
        rows.append(r)
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
