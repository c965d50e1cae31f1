-- 011: origin beside each event_id: the sink's input message (llm.cost.attempts.v1 `topic[partition]@offset`) whose
-- insert saved the row, so a replay after a crash mid-insert re-sends exactly the pieces it sent before.
--
-- An insert cut short (kill -9) can leave some of the tables it reaches with the block and others without. The sink
-- groups rows into pieces by (origin message, UTC day) with a token hashed from them (streams.sink.SinkWriter), and
-- treats a row saved with its own origin as not saved yet: the replayed piece is the same block with the same token,
-- absorbed where it landed and filling where it did not. Rows saved before this migration keep '' (no message of
-- the sink has that origin: a later copy of them counts as a duplicate, as before).
-- event_ids carries it so the sink's one point lookup by event_id (the ORDER BY) answers all three questions. As in
-- 008: ADD COLUMN IF NOT EXISTS and MODIFY QUERY (the view is replaced in place, no insert passes while it is
-- missing) make the migration safe on an existing database and to re-run.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS origin String DEFAULT '' CODEC(ZSTD(1));

ALTER TABLE {db}.event_ids ADD COLUMN IF NOT EXISTS origin String DEFAULT '';

ALTER TABLE {db}.event_ids_mv MODIFY QUERY SELECT event_id, ingested_at, content_hash, origin FROM {db}.usage_events;

-- request_plans: the logical-request sink's decisions, journaled per input message (llm.cost.requests.v1 origin)
-- before its pieces are inserted. A decision reads logical_request_heads, which an insert cut short may already
-- hold while some rollup grain does not: re-deciding on replay would skip those revisions (a gap) or cut them into
-- other pieces (a duplicate). The replay re-sends the journaled rows instead, under the same tokens. lines = the
-- decided rows (new revisions and cancel rows) as NDJSON, the topic's own encoding. ORDER BY origin: the sink looks
-- up its batch's messages. No view reads it; TTL = the dedup window, beyond which a replay is outside the guarantee.
CREATE TABLE IF NOT EXISTS {db}.request_plans
(
    origin      String,
    lines       String CODEC(ZSTD(3)),
    planned_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY origin
TTL toDateTime(planned_at) + INTERVAL {dedup_window_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;
