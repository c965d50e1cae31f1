-- 006: anomalies, one row per alert record the detect stage publishes (llm.cost.alerts.v1, kind anomaly): the
-- `firing` record when a signal of a feature becomes anomalous (again if it escalates to critical) and the
-- `resolved` record when it is back to normal. An incident is (feature_id, signal, incident_id); its current state
-- is its row with the latest detected_at. Times are event time (the stream's clock), not wall time.
--
-- ReplacingMergeTree ORDERED BY the incident and its record: a record written twice (the detect stage re-publishes
-- after a crash, the sink replays a batch) is the same key and collapses in merges; the sink's deterministic insert
-- token and the dedup window absorb a retried insert at once. ORDER BY feature first: dashboards and on-call read
-- one feature's history. PARTITION BY month: anomalies are few; TTL is left to operators.
CREATE TABLE IF NOT EXISTS {db}.anomalies
(
    detected_at      DateTime64(3, 'UTC'),
    feature_id       LowCardinality(String),
    team_id          LowCardinality(String),
    signal           LowCardinality(String),
    state            LowCardinality(String),
    severity         LowCardinality(String),
    value            Float64,
    baseline         Float64,
    score            Float64,
    dimension        LowCardinality(String),
    dimension_value  String,
    explanation      String,
    incident_id      String,
    incident_key     String,
    started_at       DateTime64(3, 'UTC'),
    window_start     DateTime64(3, 'UTC'),
    window_end       DateTime64(3, 'UTC'),
    requests         UInt32,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(detected_at)
ORDER BY (feature_id, signal, incident_id, state, detected_at)
SETTINGS non_replicated_deduplication_window = 10000;
