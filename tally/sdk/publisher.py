"""The gateway-side producer: buffers usage events per partition, sends them to Kafka as NDJSON messages."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from tally.errors import PublishError
from tally.kafka_auth import KafkaAuth, KafkaRefused, as_auth, metadata, watched
from tally.sdk.batching import route_event, route_line, strip_line


@dataclass(frozen=True)
class PublisherStats:
    """Counters of one Publisher; messages are Kafka messages, events are NDJSON lines."""

    buffered_events: int
    produced_messages: int
    produced_events: int
    delivered_messages: int
    delivered_events: int
    failed_messages: int
    failed_events: int


class _Buffer:
    __slots__ = ("key", "lines", "size")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.size = 0
        self.key: str | None = None


class Publisher:
    """Publish usage events to the input topic, batched per partition into NDJSON messages.

    Routing: every event goes to partition_for(its logical request id); an event without a usable id goes
    to the deterministic partition_for_bytes(its line), so the pipeline dead-letters it. Within a partition,
    events keep their publish order. A message holds at most `max_message_events` lines and
    `max_message_bytes` bytes, except a single oversized line, which is sent alone. A message holding exactly
    one event is keyed by its logical request id; others have no key. The producer is idempotent, acks=all.
    Sending: a partition's buffer is sent when full, and every buffer on the first publish after the oldest
    buffered event is `max_buffer_ms` old. There is no background thread: call flush() when idle.
    Failures: a delivery failure is recorded by the delivery callback and raised as PublishError from the next
    publish, publish_line, flush or close call, never dropped. An event is known delivered only once a flush()
    covering it has returned without raising. Not thread-safe: use one Publisher per thread.
    """

    def __init__(
        self,
        bootstrap: str | KafkaAuth,
        topic: str,
        *,
        partitions: int | None = None,
        max_message_bytes: int = 512 * 1024,
        max_message_events: int = 500,
        linger_ms: int = 50,
        max_buffer_ms: int = 1000,
        compression: str = "lz4",
        queue_full_timeout_s: float = 30.0,
        metadata_timeout_s: float = 10.0,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if max_message_bytes < 1 or max_message_events < 1:
            raise ValueError("max_message_bytes and max_message_events must be at least 1")
        self._auth = as_auth(bootstrap)  # a KafkaAuth brings TLS and SASL (tally.kafka_auth)
        config, self._client_errors = watched(self._auth)
        config.update({
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": compression,
            "linger.ms": linger_ms,
            # Values are already batches of up to max_message_bytes: a protocol batch of ~1 MB holds one or
            # two of them and stays under the broker's default message.max.bytes after compression
            # (librdkafka cannot split an oversized batch the broker refuses).
            "batch.size": 1_000_000,
            "message.max.bytes": max(1_000_000, max_message_bytes + 64 * 1024),
            "partitioner": "murmur2_random",
            # A misspelt topic must fail loudly, not be created with the broker's default partition count.
            "allow.auto.create.topics": False,
        })
        config.update(extra_config or {})
        self.topic = topic
        self.max_message_bytes = max_message_bytes
        self.max_message_events = max_message_events
        self.queue_full_timeout_s = queue_full_timeout_s
        self.max_buffer_s = max_buffer_ms / 1000
        self._producer = Producer(config)
        self.partitions = partitions if partitions is not None else self._topic_partitions(metadata_timeout_s)
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {self.partitions}")
        self._buffers = [_Buffer() for _ in range(self.partitions)]
        self._errors: list[str] = []
        self._closed = False
        self._buffered = 0
        self._oldest = 0.0
        self._produced_messages = 0
        self._produced_events = 0
        self._delivered_messages = 0
        self._delivered_events = 0
        self._failed_messages = 0
        self._failed_events = 0

    def _topic_partitions(self, timeout_s: float) -> int:
        try:
            md = metadata(self._producer, self._client_errors, self._auth, timeout_s, self.topic)
        except KafkaRefused as exc:  # wrong credentials or CA: said within seconds, not after the timeout
            raise PublishError(str(exc)) from exc
        except KafkaException as exc:
            raise PublishError(f"cannot read metadata of topic {self.topic!r}: {exc}") from exc
        meta = md.topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            reason = meta.error if meta is not None and meta.error is not None else "no partitions"
            raise PublishError(f"topic {self.topic!r} is not available: {reason}")
        return len(meta.partitions)

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters; delivered/failed counts advance as delivery reports are served."""
        return PublisherStats(
            buffered_events=self._buffered,
            produced_messages=self._produced_messages,
            produced_events=self._produced_events,
            delivered_messages=self._delivered_messages,
            delivered_events=self._delivered_events,
            failed_messages=self._failed_messages,
            failed_events=self._failed_events,
        )

    def publish(self, event: Mapping[str, Any]) -> None:
        """Serialize `event` with orjson and buffer it; raises PublishError for an earlier failure."""
        self._check()
        line = orjson.dumps(event if isinstance(event, dict) else dict(event))
        partition, lid = route_event(event, line, self.partitions)
        self._append(partition, line, lid)

    def publish_line(self, line: bytes) -> None:
        """Buffer one NDJSON line as is (one trailing newline stripped; blank lines ignored).

        Raises ValueError for a line holding an inner newline, PublishError for earlier failures.
        """
        self._check()
        line = strip_line(line)
        if not line.strip():
            return
        partition, lid = route_line(line, self.partitions)
        self._append(partition, line, lid)

    def _check(self) -> None:
        if self._errors:
            self._raise_errors()
        if self._closed:
            raise PublishError("publisher is closed")

    def _append(self, partition: int, line: bytes, lid: str | None) -> None:
        buf = self._buffers[partition]
        if buf.lines and buf.size + 1 + len(line) > self.max_message_bytes:
            self._send(partition)
        if buf.lines:
            buf.size += 1 + len(line)
        else:
            buf.size = len(line)
            buf.key = lid
        buf.lines.append(line)
        now = time.monotonic()
        if not self._buffered:
            self._oldest = now
        self._buffered += 1
        if len(buf.lines) >= self.max_message_events or buf.size >= self.max_message_bytes:
            self._send(partition)
        if now - self._oldest >= self.max_buffer_s:
            self._send_all()

    def _send(self, partition: int) -> None:
        buf = self._buffers[partition]
        lines = buf.lines
        count = len(lines)
        key = buf.key if count == 1 else None
        value = lines[0] if count == 1 else b"\n".join(lines)
        buf.lines, buf.size, buf.key = [], 0, None
        self._buffered -= count
        callback = functools.partial(self._on_delivery, count)
        deadline = time.monotonic() + self.queue_full_timeout_s
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, partition=partition,
                                       on_delivery=callback)
                break
            except BufferError:
                if time.monotonic() >= deadline:
                    self._failed_messages += 1
                    self._failed_events += count
                    raise PublishError(
                        f"local producer queue stayed full for {self.queue_full_timeout_s}s; a message of "
                        f"{count} events for {self.topic}[{partition}] was not produced") from None
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._failed_messages += 1
                self._failed_events += count
                raise PublishError(
                    f"cannot produce a message of {count} events ({len(value)} bytes) to "
                    f"{self.topic}[{partition}]: {exc}") from exc
        self._produced_messages += 1
        self._produced_events += count
        self._producer.poll(0)

    def _send_all(self) -> None:
        for partition, buf in enumerate(self._buffers):
            if buf.lines:
                self._send(partition)

    def _on_delivery(self, count: int, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._delivered_messages += 1
            self._delivered_events += count
            return
        self._failed_messages += 1
        self._failed_events += count
        self._errors.append(f"{msg.topic()}[{msg.partition()}]: {count} events: {err.str()}")

    def _raise_errors(self) -> None:
        errors, self._errors = self._errors, []
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise PublishError(f"{len(errors)} message(s) were not delivered: {shown}")

    def flush(self, timeout: float = 30.0) -> None:
        """Send every buffered event and wait up to `timeout` seconds for all delivery reports.

        Raises PublishError when a message failed or is still undelivered when the timeout expires.
        """
        if self._errors:
            self._raise_errors()
        self._send_all()
        remaining = self._producer.flush(timeout)
        if self._errors:
            self._raise_errors()
        if remaining:
            raise PublishError(f"{remaining} message(s) to {self.topic} still undelivered after {timeout}s")

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything (see flush) and refuse further publishing; closing again flushes again."""
        self._closed = True
        self.flush(timeout)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
