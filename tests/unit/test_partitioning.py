"""Kafka-compatible murmur2 and logical-id partitioning."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.partitioning import logical_id, murmur2, partition_for, partition_for_bytes

# Apache Kafka's clients UtilsTest.testMurmur2: the Java implementation's own expected values.
KAFKA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def _i32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def java_murmur2(data: bytes) -> int:
    """A line-by-line transcription of Java's Utils.murmur2 with explicit 32-bit wrapping (slow, obvious)."""
    length = len(data)
    seed = _i32(0x9747B28C)
    m = 0x5BD1E995
    r = 24
    h = _i32(seed ^ length)
    for i in range(length // 4):
        i4 = i * 4
        k = _i32((data[i4] & 0xFF) + ((data[i4 + 1] & 0xFF) << 8) + ((data[i4 + 2] & 0xFF) << 16)
                 + ((data[i4 + 3] & 0xFF) << 24))
        k = _i32(k * m)
        k = _i32(k ^ ((k & 0xFFFFFFFF) >> r))
        k = _i32(k * m)
        h = _i32(h * m)
        h = _i32(h ^ k)
    rest = length % 4
    base = length & ~3
    if rest == 3:
        h = _i32(h ^ ((data[base + 2] & 0xFF) << 16))
    if rest >= 2:
        h = _i32(h ^ ((data[base + 1] & 0xFF) << 8))
    if rest >= 1:
        h = _i32(h ^ (data[base] & 0xFF))
        h = _i32(h * m)
    h = _i32(h ^ ((h & 0xFFFFFFFF) >> 13))
    h = _i32(h * m)
    h = _i32(h ^ ((h & 0xFFFFFFFF) >> 15))
    return h


@pytest.mark.parametrize(("data", "expected"), KAFKA_VECTORS.items(), ids=[k.decode() for k in KAFKA_VECTORS])
def test_murmur2_matches_kafka_utils_test(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected
    assert java_murmur2(data) == expected  # the transcription used as an oracle below is itself right


def test_murmur2_of_empty_input() -> None:
    assert murmur2(b"") == java_murmur2(b"")


@pytest.mark.parametrize("length", range(0, 70))
def test_murmur2_every_length_and_tail(length: int) -> None:
    data = bytes((i * 37 + 11) & 0xFF for i in range(length))
    assert murmur2(data) == java_murmur2(data)


@given(st.binary(max_size=300))
def test_murmur2_equals_the_java_transcription(data: bytes) -> None:
    h = murmur2(data)
    assert h == java_murmur2(data)
    assert -(2**31) <= h < 2**31


@given(st.binary(min_size=1, max_size=8).map(lambda b: b * 40))
def test_murmur2_high_bytes_and_repetition(data: bytes) -> None:
    assert murmur2(data) == java_murmur2(data)


@pytest.mark.parametrize(("key", "partitions", "expected"), [
    # (murmur2 & 0x7fffffff) % n, computed from the Kafka vectors: masking, not abs(), as Java does.
    ("21", 4, (-973932308 & 0x7FFFFFFF) % 4),
    ("foobar", 7, (-790332482 & 0x7FFFFFFF) % 7),
    ("abc", 12, 479470107 % 12),
    ("a-little-bit-long-string", 1, 0),
])
def test_partition_for_known_keys(key: str, partitions: int, expected: int) -> None:
    assert partition_for(key, partitions) == expected


@given(st.text(max_size=80), st.integers(min_value=1, max_value=1024))
def test_partition_for_is_masked_murmur2_of_utf8(key: str, partitions: int) -> None:
    p = partition_for(key, partitions)
    assert p == (java_murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions
    assert p == partition_for_bytes(key.encode(), partitions)
    assert 0 <= p < partitions


def test_partition_for_non_ascii_key_hashes_utf8_bytes() -> None:
    key = "requête-日本-🙂"
    assert partition_for(key, 1000) == (java_murmur2(key.encode()) & 0x7FFFFFFF) % 1000


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_for_rejects_no_partitions(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions"):
        partition_for("k", partitions)
    with pytest.raises(ValueError, match="partitions"):
        partition_for_bytes(b"k", partitions)


def test_partition_for_spreads_uuid_keys() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[partition_for(f"00000000-0000-4000-8000-{i:012d}", 8)] += 1
    assert min(counts) > 800  # ~1000 each; a broken hash would pile up


@pytest.mark.parametrize(("event", "expected"), [
    ({"request_id": "r1"}, "r1"),
    ({"request_id": "r1", "parent_request_id": "p1"}, "p1"),
    ({"request_id": "r1", "parent_request_id": None}, "r1"),
    ({"request_id": "r1", "parent_request_id": ""}, "r1"),
    ({"request_id": "r1", "parent_request_id": 7}, "r1"),
    ({"parent_request_id": "p1"}, "p1"),
])
def test_logical_id(event: dict[str, object], expected: str) -> None:
    assert logical_id(event) == expected


@pytest.mark.parametrize("event", [{}, {"request_id": ""}, {"request_id": 5}, {"parent_request_id": None}])
def test_logical_id_without_a_usable_id_raises(event: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="request_id"):
        logical_id(event)
