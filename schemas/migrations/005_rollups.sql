-- 005: minute, hour and day rollups by team, product, feature, model, provider, tenant and environment.
--
-- Filled by materialized views in the same insert as their sources (so they are exactly as deduplicated as the
-- sources: the sink's insert token reaches every view target, each has a dedup window):
--   usage_events     → rollup_minute: attempts, tokens and cost per class, unattributed cost (by the attempt's model);
--   logical_requests → rollup_minute: requests = sum(sign), retry waste = sum(sign * cost_wasted_usd), and t-digest
--                      states of reasoning tokens and of cost per request (by the request's final model, first_ts);
--   rollup_minute    → rollup_hour → rollup_day (sums and merged states).
-- Sums with sign count each logical request once at its latest revision. The quantile states take every revision
-- row with sign = 1 (a state cannot be subtracted), so a request revised by a late attempt weighs twice in them: an
-- approximation only for quantiles, and only for revised requests. Quantiles of cost run in Float64 (they are
-- estimates); every cost sum is exact Decimal(38, 18).
-- Read with sum() / quantileTDigestMerge(q)() GROUP BY the dimensions you need; AggregatingMergeTree merges rows
-- of the same key in the background, so never read a single row as final.
-- Retention: TTL per grain, whole parts dropped (ttl_only_drop_parts); `tally db migrate` re-applies the
-- configured days (rollup_*_retention_days) at every start.

CREATE TABLE IF NOT EXISTS {db}.rollup_minute
(
    bucket                        DateTime('UTC'),
    team_id                       LowCardinality(String),
    product                       LowCardinality(String),
    feature_id                    LowCardinality(String),
    model_actual                  LowCardinality(String),
    provider                      LowCardinality(String),
    tenant_id                     String,
    environment                   LowCardinality(String),
    attempts                      SimpleAggregateFunction(sum, UInt64),
    requests                      SimpleAggregateFunction(sum, Int64),
    input_tokens                  SimpleAggregateFunction(sum, UInt64),
    output_tokens                 SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens              SimpleAggregateFunction(sum, UInt64),
    cache_read_tokens             SimpleAggregateFunction(sum, UInt64),
    cache_write_tokens            SimpleAggregateFunction(sum, UInt64),
    cache_write_1h_tokens         SimpleAggregateFunction(sum, UInt64),
    cost_input_usd                SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_output_usd               SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_reasoning_usd            SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_cache_read_usd           SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_cache_write_usd          SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_tools_usd                SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_total_usd                SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_wasted_usd               SimpleAggregateFunction(sum, Decimal(38, 18)),
    cost_unattributed_usd         SimpleAggregateFunction(sum, Decimal(38, 18)),
    reasoning_tokens_per_request  AggregateFunction(quantileTDigest, UInt64),
    cost_per_request_usd          AggregateFunction(quantileTDigest, Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment)
TTL bucket + INTERVAL {rollup_minute_retention_days} DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS {db}.rollup_hour AS {db}.rollup_minute
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment)
TTL bucket + INTERVAL {rollup_hour_retention_days} DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS {db}.rollup_day AS {db}.rollup_minute
ENGINE = AggregatingMergeTree
PARTITION BY toYear(bucket)
ORDER BY (bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment)
TTL bucket + INTERVAL {rollup_day_retention_days} DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_minute_attempts_mv TO {db}.rollup_minute AS
SELECT toStartOfMinute(u.ts) AS bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment,
       count() AS attempts,
       toInt64(0) AS requests,
       sum(u.input_tokens) AS input_tokens,
       sum(u.output_tokens) AS output_tokens,
       sum(u.reasoning_tokens) AS reasoning_tokens,
       sum(u.cache_read_tokens) AS cache_read_tokens,
       sum(u.cache_write_tokens) AS cache_write_tokens,
       sum(u.cache_write_1h_tokens) AS cache_write_1h_tokens,
       sum(u.cost_input_usd) AS cost_input_usd,
       sum(u.cost_output_usd) AS cost_output_usd,
       sum(u.cost_reasoning_usd) AS cost_reasoning_usd,
       sum(u.cost_cache_read_usd) AS cost_cache_read_usd,
       sum(u.cost_cache_write_usd) AS cost_cache_write_usd,
       sum(u.cost_tools_usd) AS cost_tools_usd,
       sum(u.cost_total_usd) AS cost_total_usd,
       toDecimal128(0, 18) AS cost_wasted_usd,
       sumIf(u.cost_total_usd, u.attribution_status != 'attributed') AS cost_unattributed_usd,
       quantileTDigestStateIf(toUInt64(0), 0) AS reasoning_tokens_per_request,
       quantileTDigestStateIf(toFloat64(0), 0) AS cost_per_request_usd
FROM {db}.usage_events AS u
GROUP BY bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_minute_requests_mv TO {db}.rollup_minute AS
SELECT toStartOfMinute(r.first_ts) AS bucket, team_id, product, feature_id, final_model AS model_actual,
       final_provider AS provider, tenant_id, environment,
       toUInt64(0) AS attempts,
       toInt64(sum(r.sign)) AS requests,
       toUInt64(0) AS input_tokens,
       toUInt64(0) AS output_tokens,
       toUInt64(0) AS reasoning_tokens,
       toUInt64(0) AS cache_read_tokens,
       toUInt64(0) AS cache_write_tokens,
       toUInt64(0) AS cache_write_1h_tokens,
       toDecimal128(0, 18) AS cost_input_usd,
       toDecimal128(0, 18) AS cost_output_usd,
       toDecimal128(0, 18) AS cost_reasoning_usd,
       toDecimal128(0, 18) AS cost_cache_read_usd,
       toDecimal128(0, 18) AS cost_cache_write_usd,
       toDecimal128(0, 18) AS cost_tools_usd,
       toDecimal128(0, 18) AS cost_total_usd,
       sum(r.sign * r.cost_wasted_usd) AS cost_wasted_usd,
       toDecimal128(0, 18) AS cost_unattributed_usd,
       quantileTDigestStateIf(r.reasoning_tokens, r.sign = 1) AS reasoning_tokens_per_request,
       quantileTDigestStateIf(toFloat64(r.cost_total_usd), r.sign = 1) AS cost_per_request_usd
FROM {db}.logical_requests AS r
GROUP BY bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_hour_mv TO {db}.rollup_hour AS
SELECT toStartOfHour(m.bucket) AS bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment,
       sum(m.attempts) AS attempts,
       sum(m.requests) AS requests,
       sum(m.input_tokens) AS input_tokens,
       sum(m.output_tokens) AS output_tokens,
       sum(m.reasoning_tokens) AS reasoning_tokens,
       sum(m.cache_read_tokens) AS cache_read_tokens,
       sum(m.cache_write_tokens) AS cache_write_tokens,
       sum(m.cache_write_1h_tokens) AS cache_write_1h_tokens,
       sum(m.cost_input_usd) AS cost_input_usd,
       sum(m.cost_output_usd) AS cost_output_usd,
       sum(m.cost_reasoning_usd) AS cost_reasoning_usd,
       sum(m.cost_cache_read_usd) AS cost_cache_read_usd,
       sum(m.cost_cache_write_usd) AS cost_cache_write_usd,
       sum(m.cost_tools_usd) AS cost_tools_usd,
       sum(m.cost_total_usd) AS cost_total_usd,
       sum(m.cost_wasted_usd) AS cost_wasted_usd,
       sum(m.cost_unattributed_usd) AS cost_unattributed_usd,
       quantileTDigestMergeState(m.reasoning_tokens_per_request) AS reasoning_tokens_per_request,
       quantileTDigestMergeState(m.cost_per_request_usd) AS cost_per_request_usd
FROM {db}.rollup_minute AS m
GROUP BY bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_day_mv TO {db}.rollup_day AS
SELECT toStartOfDay(h.bucket) AS bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment,
       sum(h.attempts) AS attempts,
       sum(h.requests) AS requests,
       sum(h.input_tokens) AS input_tokens,
       sum(h.output_tokens) AS output_tokens,
       sum(h.reasoning_tokens) AS reasoning_tokens,
       sum(h.cache_read_tokens) AS cache_read_tokens,
       sum(h.cache_write_tokens) AS cache_write_tokens,
       sum(h.cache_write_1h_tokens) AS cache_write_1h_tokens,
       sum(h.cost_input_usd) AS cost_input_usd,
       sum(h.cost_output_usd) AS cost_output_usd,
       sum(h.cost_reasoning_usd) AS cost_reasoning_usd,
       sum(h.cost_cache_read_usd) AS cost_cache_read_usd,
       sum(h.cost_cache_write_usd) AS cost_cache_write_usd,
       sum(h.cost_tools_usd) AS cost_tools_usd,
       sum(h.cost_total_usd) AS cost_total_usd,
       sum(h.cost_wasted_usd) AS cost_wasted_usd,
       sum(h.cost_unattributed_usd) AS cost_unattributed_usd,
       quantileTDigestMergeState(h.reasoning_tokens_per_request) AS reasoning_tokens_per_request,
       quantileTDigestMergeState(h.cost_per_request_usd) AS cost_per_request_usd
FROM {db}.rollup_hour AS h
GROUP BY bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment;
