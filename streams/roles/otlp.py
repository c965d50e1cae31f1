"""Stage "otlp" (in role "process"): OTLP traces from the OTel Collector → usage events on llm.usage.v1, dead letters.

Off when settings.otlp_topic is "". The events it publishes are read by the process agent like any gateway's.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import faust

from streams.metrics import counter
from streams.otlp import OtlpConfig, parse_tag_mapping, spans_in, translate_messages
from streams.positions import audit_line, encode_offset, last_offsets, position_key, positions_in_state
from streams.roles.context import (
    EXIT_AGENT_FAILED,
    Batch,
    KeyedTable,
    RoleContext,
    agent_name,
    audit,
    batch_of,
    gathered,
    line_runs,
    stop_hard,
)
from tally.config import Settings


def otlp_config(settings: Settings) -> OtlpConfig:
    """How spans become events, from settings (otlp_encoding, otlp_logical_request, otlp_tags)."""
    return OtlpConfig(encoding=settings.otlp_encoding, logical_request=settings.otlp_logical_request,
                      tags=parse_tag_mapping(settings.otlp_tags), redact=bool(settings.dlq_redact))


def wire_otlp(ctx: RoleContext, cpu: ThreadPoolExecutor, otlp_partitions: int) -> None:
    """The otlp agent: each batch of OTLP messages is translated on `cpu`, published, then its position stored.

    Out: event lines on llm.usage.v1 (the partition of their logical request, as the SDK routes them) and dead
    letters on llm.usage.dlq.v1. The input positions are entries of a small table ("otlp-state", partitioned like
    the OTLP topic), written after the batch's outputs are delivered: a crash replays at most the batch in hand,
    whose events carry the same event_ids again and are dropped downstream as duplicates.
    """
    app, settings, stats, topics = ctx.app, ctx.settings, ctx.stats, ctx.settings.topics
    config = otlp_config(settings)
    source = app.topic(topics.otlp, value_type=bytes)
    table = KeyedTable(
        app, name="otlp-state", beacon=app.tables.beacon, partitions=otlp_partitions,
        changelog_topic=app.topic(topics.otlp_state, partitions=otlp_partitions, compacting=True, acks=False,
                                  key_serializer="raw", value_serializer="raw"))
    app.tables.add(table)
    counts = {"spans": 0, "events": 0}
    skipped: dict[str, int] = {}
    ctx.metrics.add(lambda: [
        counter("tally_otlp_spans", "Spans read from the OTLP topic", [({}, float(counts["spans"]))]),
        counter("tally_otlp_events", "GenAI call spans published as usage events", [({}, float(counts["events"]))]),
        counter("tally_otlp_skipped_spans",
                "Spans that are not a provider call, by why (not_genai, agent_or_tool, other_operation)",
                [({"reason": r}, float(n)) for r, n in sorted(skipped.items())], ("reason",))])
    batch_seconds = ctx.metrics.batch_seconds.labels(role=stats.role, stage="otlp")

    async def otlp_positions() -> dict[int, int]:
        return positions_in_state(table.data)

    ctx.own_positions(topics.otlp, "otlp", otlp_positions)

    async def translate_run(run: Batch, loop: asyncio.AbstractEventLoop) -> None:
        """One run of messages: translated on `cpu`, its events and dead letters delivered, then its position."""
        started = time.perf_counter()
        out = await loop.run_in_executor(cpu, translate_messages, run, config, ctx.partitions, ctx.partitions)
        await ctx.fail_at("otlp.before_delivery")
        sent = await ctx.publish(ctx.usage_topic, out.lines)
        sent += await ctx.publish(ctx.dlq_topic, out.dead_letters)
        await asyncio.gather(*sent)
        await ctx.fail_at("otlp.after_delivery")
        for partition, offset in last_offsets(src for _, src in run).items():
            table[position_key(partition)] = encode_offset(offset)
        await table.written()
        if settings.audit_offsets:
            audit.info(audit_line(topics.otlp, [src for _, src in run], {
                "spans": out.spans, "event_lines": out.events, "dead_letters": len(out.reasons)}))
        counts["spans"] += out.spans
        counts["events"] += out.events
        for reason, n in out.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        stats.dead_lettered(out.reasons)
        stats.events_rejected += len(out.reasons)
        batch_seconds.observe(time.perf_counter() - started)

    @app.agent(source, name=agent_name("otlp"))
    async def otlp(stream: faust.StreamT) -> None:
        """OTLP traces → usage events v1 on llm.usage.v1 and dead letters, in runs of about batch_max_lines spans.

        Runs are bounded like the process role's: the two share one CPU thread, and a run of a whole take (100
        Collector messages, ~50,000 spans) would hold it for seconds while the events it publishes wait.
        """
        loop = asyncio.get_running_loop()
        try:
            takes = stream.take_events(  # type: ignore[attr-defined]
                settings.process_batch_messages, settings.batch_within_s)
            async for events in gathered(takes, settings.batch_max_lines, settings.batch_within_s,
                                         lambda e: spans_in(e.message.value)):
                batch = await ctx.admit(batch_of(events), topics.otlp, "otlp")
                for run in line_runs(batch, settings.batch_max_lines, spans_in):
                    await translate_run(run, loop)
        except Exception:
            stop_hard(EXIT_AGENT_FAILED, "the otlp agent failed; stopping without storing its batch's position")
