-- 014: budget_decisions, one row per record the gateways' admission clients publish on llm.budget.decisions.v1
-- (tally.sdk.admission): admit, fallback and deny decisions with their payload, attempts drawn from a reservation,
-- and settlements. What finance reads to audit a denial without replaying traces, and what the reports count as
-- denials, fallbacks and cost avoided.
--
-- ReplacingMergeTree ORDER BY decision_id: a record the sink writes twice (a replay) is one key and collapses in
-- merges; the sink's deterministic insert token absorbs a retried insert at once. PARTITION BY month.
CREATE TABLE IF NOT EXISTS {db}.budget_decisions
(
    decided_at          DateTime64(3, 'UTC'),
    decision_id         String,
    gateway_id          LowCardinality(String),
    action              LowCardinality(String),
    reason              LowCardinality(String),
    request_id          String,
    parent_request_id   String,
    logical_request_id  String,
    feature_id          LowCardinality(String),
    tenant_id           LowCardinality(String),
    tier                LowCardinality(String),
    provider            LowCardinality(String),
    model               LowCardinality(String),
    budgets             Array(LowCardinality(String)),
    reserve_delta_usd   Decimal(38, 18),
    requested_usd       Decimal(38, 18),
    cost_usd            Decimal(38, 18),
    avoided_usd         Decimal(38, 18),
    policy_version      LowCardinality(String),
    price_card_version  LowCardinality(String),
    record              String CODEC(ZSTD(3)),
    inserted_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(decided_at)
ORDER BY decision_id
SETTINGS non_replicated_deduplication_window = 10000;
