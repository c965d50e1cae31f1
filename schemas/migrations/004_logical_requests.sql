-- 004: logical_requests, one row per emitted revision of a logical request (its attempts folded: retries, fallbacks,
-- terminated streams, retry waste), and the sink's lookup of each request's latest revision.
--
-- Revisions collapse: when revision r+1 of a request is written, the sink writes in the same insert a cancel row
-- (sign = -1) that is an exact copy of revision r. So, at any merge state:
--   - aggregates count each logical request once, at its latest revision: sum(sign) requests,
--     sum(sign * cost_total_usd) dollars (materialized views and rollups multiply by sign the same way);
--   - row-level queries read the view logical_requests_current (FINAL: cancelled pairs removed, sign = 1 left).
-- VersionedCollapsingMergeTree(sign, revision) removes cancelled pairs in background merges; correctness never
-- waits for a merge. ORDER BY owner and time first (reports filter by them), logical_request_id last.
-- Every row is a pure function of its attempts (attempts_detail), so the sink can rebuild any revision exactly.
CREATE TABLE IF NOT EXISTS {db}.logical_requests
(
    logical_request_id     String,
    revision               UInt32,
    sign                   Int8,
    first_ts               DateTime64(3, 'UTC'),
    last_ts                DateTime64(3, 'UTC'),
    emitted_at             DateTime64(3, 'UTC'),
    closed_by              LowCardinality(String),
    attempts               UInt32,
    retries                UInt32,
    fallbacks              UInt32,
    fallback_chain         Array(LowCardinality(String)),
    requested_model        LowCardinality(String),
    final_model            LowCardinality(String),
    final_provider         LowCardinality(String),
    final_status           LowCardinality(String),
    final_event_id         String,
    terminated             Bool,
    terminated_at_token_n  Nullable(UInt64),
    usage_complete         Bool,
    pricing_status         LowCardinality(String),
    input_tokens           UInt64,
    output_tokens          UInt64,
    reasoning_tokens       UInt64,
    cache_read_tokens      UInt64,
    cache_write_tokens     UInt64,
    cache_write_1h_tokens  UInt64,
    cost_input_usd         Decimal(38, 18),
    cost_output_usd        Decimal(38, 18),
    cost_reasoning_usd     Decimal(38, 18),
    cost_cache_read_usd    Decimal(38, 18),
    cost_cache_write_usd   Decimal(38, 18),
    cost_tools_usd         Decimal(38, 18),
    cost_total_usd         Decimal(38, 18),
    cost_final_usd         Decimal(38, 18),
    cost_wasted_usd        Decimal(38, 18),
    tenant_id              String,
    team_id                LowCardinality(String),
    feature_id             LowCardinality(String),
    product                LowCardinality(String),
    endpoint               LowCardinality(String),
    environment            LowCardinality(String),
    cost_center            LowCardinality(String),
    business_unit          LowCardinality(String),
    deploy_version         LowCardinality(String),
    ownership_version      LowCardinality(String),
    attribution_status     LowCardinality(String),
    price_card_versions    Array(LowCardinality(String)),
    attempt_event_ids      Array(String),
    attempts_detail        String CODEC(ZSTD(3))
)
ENGINE = VersionedCollapsingMergeTree(sign, revision)
PARTITION BY toYYYYMM(first_ts)
ORDER BY (team_id, feature_id, first_ts, logical_request_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- The latest revision of each request, by id: the sink's "what does ClickHouse hold?" lookup (a replayed or stale
-- revision is skipped, a late attempt is merged into a new revision). TTL = the dedup window, like event_ids.
CREATE TABLE IF NOT EXISTS {db}.logical_request_heads
(
    logical_request_id  String,
    revision            UInt32,
    emitted_at          DateTime64(3, 'UTC'),
    attempts_detail     String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree(revision)
ORDER BY logical_request_id
TTL toDateTime(emitted_at) + INTERVAL {dedup_window_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.logical_request_heads_mv TO {db}.logical_request_heads AS
SELECT logical_request_id, revision, emitted_at, attempts_detail FROM {db}.logical_requests WHERE sign = 1;

-- Each logical request once, at its latest revision (row-level queries: top attempts, fallback chains, …).
CREATE VIEW IF NOT EXISTS {db}.logical_requests_current AS
SELECT * FROM {db}.logical_requests FINAL WHERE sign = 1;
