-- 003: event_ids, the sink's "already saved?" lookup (exactly-once effect, step 2).
--
-- ORDER BY event_id: the sink asks "which of these event_ids do you hold?" for every batch; a point lookup by the
-- primary key answers it without scanning usage_events. TTL = the dedup window: a duplicate arriving later than that
-- is outside the guarantee (documented in the README). Filled by a materialized view from usage_events, so both are
-- written by one insert with one deduplication token; the target has its own dedup window too.
CREATE TABLE IF NOT EXISTS {db}.event_ids
(
    event_id     String,
    ingested_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY event_id
TTL toDateTime(ingested_at) + INTERVAL {dedup_window_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.event_ids_mv TO {db}.event_ids AS
SELECT event_id, ingested_at FROM {db}.usage_events;
