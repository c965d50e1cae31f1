-- 010: sink_offsets, the sink's own input position: per consumer group, topic and partition, the last offset whose
-- rows ClickHouse holds (written right after each batch's insert returned; streams/app.py, sink protocol).
--
-- On every partition assignment the sink seeks each partition to this offset + 1, so Kafka's committed offsets are
-- only a lag hint: a commit past unsaved input (a framework bug, a crash between ack and insert) cannot lose rows.
-- Writing it after the insert, not in the same insert, is enough because every sink insert is idempotent (event_id
-- lookup + deterministic tokens): a crash between the two replays the batch, which then changes nothing.
-- ReplacingMergeTree(offset) ORDER BY the key keeps the highest offset per partition; readers take max(offset).
CREATE TABLE IF NOT EXISTS {db}.sink_offsets
(
    consumer    LowCardinality(String),
    topic       LowCardinality(String),
    partition   UInt32,
    offset      UInt64,
    written_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(offset)
ORDER BY (consumer, topic, partition);
