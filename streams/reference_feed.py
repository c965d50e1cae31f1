"""Keeps the worker's in-memory reference data in step with the compacted reference topics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from tally.errors import ReferenceDataError
from tally.kafka_auth import KafkaAuth, as_auth
from tally.reference import ReferenceDoc, ReferenceStore

log = logging.getLogger(__name__)


class ReferenceFeed:
    """Reads every reference topic from the beginning, then follows it.

    Contract: `ready` is set once everything present at start-up has been applied, so the process agent never
    prices an event against a half-loaded card. Later changes (`tally reference load`) apply within a poll
    interval, without a restart. A malformed record is logged and skipped (the loader validated it; a foreign
    producer's junk must not stop pricing). A tombstone (null value) removes that version.
    No consumer group: every worker reads all of it.
    """

    def __init__(self, bootstrap: str | KafkaAuth, topics: Sequence[str], store: ReferenceStore) -> None:
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self.store = store
        self.ready = asyncio.Event()
        self.applied = 0

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(**as_auth(self.bootstrap).aiokafka(), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            tps: list[TopicPartition] = []
            for topic in self.topics:
                parts = await self._partitions(consumer, topic)
                tps.extend(TopicPartition(topic, p) for p in parts)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            pending = {tp for tp in tps if end[tp] > 0}
            if not pending:
                self.ready.set()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for tp, records in batches.items():
                    for rec in records:
                        self._apply(rec.key, rec.value, f"{tp.topic}[{tp.partition}]@{rec.offset}")
                if not self.ready.is_set():
                    for tp in list(pending):
                        if await consumer.position(tp) >= end[tp]:
                            pending.discard(tp)
                    if not pending:
                        log.info("reference data loaded: %s", self.store.describe())
                        self.ready.set()
        finally:
            await consumer.stop()

    @staticmethod
    async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        for _ in range(50):
            parts = consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
            await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public refresh
            await asyncio.sleep(0.1)
        raise ReferenceDataError([f"reference topic {topic} does not exist: run `tally kafka start` or create it"])

    def _apply(self, key: bytes | None, value: bytes | None, where: str) -> None:
        try:
            if value is None:
                if key:
                    kind, _, version = key.decode().partition(":")
                    self.store.remove(kind, version)
                return
            self.store.apply(ReferenceDoc.from_json(value))
            self.applied += 1
        except Exception as exc:  # a foreign record must not stop pricing
            log.error("skipping malformed reference record at %s: %s", where, exc)
