"""The process role's batch step: validate → enrich → encode → fold, grouped by partition for publishing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from streams.enrich import enrich
from streams.fold import Folder
from streams.fold_columns import emitted_requests
from streams.records import Accepted, Rejection, Source, encode_record, encode_row
from streams.sink_columns import REQUEST_SCHEMA, encode_table, rows_table
from streams.validate import Validator
from tally.partitioning import partition_for
from tally.reference import ReferenceSnapshot


@dataclass
class ProcessedBatch:
    """What one batch of llm.usage.v1 messages turned into, as JSON lines keyed by output partition.

    Attempts keep the source partition: every event of a logical request stays on one partition from llm.usage.v1
    through llm.cost.attempts.v1, so the fold can keep per-request state locally. Logical requests go to the
    partition of their feature_id on llm.cost.requests.v1. `fold_writes` are the fold's state changes, applied by
    the caller after the rows are published.
    """

    attempts: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    # With the Arrow hand-off, attempts and logical requests come as whole messages (Arrow IPC) per partition.
    attempt_messages: dict[int, list[bytes]] = field(default_factory=dict)
    request_messages: dict[int, list[bytes]] = field(default_factory=dict)
    request_rows: int = 0
    dead_letters: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    fold_writes: dict[bytes, bytes | None] = field(default_factory=dict)
    accepted: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)  # the dead letters' reason codes (metrics)


@dataclass(frozen=True)
class FoldStep:
    """The fold's inputs for one batch: the folder, its durable state, and the requests topic's partition count."""

    folder: Folder
    state: Mapping[bytes, bytes]
    request_partitions: int


def group_requests(rows: Iterable[dict[str, Any]], partitions: int) -> dict[int, list[bytes]]:
    """Encoded logical-request rows keyed by the partition of their feature_id (llm.cost.requests.v1)."""
    out: dict[int, list[bytes]] = defaultdict(list)
    for row in rows:
        out[partition_for(row["feature_id"], partitions)].append(encode_row(row))
    return out


def request_messages(rows: Sequence[dict[str, Any]], partitions: int, max_bytes: int) -> dict[int, list[bytes]]:
    """Logical-request rows as Arrow messages (REQUEST_SCHEMA) keyed by the partition of their feature_id."""
    table = rows_table(rows, REQUEST_SCHEMA)
    return {p: encode_table(part, max_bytes)
            for p, part in by_key(table, feature_partitions([r["feature_id"] for r in rows], partitions)).items()}


def feature_partitions(features: Iterable[str], partitions: int) -> list[int]:
    """The llm.cost.requests.v1 partition of each feature_id (a batch holds few features: each is hashed once)."""
    of_feature: dict[str, int] = {}
    out: list[int] = []
    for feature in features:
        partition = of_feature.get(feature)
        if partition is None:
            partition = of_feature[feature] = partition_for(feature, partitions)
        out.append(partition)
    return out


def by_key(table: pa.Table, keys: Sequence[int] | np.ndarray, order: np.ndarray | None = None) -> dict[int, pa.Table]:
    """A table's rows grouped by a key, in order within a group, groups in order of first appearance.

    `keys[i]` is the key of the i-th row taken: row i of the table, or with `order`, row `order[i]`. Rows whose keys
    come in long runs (attempts: one input message after the other) are sliced, not copied; otherwise they are
    copied once, in one take, and sliced per key.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0:
        return {}
    if order is None:
        starts = np.flatnonzero(np.diff(keys, prepend=keys[0] - 1))  # where each run of one key starts
        if len(starts) <= _MAX_RUNS:
            ends = [*starts[1:].tolist(), len(keys)]
            runs: dict[int, list[pa.Table]] = {}
            for start, end in zip(starts.tolist(), ends, strict=True):
                runs.setdefault(int(keys[start]), []).append(table.slice(start, end - start))
            return {key: parts[0] if len(parts) == 1 else pa.concat_tables(parts) for key, parts in runs.items()}
        order = np.arange(len(keys))
    first_seen = dict.fromkeys(keys.tolist())  # keys in order of first appearance
    rank = {key: r for r, key in enumerate(first_seen)}
    ranks = np.fromiter((rank[k] for k in keys.tolist()), np.int64, len(keys))
    grouped = table.take(pa.array(order[np.argsort(ranks, kind="stable")]))
    counts = np.bincount(ranks, minlength=len(rank))
    out: dict[int, pa.Table] = {}
    start = 0
    for key, count in zip(first_seen, counts.tolist(), strict=True):
        out[key] = grouped.slice(start, count)
        start += count
    return out


_MAX_RUNS = 64  # beyond this many runs of one key, rows are copied into groups instead of sliced


def process_messages(messages: Sequence[tuple[bytes | None, Source]], validator: Validator,
                     refs: ReferenceSnapshot, partitions: int | None, now: datetime,
                     fold: FoldStep | None = None, wall: float = 0.0,
                     arrow_message_bytes: int | None = None) -> ProcessedBatch:
    """Validate every line of every message, enrich the good ones in one call, encode both outcomes, fold.

    `now` is the ingest time: the validator compares event timestamps with it (future_timestamp), and it is stamped
    as `ingested_at` and on dead letters. With `arrow_message_bytes`, attempts are encoded as Arrow IPC messages of
    at most that size (streams.sink_columns) into `attempt_messages`, logical requests likewise into
    `request_messages`; else both as NDJSON lines.
    """
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    for value, source in messages:
        ok, bad = validator.validate_message(value, source, partitions, now=now)
        accepted.extend(ok)
        rejected.extend(bad)
    rows, enrich_rejects = enrich(accepted, refs, now)
    rejected.extend(enrich_rejects)
    out = ProcessedBatch(accepted=len(rows), rejected=len(rejected))
    if arrow_message_bytes is None:
        for row in rows:
            out.attempts[row["source_partition"]].append(encode_row(row))
    else:
        attempts = rows_table(rows)  # the batch's attempts as one table: the hand-off and the fold's singles read it
        out.attempt_messages = {p: encode_table(part, arrow_message_bytes)
                                for p, part in by_key(attempts, attempts["source_partition"].to_pylist()).items()}
    for rej in rejected:
        out.dead_letters[rej.source.partition if rej.source else 0].append(encode_record(rej.to_record(now)))
        out.reasons.append(rej.reason)
    if fold is not None:
        result = fold.folder.fold(rows, fold.state, wall, now, singles=arrow_message_bytes is not None)
        out.request_rows = result.count
        if arrow_message_bytes is None:
            out.requests = group_requests(result.emitted, fold.request_partitions)
        else:
            requests, order = emitted_requests(result, attempts, now)
            keys = np.asarray(feature_partitions(requests["feature_id"].to_pylist(), fold.request_partitions))
            out.request_messages = {p: encode_table(part, arrow_message_bytes)
                                    for p, part in by_key(requests, keys[order], order).items()}
        out.fold_writes = result.writes
    return out
