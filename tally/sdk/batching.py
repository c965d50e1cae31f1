"""Pure routing and packing of NDJSON event lines into partitioned Kafka message values."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from tally.partitioning import logical_id, partition_for, partition_for_bytes


def strip_line(line: bytes) -> bytes:
    """Return `line` without one trailing LF or CRLF; raises ValueError if an LF remains inside it."""
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if b"\n" in line:
        raise ValueError("an NDJSON line must not contain a newline byte except as its terminator")
    return line


def route_event(event: Mapping[str, Any], line: bytes, partitions: int) -> tuple[int, str | None]:
    """Return (partition, logical id) of an event already serialized as `line`.

    With a usable logical id the partition is partition_for(id); without one it is partition_for_bytes(line)
    (deterministic, so a bad event still reaches the pipeline and its dead-letter queue) and the id is None.
    """
    try:
        lid = logical_id(event)
    except ValueError:
        return partition_for_bytes(line, partitions), None
    return partition_for(lid, partitions), lid


def route_line(line: bytes, partitions: int) -> tuple[int, str | None]:
    """Return (partition, logical id) of one NDJSON line without its terminator; see route_event.

    A line that is not a JSON object routes like an event without a usable id.
    """
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        return partition_for_bytes(line, partitions), None
    return route_event(event, line, partitions)


def partition_of_line(line: bytes, partitions: int) -> int:
    """Return the partition of one NDJSON line without its terminator.

    That is partition_for(its logical request id), or, for a line that is not a JSON object or has no usable
    id, the deterministic partition_for_bytes(line), so the bad line still reaches the dead-letter queue.
    """
    return route_line(line, partitions)[0]


def pack_ndjson(lines: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Join lines with LF into message values of at most `max_bytes` bytes, keeping their order.

    Each input line loses one trailing LF or CRLF (strip_line); a line still holding an LF raises ValueError;
    blank lines (whitespace only) carry no event and are skipped. A line longer than `max_bytes` is yielded
    alone and unchanged, so the pipeline rejects it with a reason instead of the SDK dropping it.
    Splitting every yielded value on LF gives back the non-blank lines in order.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
    pending: list[bytes] = []
    size = 0
    for raw in lines:
        line = strip_line(raw)
        if not line.strip():
            continue
        if pending and size + 1 + len(line) > max_bytes:
            yield b"\n".join(pending)
            pending, size = [], 0
        if pending:
            size += 1 + len(line)
        else:
            size = len(line)
        pending.append(line)
    if pending:
        yield b"\n".join(pending)
