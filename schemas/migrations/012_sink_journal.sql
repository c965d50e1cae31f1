-- 012: sink_journal, the sink's plans, journaled before their first insert (streams/pieces.py).
--
-- The sink inserts each batch of input messages as a few pieces per table (one per up to 50 UTC days), whatever the
-- number of messages. Which messages share a batch depends on timing, so a replay after a crash mid-insert could cut
-- them otherwise, and a piece that reached some tables but not others would go in again under another token. The
-- plan is journaled first, in one insert: a row per input message it covers (origin = `topic[partition]@offset`,
-- plan = its id) and a row `plan:<id>` whose `pieces` holds every piece's rows as one Arrow IPC stream (base64),
-- with their tokens and days. A sink that meets a journaled message re-sends that plan's pieces unchanged before it
-- plans anything else. ORDER BY origin: both lookups (the batch's messages, then the plans' rows) are point reads.
-- A plan is needed only until its batch's position is stored (seconds), but it holds the batch's rows (~0.5 KB an
-- event on disk, docs/performance.md): the sink drops each ten-minute partition once every plan in it is complete
-- (Store.drop_completed_journal, every few minutes), and the TTL (the dedup window) is only the backstop for the
-- plans of a sink that crashed and is not back. It supersedes request_plans (011), which is no longer written:
-- stop the sink cleanly (`tally down`) before upgrading, so that no plan of 011 is pending.
CREATE TABLE IF NOT EXISTS {db}.sink_journal
(
    origin      String,
    plan        String,
    pieces      String CODEC(ZSTD(1)),
    planned_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toStartOfTenMinutes(planned_at)
ORDER BY (origin, plan)
TTL toDateTime(planned_at) + INTERVAL {dedup_window_days} DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;
