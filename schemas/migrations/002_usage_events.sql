-- 002: usage_events, one row per accepted usage event (one physical provider call, priced and attributed).
--
-- ORDER BY (team_id, feature_id, ts, event_id): reports and rollups filter by owner and time range first; event_id
-- last makes the key unique per row. PARTITION BY month: finance closes by month, retention drops whole months, and a
-- month keeps the part count small at any realistic volume.
-- non_replicated_deduplication_window: the sink sends a deterministic insert_deduplication_token per batch; a retried
-- insert after a timeout is absorbed by ClickHouse instead of doubling rows.
-- Money is Decimal(38, 18): exact to the atto-dollar, no float anywhere.
CREATE TABLE IF NOT EXISTS {db}.usage_events
(
    event_id                      String,
    request_id                    String,
    logical_request_id            String,
    attempt                       UInt32,
    final                         Bool,
    ts                            DateTime64(3, 'UTC'),
    ingested_at                   DateTime64(3, 'UTC'),
    provider                      LowCardinality(String),
    model_requested               LowCardinality(String),
    model_actual                  LowCardinality(String),
    fallback_from                 LowCardinality(String),
    status                        LowCardinality(String),
    error                         String,
    batch                         Bool,
    service_tier                  LowCardinality(String),
    usage_reported                Bool,
    stream_terminated_at_token_n  Nullable(UInt64),
    latency_ms                    Nullable(UInt32),
    input_tokens                  UInt64,
    output_tokens                 UInt64,
    reasoning_tokens              UInt64,
    cache_read_tokens             UInt64,
    cache_write_tokens            UInt64,
    cache_write_1h_tokens         UInt64,
    tool_calls                    Map(String, UInt32),
    cost_input_usd                Decimal(38, 18),
    cost_output_usd               Decimal(38, 18),
    cost_reasoning_usd            Decimal(38, 18),
    cost_cache_read_usd           Decimal(38, 18),
    cost_cache_write_usd          Decimal(38, 18),
    cost_tools_usd                Decimal(38, 18),
    cost_total_usd                Decimal(38, 18),
    pricing_status                LowCardinality(String),
    pricing_note                  String,
    price_card_version            LowCardinality(String),
    tenant_id                     String,
    team_id                       LowCardinality(String),
    feature_id                    LowCardinality(String),
    product                       LowCardinality(String),
    endpoint                      LowCardinality(String),
    environment                   LowCardinality(String),
    cost_center                   LowCardinality(String),
    business_unit                 LowCardinality(String),
    api_key_id                    String,
    deploy_version                LowCardinality(String),
    user_segment                  LowCardinality(String),
    tags                          Map(String, String),
    ownership_version             LowCardinality(String),
    attribution_status            LowCardinality(String),
    attribution_reason            LowCardinality(String),
    attribution_conflict          String,
    source_topic                  LowCardinality(String),
    source_partition              UInt16,
    source_offset                 UInt64,
    source_line                   UInt32,
    payload                       String CODEC(ZSTD(3))
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (team_id, feature_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
