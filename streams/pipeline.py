"""The process role's batch step: validate → enrich → encode, grouped by partition for publishing."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from streams.enrich import enrich
from streams.records import Accepted, Rejection, Source, encode_record, encode_row
from streams.validate import Validator
from tally.reference import ReferenceSnapshot


@dataclass
class ProcessedBatch:
    """What one batch of llm.usage.v1 messages turned into, as JSON lines keyed by output partition.

    Output partition = the source partition: every event of a logical request stays on one partition from
    llm.usage.v1 through llm.cost.attempts.v1, so the stages after it can keep per-request state locally.
    """

    attempts: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    accepted: int = 0
    rejected: int = 0


def process_messages(messages: Sequence[tuple[bytes | None, Source]], validator: Validator,
                     refs: ReferenceSnapshot, partitions: int | None, now: datetime) -> ProcessedBatch:
    """Validate every line of every message, enrich the good ones in one call, encode both outcomes."""
    accepted: list[Accepted] = []
    rejected: list[Rejection] = []
    for value, source in messages:
        ok, bad = validator.validate_message(value, source, partitions)
        accepted.extend(ok)
        rejected.extend(bad)
    rows, enrich_rejects = enrich(accepted, refs, now)
    rejected.extend(enrich_rejects)
    out = ProcessedBatch(accepted=len(rows), rejected=len(rejected))
    for row in rows:
        out.attempts[row["source_partition"]].append(encode_row(row))
    for rej in rejected:
        out.dead_letters[rej.source.partition if rej.source else 0].append(encode_record(rej.to_record(now)))
    return out
