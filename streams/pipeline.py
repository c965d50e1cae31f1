"""The process role's batch step: validate → enrich → encode → fold, grouped by partition for publishing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.enrich import enrich
from streams.fold import Folder
from streams.records import Accepted, Rejection, Source, encode_record, encode_row
from streams.sink_columns import REQUEST_SCHEMA, encode_attempt_rows, encode_rows
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


def request_messages(rows: Iterable[dict[str, Any]], partitions: int, max_bytes: int) -> dict[int, list[bytes]]:
    """Logical-request rows as Arrow messages (REQUEST_SCHEMA) keyed by the partition of their feature_id."""
    by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_partition[partition_for(row["feature_id"], partitions)].append(row)
    return {p: encode_rows(group, REQUEST_SCHEMA, max_bytes) for p, group in by_partition.items()}


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
        by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_partition[row["source_partition"]].append(row)
        out.attempt_messages = {p: encode_attempt_rows(group, arrow_message_bytes)
                                for p, group in by_partition.items()}
    for rej in rejected:
        out.dead_letters[rej.source.partition if rej.source else 0].append(encode_record(rej.to_record(now)))
    if fold is not None:
        result = fold.folder.fold(rows, fold.state, wall, now)
        out.request_rows = len(result.emitted)
        if arrow_message_bytes is None:
            out.requests = group_requests(result.emitted, fold.request_partitions)
        else:
            out.request_messages = request_messages(result.emitted, fold.request_partitions, arrow_message_bytes)
        out.fold_writes = result.writes
    return out
