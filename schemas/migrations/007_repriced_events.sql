-- 007: repriced_events, usage_events re-rated with a named (corrected) price card by `tally report reprice --apply`.
--
-- usage_events is never modified: it stays as billed. Each row here is one event re-rated with one card version,
-- with the as-billed cost and card beside the re-rated cost lines, so "billed vs re-rated" is one query.
-- ORDER BY (price_card_version, event_id): the row's identity. ReplacingMergeTree(repriced_at) keeps one row per
-- (card version, event) after merges, so re-running a window (or an overlapping one) never adds rows: read with
-- FINAL (or argMax by repriced_at) for exact sums before a merge. A rerun whose re-rated costs are unchanged sends
-- the same deterministic insert_deduplication_token per day and is absorbed outright (dedup window below); a
-- card corrected under the same version yields new costs, a new token, and the newer repriced_at wins.
-- PARTITION BY month of the event time, like usage_events: finance re-rates and closes by month, and an event's
-- rows for every card version share its partition (ReplacingMergeTree only replaces within a partition).
CREATE TABLE IF NOT EXISTS {db}.repriced_events
(
    price_card_version            LowCardinality(String),
    event_id                      String,
    ts                            DateTime64(3, 'UTC'),
    provider                      LowCardinality(String),
    model_actual                  LowCardinality(String),
    team_id                       LowCardinality(String),
    product                       LowCardinality(String),
    feature_id                    LowCardinality(String),
    tenant_id                     String,
    cost_center                   LowCardinality(String),
    billed_price_card_version     LowCardinality(String),
    billed_pricing_status         LowCardinality(String),
    billed_cost_total_usd         Decimal(38, 18),
    cost_input_usd                Decimal(38, 18),
    cost_output_usd               Decimal(38, 18),
    cost_reasoning_usd            Decimal(38, 18),
    cost_cache_read_usd           Decimal(38, 18),
    cost_cache_write_usd          Decimal(38, 18),
    cost_tools_usd                Decimal(38, 18),
    cost_total_usd                Decimal(38, 18),
    pricing_status                LowCardinality(String),
    pricing_note                  String,
    repriced_at                   DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(repriced_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (price_card_version, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
