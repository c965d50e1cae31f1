"""Kafka-compatible key partitioning: murmur2 as Java clients and librdkafka's murmur2_random compute it."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF

# Little-endian 32-bit word unpackers by word count, built on first use (keys are short; a few lengths recur).
_WORDS: dict[int, Callable[[bytes], tuple[int, ...]]] = {}


def _unpacker(words: int) -> Callable[[bytes], tuple[int, ...]]:
    unpack = _WORDS[words] = struct.Struct(f"<{words}I").unpack_from
    return unpack


def _murmur2_u32(data: bytes, m: int = _M, mask: int = _MASK, words: dict[int, Any] = _WORDS) -> int:
    n = len(data)
    h = _SEED ^ n
    tail = n & 3
    unpack = words.get(n >> 2) or _unpacker(n >> 2)
    # Java works on wrapping 32-bit ints; masking the xor of two products once equals masking each product.
    for word in unpack(data):
        k = word * m & mask
        h = (h * m ^ (k ^ k >> 24) * m) & mask
    if tail:
        t = n - tail
        if tail == 3:
            h ^= data[t + 2] << 16
        if tail >= 2:
            h ^= data[t + 1] << 8
        h = (h ^ data[t]) * m & mask
    h ^= h >> 13
    h = h * m & mask
    return h ^ h >> 15


def murmur2(data: bytes) -> int:
    """Return the signed 32-bit murmur2 hash of `data`, equal to Java's `Utils.murmur2(data)`."""
    h = _murmur2_u32(data)
    return h - 0x100000000 if h & 0x80000000 else h


def partition_for(key: str, partitions: int) -> int:
    """Return the partition of a UTF-8 `key` among `partitions`: `(murmur2(key) & 0x7fffffff) % partitions`.

    This is where Java's default partitioner and librdkafka's murmur2/murmur2_random put a keyed message.
    Raises ValueError when `partitions` < 1.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return (_murmur2_u32(key.encode()) & 0x7FFFFFFF) % partitions


def partition_for_bytes(data: bytes, partitions: int) -> int:
    """Return `(murmur2(data) & 0x7fffffff) % partitions` for a raw byte key; see partition_for."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return (_murmur2_u32(data) & 0x7FFFFFFF) % partitions


def logical_id(event: Mapping[str, Any]) -> str:
    """Return the logical request id of an event: parent_request_id when a non-empty string, else request_id.

    Raises ValueError when neither is a non-empty string.
    """
    parent = event.get("parent_request_id")
    if parent and isinstance(parent, str):
        return parent
    request = event.get("request_id")
    if request and isinstance(request, str):
        return request
    raise ValueError("event has neither a parent_request_id nor a request_id that is a non-empty string")
