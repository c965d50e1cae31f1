-- 013: priced_as beside model_actual: the price-card entry (provider/model) an attempt was priced as, '' when it was
-- not priced. A gateway sends the name its provider answered with (models/gemini-2.5-flash, a Bedrock id, an Azure
-- deployment, a dated snapshot); the card knows the canonical name, reached through a card alias, the model alias
-- table (kind: model_aliases) or a date suffix the card prices alike. Both are kept, so a FinOps analyst sees what was
-- sent and what it was billed as. Rows saved before this migration keep '' (their match is not recorded; `tally
-- price` answers it for any event). ADD COLUMN IF NOT EXISTS: safe on an existing database and to re-run.
ALTER TABLE {db}.usage_events ADD COLUMN IF NOT EXISTS priced_as LowCardinality(String) DEFAULT '' AFTER price_card_version;

-- usage_events_current (009) is SELECT *, and a view keeps the columns it had when it was created: made again, so
-- analysts see priced_as there too. CREATE OR REPLACE: in place, and safe to re-run.
CREATE OR REPLACE VIEW {db}.usage_events_current AS
SELECT * FROM {db}.usage_events WHERE event_id NOT IN (SELECT event_id FROM {db}.superseded_events);
