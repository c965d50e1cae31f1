"""Detect (in role "process"): llm.cost.requests.v1 → per-feature detectors → llm.cost.alerts.v1; their snapshots."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import orjson
from prometheus_client.core import Metric

from streams.detect import DETECT_COLUMNS, DetectConfig, Detector
from streams.metrics import counter, gauge
from streams.positions import encode_offset, is_meta_key, last_offsets, position_key, positions_in_state, watermarks_key
from streams.records import encode_record
from streams.roles.context import (
    EXIT_AGENT_FAILED,
    Batch,
    KeyedTable,
    RoleContext,
    agent_name,
    batch_of,
    log,
    stop_hard,
    timer_name,
)
from streams.sink_columns import REQUEST_SCHEMA, Refused, decode_message, is_arrow
from streams.watermarks import decode_watermarks, is_watermark
from tally.config import Settings
from tally.partitioning import partition_for_bytes


def detect_config(settings: Settings) -> DetectConfig:
    """The detectors' windows and warm-up, from settings."""
    return DetectConfig(window_s=settings.detect_window_s, lateness_s=settings.detect_lateness_s,
                        min_requests=settings.detect_min_requests, warmup_windows=settings.detect_warmup_windows)


def wire_detect(ctx: RoleContext, cpu: ThreadPoolExecutor) -> None:
    """The detect agent and its timer; the detectors run on `cpu` (the process role's thread).

    Per-feature detectors over llm.cost.requests.v1 (keyed by feature_id). Their durable state is one snapshot per
    feature in a table partitioned like that topic, written at most every detect_snapshot_s.
    """
    app, settings, stats, topics = ctx.app, ctx.settings, ctx.stats, ctx.settings.topics
    req_partitions = ctx.req_partitions
    detector = Detector(detect_config(settings))

    def detector_metrics() -> list[Metric]:
        """Features with detectors and open incidents (read while the detectors' thread may add features)."""
        try:
            states = list(detector.features.values())
            firing = sum(b.firing is not None for st in states for one in (st, *list(st.by_model.values()))
                         for b in list(one.baselines.values()))
        except RuntimeError:  # a dict grew during the read: the next scrape reads it
            return []
        return [gauge("tally_detector_features", "Features with detectors in this worker", [({}, float(len(states)))]),
                gauge("tally_detector_firing", "Signals firing (open anomaly incidents) in this worker",
                      [({}, float(firing))]),
                counter("tally_anomaly_alerts", "Anomaly alert records published (firing, escalation, resolved)",
                        [({}, float(stats.anomaly_alerts))]),
                counter("tally_detect_requests", "Logical requests observed by the detectors",
                        [({}, float(stats.detect_requests))])]
    ctx.metrics.add(detector_metrics)
    detect_table = KeyedTable(
        app, name="detect-state", beacon=app.tables.beacon, partitions=req_partitions,
        changelog_topic=app.topic(topics.detect_state, partitions=req_partitions, compacting=True, acks=False,
                                  key_serializer="raw", value_serializer="raw"))
    app.tables.add(detect_table)
    detect_lock = asyncio.Lock()
    detect_restore = [True]
    detect_done: dict[int, int] = {}  # requests partition → last offset observed since the last snapshot
    last_snapshot = [0.0]

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _restore_detectors(sender: Any, **kwargs: Any) -> None:
        detect_restore[0] = True

    async def detect_positions() -> dict[int, int]:
        return positions_in_state(detect_table.data)

    ctx.own_positions(topics.requests, "detect", detect_positions)

    def restore_detectors() -> None:
        """After an assignment: the owned partitions' snapshots and watermarks, as of their stored positions."""
        if not detect_restore[0]:
            return
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == topics.requests}
        data = dict(detect_table.data)
        features = {key: blob for key, blob in data.items() if not is_meta_key(key) and blob is not None}
        where = {key: partition_for_bytes(key, req_partitions) for key in features}
        owned = {key.decode(): blob for key, blob in features.items() if where[key] in assigned}
        marks = {r: data[watermarks_key(r)] for r in assigned if data.get(watermarks_key(r))}
        detector.restore(owned, {fid: where[fid.encode()] for fid in owned}, marks, time.time())
        detect_done.clear()
        detect_restore[0] = False

    async def publish_detected(alerts: list[dict[str, Any]], force_snapshot: bool = False) -> None:
        """Deliver alerts, then snapshots, watermarks and positions (every detect_snapshot_s), awaited.

        Alerts are keyed by incident; then the changed features' snapshots, the partitions' watermarks and
        positions are written and awaited: a position never runs ahead of the state it covers.

        A crash replays the requests after the stored positions against the stored snapshots; the detectors are
        deterministic in their input, so the same alerts are raised again, with the same incident ids, which the
        alert consumer pages once.
        """
        sent = [await ctx.alerts_topic.send(key=a["incident_key"].encode(), value=encode_record(a), force=True)
                for a in alerts]
        await asyncio.gather(*sent)
        stats.anomaly_alerts += len(alerts)
        if force_snapshot or time.time() - last_snapshot[0] >= settings.detect_snapshot_s:
            # Pickling and compressing the changed features is CPU work: on the detectors' thread (callers hold
            # detect_lock, so no batch is observed meanwhile), not on the event loop.
            snapshots = await asyncio.get_running_loop().run_in_executor(cpu, detector.take_dirty)
            for fid, blob in snapshots.items():
                detect_table[fid.encode()] = blob
            for r, offset in detect_done.items():
                detect_table[watermarks_key(r)] = detector.marks_of(r)
                detect_table[position_key(r)] = encode_offset(offset)
            detect_done.clear()
            await detect_table.written()
            stats.detect_snapshots += len(snapshots)
            last_snapshot[0] = time.time()

    def observe_message(value: bytes | None, partition: int) -> int:
        """A requests message into the detectors (an Arrow message read by columns, NDJSON by rows); its row count."""
        if is_arrow(value):
            table = decode_message(value or b"", REQUEST_SCHEMA, "llm.cost.requests.v1")
            detector.observe_table(table.select(list(DETECT_COLUMNS)), partition)
            return int(table.num_rows)
        rows = [orjson.loads(line) for line in (value or b"").split(b"\n") if line]
        detector.observe(rows, partition)
        return len(rows)

    def observe(batch: Batch) -> list[dict[str, Any]]:
        """The batch in offset order per partition: rows fill windows, watermarks close them."""
        alerts: list[dict[str, Any]] = []
        for value, src in batch:
            if is_watermark(value):
                marks, sources = decode_watermarks(value or b"")
                alerts.extend(detector.watermark(src.partition, marks, sources))
                continue
            try:
                stats.detect_requests += observe_message(value, src.partition)
            except Refused as exc:  # not a table of logical requests: the sink dead-letters the message
                stats.detect_errors += 1
                log.warning("detect: %s[%d]@%d is not logical requests (%s); passed over", src.topic, src.partition,
                            src.offset, exc)
                continue
        stats.detect_late = detector.late_rows
        stats.detect_duplicates = detector.duplicate_rows
        return alerts

    @app.agent(ctx.requests_topic, name=agent_name("detect"))
    async def detect(stream: faust.StreamT) -> None:
        """llm.cost.requests.v1 → per-feature detectors → llm.cost.alerts.v1 (anomaly records)."""
        loop = asyncio.get_running_loop()
        try:
            async for events in stream.take_events(  # type: ignore[attr-defined]
                    settings.process_batch_messages, settings.batch_within_s):
                batch = batch_of(events)
                async with detect_lock:
                    restore_detectors()
                    batch = await ctx.admit(batch, topics.requests, "detect")
                    if not batch:
                        continue
                    try:
                        alerts = await loop.run_in_executor(cpu, observe, batch)
                    except Exception:  # a detector bug must not stop pricing: the requests are saved anyway
                        stats.detect_errors += 1
                        log.exception("detect: a batch of %d messages was not scored", len(events))
                        alerts = []
                    detect_done.update(last_offsets(src for _, src in batch))
                    await publish_detected(alerts)
        except Exception:
            stop_hard(EXIT_AGENT_FAILED, "the detect agent failed; stopping without committing its batch")

    @app.timer(interval=1.0, name=timer_name("detect_tick"))
    async def detect_tick() -> None:
        """Snapshots and positions of a partition that went quiet are written within detect_snapshot_s.

        No clock moves here: event time reaches the detectors only in watermark messages (streams.watermarks).
        """
        if app.rebalancing or not detect_done:
            return
        async with detect_lock:
            restore_detectors()  # after a rebalance: nothing of a partition given away is written
            try:
                await publish_detected([])
            except Exception:
                stop_hard(EXIT_AGENT_FAILED, "the detect timer failed; stopping")
