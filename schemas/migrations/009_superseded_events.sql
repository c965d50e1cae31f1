-- 009: one physical call, one row in every sum. A call (request_id) can have several usage_events rows: a cut stream
-- priced `estimated` and later corrected by its real usage (a new event_id), or a call published twice. The fold
-- counts one of them (streams.fold.effective: real usage beats none, then the latest ts, then event_id); the sink
-- makes every aggregate agree (streams/supersede.py): each row that no longer counts is written once to
-- superseded_events, whose materialized view subtracts it from rollup_minute (→ hour → day), and row-level reports
-- read usage_events_current (usage_events without superseded rows). usage_events itself stays as received.
--
-- Negative deltas need signed sums: attempts and token counts of the rollups become Int64 (ALTERs: they apply to an
-- existing database; old parts are read through the conversion until merged).
ALTER TABLE {db}.rollup_minute
    MODIFY COLUMN attempts SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN input_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN output_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN reasoning_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_read_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_write_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_write_1h_tokens SimpleAggregateFunction(sum, Int64);

ALTER TABLE {db}.rollup_hour
    MODIFY COLUMN attempts SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN input_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN output_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN reasoning_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_read_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_write_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_write_1h_tokens SimpleAggregateFunction(sum, Int64);

ALTER TABLE {db}.rollup_day
    MODIFY COLUMN attempts SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN input_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN output_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN reasoning_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_read_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_write_tokens SimpleAggregateFunction(sum, Int64),
    MODIFY COLUMN cache_write_1h_tokens SimpleAggregateFunction(sum, Int64);

-- superseded_events: one row per usage_events row that no longer counts, with the columns its rollup contribution
-- came from (so the subtraction is exact) and the row that superseded it. Never deleted: usage_events_current and
-- audits need it as long as usage_events keeps the row. ORDER BY and PARTITION BY mirror usage_events (reports
-- filter by owner and time). ReplacingMergeTree on the row's identity plus the sink's deterministic insert token and
-- the dedup window (here and on every view target below): a retried insert is absorbed, never subtracted twice.
CREATE TABLE IF NOT EXISTS {db}.superseded_events
(
    event_id               String,
    request_id             String,
    logical_request_id     String,
    superseded_by          String,
    superseded_at          DateTime64(3, 'UTC'),
    ts                     DateTime64(3, 'UTC'),
    usage_reported         Bool,
    pricing_status         LowCardinality(String),
    team_id                LowCardinality(String),
    product                LowCardinality(String),
    feature_id             LowCardinality(String),
    model_actual           LowCardinality(String),
    provider               LowCardinality(String),
    tenant_id              String,
    environment            LowCardinality(String),
    attribution_status     LowCardinality(String),
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
    cost_total_usd         Decimal(38, 18)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (team_id, feature_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- The subtraction: the exact negative of what rollup_minute_attempts_mv added for the row (same bucket, same keys).
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_minute_superseded_mv TO {db}.rollup_minute AS
SELECT toStartOfMinute(s.ts) AS bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment,
       -toInt64(count()) AS attempts,
       toInt64(0) AS requests,
       -toInt64(sum(s.input_tokens)) AS input_tokens,
       -toInt64(sum(s.output_tokens)) AS output_tokens,
       -toInt64(sum(s.reasoning_tokens)) AS reasoning_tokens,
       -toInt64(sum(s.cache_read_tokens)) AS cache_read_tokens,
       -toInt64(sum(s.cache_write_tokens)) AS cache_write_tokens,
       -toInt64(sum(s.cache_write_1h_tokens)) AS cache_write_1h_tokens,
       -sum(s.cost_input_usd) AS cost_input_usd,
       -sum(s.cost_output_usd) AS cost_output_usd,
       -sum(s.cost_reasoning_usd) AS cost_reasoning_usd,
       -sum(s.cost_cache_read_usd) AS cost_cache_read_usd,
       -sum(s.cost_cache_write_usd) AS cost_cache_write_usd,
       -sum(s.cost_tools_usd) AS cost_tools_usd,
       -sum(s.cost_total_usd) AS cost_total_usd,
       toDecimal128(0, 18) AS cost_wasted_usd,
       -sumIf(s.cost_total_usd, s.attribution_status != 'attributed') AS cost_unattributed_usd,
       quantileTDigestStateIf(toUInt64(0), 0) AS reasoning_tokens_per_request,
       quantileTDigestStateIf(toFloat64(0), 0) AS cost_per_request_usd
FROM {db}.superseded_events AS s
GROUP BY bucket, team_id, product, feature_id, model_actual, provider, tenant_id, environment;

-- call_rows: the sink's "which rows does this physical call have, and which are already superseded?" lookup. A call
-- is a request_id within its logical request, as in the fold (two logical requests may reuse a request_id).
-- One row per usage_events row (superseded = false) and one per superseded_events row (superseded = true), filled by
-- materialized views in the same inserts. ORDER BY request_id: the sink asks for its batch's request_ids.
-- (team_id, feature_id, ts, event_id) is usage_events' primary key: the sink reads a superseded row back by it.
-- TTL = the dedup window, like event_ids: a row arriving later than that for a call is outside the guarantee.
-- A superseded marker lives from superseded_at, later than its row: the row's marker never outlives it.
CREATE TABLE IF NOT EXISTS {db}.call_rows
(
    request_id          String,
    logical_request_id  String,
    event_id            String,
    superseded          Bool,
    usage_reported      Bool,
    ts                  DateTime64(3, 'UTC'),
    team_id             LowCardinality(String),
    feature_id          LowCardinality(String),
    ingested_at         DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (request_id, event_id, superseded)
TTL toDateTime(ingested_at) + INTERVAL {dedup_window_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.call_rows_mv TO {db}.call_rows AS
SELECT request_id, logical_request_id, event_id, false AS superseded, usage_reported, ts, team_id, feature_id,
       ingested_at
FROM {db}.usage_events;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.call_rows_superseded_mv TO {db}.call_rows AS
SELECT request_id, logical_request_id, event_id, true AS superseded, usage_reported, ts, team_id, feature_id,
       superseded_at AS ingested_at
FROM {db}.superseded_events;

-- Rows saved within the dedup window before this migration: a correction arriving after it finds its estimate.
INSERT INTO {db}.call_rows
SELECT request_id, logical_request_id, event_id, false, usage_reported, ts, team_id, feature_id, ingested_at
FROM {db}.usage_events
WHERE ingested_at >= now64(3) - INTERVAL {dedup_window_days} DAY;

-- Each physical call once, at its latest cost (row-level reports: chargeback, FOCUS, reconcile). superseded_events
-- holds few rows (estimates and republished calls), so the anti-join reads a small set.
CREATE VIEW IF NOT EXISTS {db}.usage_events_current AS
SELECT * FROM {db}.usage_events WHERE event_id NOT IN (SELECT event_id FROM {db}.superseded_events);

-- Calls whose rows were all saved before this migration (within the dedup window): supersede them now, as the sink
-- would (the winner by call_rank: real usage, then latest ts, then event_id). Last, so a failed migration that is
-- run again has not subtracted anything yet; the token absorbs a retried statement.
INSERT INTO {db}.superseded_events
SELECT u.event_id, u.request_id, u.logical_request_id, w.winner AS superseded_by, w.at AS superseded_at, u.ts, u.usage_reported,
       u.pricing_status, u.team_id, u.product, u.feature_id, u.model_actual, u.provider, u.tenant_id, u.environment,
       u.attribution_status, u.input_tokens, u.output_tokens, u.reasoning_tokens, u.cache_read_tokens,
       u.cache_write_tokens, u.cache_write_1h_tokens, u.cost_input_usd, u.cost_output_usd, u.cost_reasoning_usd,
       u.cost_cache_read_usd, u.cost_cache_write_usd, u.cost_tools_usd, u.cost_total_usd
FROM {db}.usage_events AS u
INNER JOIN (SELECT request_id, logical_request_id, argMax(event_id, (usage_reported, ts, event_id)) AS winner,
                   max(ingested_at) AS at
            FROM {db}.call_rows GROUP BY request_id, logical_request_id HAVING uniqExact(event_id) > 1) AS w
        ON u.request_id = w.request_id AND u.logical_request_id = w.logical_request_id
WHERE u.event_id != w.winner AND u.event_id IN (SELECT event_id FROM {db}.call_rows)
SETTINGS insert_deduplicate = 1, insert_deduplication_token = '009_superseded_events',
         deduplicate_blocks_in_dependent_materialized_views = 1;
