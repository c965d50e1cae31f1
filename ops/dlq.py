"""Dead-letter tools: read llm.usage.dlq.v1, summarize it, and replay (optionally edited) lines to the input topic."""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from ops.kafka_admin import end_offsets
from tally.errors import TallyError
from tally.kafka_auth import KafkaAuth, rdkafka_conf


@dataclass(frozen=True)
class DeadLetter:
    """One DLQ record plus where it sits in the DLQ topic."""

    record: dict[str, Any]
    partition: int
    offset: int

    @property
    def original(self) -> bytes:
        return base64.b64decode(self.record.get("original_b64") or "")


def _identity(rec: dict[str, Any]) -> tuple[Any, ...] | None:
    """What makes a rejection one rejection: its stage, reason and source line (None: no source to tell by)."""
    if rec.get("source_topic") is None or rec.get("source_offset") is None:
        return None
    return (rec.get("stage"), rec.get("reason"), rec.get("source_topic"), rec.get("source_partition"),
            rec.get("source_offset"), rec.get("source_line"), rec.get("event_id"))


def read_dead_letters(bootstrap: str | KafkaAuth, topic: str, timeout: float = 30.0) -> list[DeadLetter]:
    """Every rejection on the DLQ topic once, oldest first per partition (records are NDJSON inside messages).

    A stage that crashed after publishing its dead letters but before storing its position publishes them again
    when it replays the batch; a copy with the same stage, reason and source line is the same rejection and is
    read once.
    """
    ends = end_offsets(bootstrap, topic)
    remaining = {p for p, end in ends.items() if end > 0}
    if not remaining:
        return []
    c = Consumer(rdkafka_conf(bootstrap, {"group.id": "tally-dlq-reader", "enable.auto.commit": False,
                                          "auto.offset.reset": "earliest", "fetch.max.bytes": 64 * 1024 * 1024}))
    c.assign([TopicPartition(topic, p, 0) for p in remaining])
    out: list[DeadLetter] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        deadline = time.monotonic() + timeout
        while remaining and time.monotonic() < deadline:
            for msg in c.consume(num_messages=500, timeout=0.5):
                if msg.error():
                    continue
                p, off = int(msg.partition() or 0), int(msg.offset() or 0)
                for line in (msg.value() or b"").split(b"\n"):
                    if line.strip():
                        try:
                            rec = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            rec = {"reason": "unreadable_dlq_record", "message": line[:200].decode("utf-8", "replace")}
                        key = _identity(rec)
                        if key is not None:
                            if key in seen:
                                continue
                            seen.add(key)
                        out.append(DeadLetter(rec, p, off))
                if off + 1 >= ends[p]:
                    remaining.discard(p)
        if remaining:
            raise TallyError(f"timed out reading {topic}; partitions {sorted(remaining)} not read to the end")
    finally:
        c.close()
    return out


def summarize(letters: Sequence[DeadLetter]) -> Counter[str]:
    """Dead letters counted by reason."""
    return Counter(str(d.record.get("reason")) for d in letters)


def select(letters: Iterable[DeadLetter], reasons: Sequence[str] = (), event_ids: Sequence[str] = ()
           ) -> Iterator[DeadLetter]:
    """Dead letters matching any of the reasons and any of the event ids (an empty filter matches all)."""
    for d in letters:
        if reasons and d.record.get("reason") not in reasons:
            continue
        if event_ids and d.record.get("event_id") not in event_ids:
            continue
        yield d


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`usage.input_tokens=120` → (["usage", "input_tokens"], 120); the value is JSON, else a plain string."""
    path, sep, raw = text.partition("=")
    if not sep or not path:
        raise TallyError(f"--set expects field.path=JSON_VALUE, got {text!r}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    return path.split("."), value


def edit_line(original: bytes, sets: Sequence[tuple[list[str], Any]], unsets: Sequence[str]) -> bytes:
    """Apply --set / --unset edits to an original line; a line that is not a JSON object cannot be edited."""
    if not sets and not unsets:
        return original
    try:
        obj = orjson.loads(original)
    except orjson.JSONDecodeError as exc:
        raise TallyError(f"cannot edit a line that is not JSON ({exc}); export it, fix it, publish it") from exc
    if not isinstance(obj, dict):
        raise TallyError("cannot edit a line that is not a JSON object")
    for path, value in sets:
        node = obj
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise TallyError(f"cannot set {'.'.join(path)}: {key} is not an object")
        node[path[-1]] = value
    for dotted in unsets:
        node = obj
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return orjson.dumps(obj)
