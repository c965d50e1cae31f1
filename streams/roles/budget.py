"""Budgets (in role "sink"): every budget_interval_s, spend to date vs budgets → llm.budget.state.v1, budget alerts."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from streams.budget import evaluate, read_holds, read_spend
from streams.metrics import counter, gauge
from streams.records import encode_record
from streams.reference_feed import ReferenceFeed
from streams.roles.context import RoleContext, log, timer_name
from streams.roles.sink import SinkWiring
from tally.errors import StoreError, TallyError
from tally.kafka_auth import KafkaAuth, metadata, watched
from tally.reference import ReferenceStore


def wire_budget(ctx: RoleContext, sink: SinkWiring) -> dict[str, dict[str, Any]]:
    """The budget follower and timer; they read spend on the sink's ClickHouse thread. Returns the live states."""
    app, settings, topics = ctx.app, ctx.settings, ctx.settings.topics
    store, executor = sink.store, sink.executor
    budget_refs = ReferenceStore()
    budget_feed = ReferenceFeed(settings.kafka, (topics.budgets,), budget_refs)
    budget_topic = app.topic(topics.budget_state, value_type=bytes)
    budget_states: dict[str, dict[str, Any]] = {}

    def budget_metrics() -> list[Any]:
        """Each budget's share spent and its advice to gateways, as last published (a ratio: a gauge, not money)."""
        states = [v for v in list(budget_states.values()) if isinstance(v, dict) and "scope" in v]

        def labels(v: dict[str, Any]) -> dict[str, str]:
            return {"scope": str(v.get("scope", "")), "id": str(v.get("id", "")), "period": str(v.get("period", ""))}
        return [
            gauge("tally_budget_used_ratio", "Spend to date over the budget (1 = spent), as last evaluated",
                  [(labels(v), float(v.get("used_pct") or 0) / 100) for v in states], ("scope", "id", "period")),
            gauge("tally_budget_advice", "The budget's advice to gateways: 1 on the current one of allow, degrade, "
                  "deny", [({**labels(v), "advice": a}, 1.0 if v.get("recommendation") == a else 0.0)
                           for v in states for a in ("allow", "degrade", "deny")],
                  ("scope", "id", "period", "advice")),
            counter("tally_budget_alerts", "Budget alert records published", [({}, float(ctx.stats.budget_alerts))]),
        ]
    ctx.metrics.add(budget_metrics)

    @app.task
    async def follow_budgets() -> None:
        loop = asyncio.get_running_loop()
        # The last published states remember which thresholds already alerted in this period.
        budget_states.update(await loop.run_in_executor(None, read_compacted, settings.kafka,
                                                        topics.budget_state))
        await budget_feed.run()

    @app.timer(interval=settings.budget_interval_s, name=timer_name("budget_tick"))
    async def budget_tick() -> None:
        """Spend to date (rollups) against budgets → llm.budget.state.v1 and budget alerts."""
        if not budget_feed.ready.is_set():
            return
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        budgets = budget_refs.snapshot().budgets_at(now)
        if budgets is None:
            return
        try:
            spend, recent = await loop.run_in_executor(
                executor, read_spend, lambda sql: store.query(sql).rows, budgets, now, settings.budget_window_s)
            holds = await loop.run_in_executor(
                executor, read_holds, lambda sql: store.query(sql).rows, budgets, now, settings.budget_hold_ttl_s)
        except StoreError as exc:
            log.warning("budget: cannot read spend (%s); next try in %.0fs", exc, settings.budget_interval_s)
            return
        ev = evaluate(budgets, spend, recent, settings.budget_window_s, now, budget_states, holds)
        sent = [await ctx.alerts_topic.send(key=a["incident_key"].encode(), value=encode_record(a), force=True)
                for a in ev.alerts]
        sent += [await budget_topic.send(key=k.encode(), value=encode_record(v), force=True)
                 for k, v in ev.states.items()]
        await asyncio.gather(*sent)
        budget_states.update({k: orjson.loads(encode_record(v)) for k, v in ev.states.items()})
        ctx.stats.budget_alerts += len(ev.alerts)

    return budget_states


def read_compacted(bootstrap: str | KafkaAuth, topic: str, timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The latest JSON value per key of a compacted topic, read from the beginning to the current end."""
    conf, errors = watched(bootstrap, {"group.id": "tally-compacted-reader", "enable.auto.commit": False})
    consumer = Consumer(conf)
    out: dict[str, dict[str, Any]] = {}
    try:
        meta = metadata(consumer, errors, bootstrap, timeout_s, topic).topics.get(topic)
        if meta is None or meta.error is not None:
            return out
        ends = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout_s
        while ends and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            key, value, offset = (msg.key() or b"").decode(), msg.value(), msg.offset() or 0
            if value is None:
                out.pop(key, None)
            else:
                out[key] = orjson.loads(value)
            if offset + 1 >= ends.get(msg.partition() or 0, 0):
                ends.pop(msg.partition() or 0, None)
        if ends:
            raise TallyError(f"could not read {topic} to its end within {timeout_s:.0f}s")
    except KafkaException as exc:
        raise TallyError(f"cannot read {topic} from {bootstrap}: {exc}") from exc
    finally:
        consumer.close()
    return out
