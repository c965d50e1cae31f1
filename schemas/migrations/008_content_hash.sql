-- 008: content_hash beside each event_id, so the sink tells a re-delivered copy from a conflicting duplicate.
--
-- content_hash = blake2b-128 (hex) of the original event's fields (the `payload` line, keys sorted), computed by the
-- sink (streams.sink.content_hash). A second event with a known event_id and the same hash is a silent dedup; with
-- another hash it is a dead letter `conflicting_duplicate` and is never inserted. Rows saved before this migration
-- keep '' (unknown: a later copy of them counts as a duplicate).
-- event_ids carries the hash so the sink's lookup (a point query by event_id, the ORDER BY) answers both questions.
-- The view's query is replaced in place (MODIFY QUERY), so no insert passes while it is missing; ADD COLUMN
-- IF NOT EXISTS and MODIFY QUERY make the migration safe to re-run on an existing database.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS content_hash String DEFAULT '' CODEC(ZSTD(1));

ALTER TABLE {db}.event_ids ADD COLUMN IF NOT EXISTS content_hash String DEFAULT '';

ALTER TABLE {db}.event_ids_mv MODIFY QUERY SELECT event_id, ingested_at, content_hash FROM {db}.usage_events;
