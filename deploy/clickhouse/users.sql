-- tally's ClickHouse users, roles and row policies for a production server.
--
-- Apply as an administrator, after `tally db migrate` created the tables:
--     clickhouse-client --user admin --multiquery < deploy/clickhouse/users.sql
-- Change every password first (or switch to your identification method). chDB, the embedded default, has no
-- access management (its only user cannot create users, roles or policies), so this file is for servers only;
-- tests/integration/test_clickhouse_users.py checks that every statement parses in the real ClickHouse parser and
-- names only tables that exist.

-- The sink workers: write the tables (materialized-view targets included), read only their dedup lookups and the
-- rollups the budget stage reads. No DDL, no ALTER, no DELETE.
CREATE USER IF NOT EXISTS tally_writer IDENTIFIED WITH sha256_password BY 'change-me-writer';
GRANT INSERT ON tally.* TO tally_writer;
GRANT SELECT ON tally.event_ids TO tally_writer;
GRANT SELECT ON tally.logical_request_heads TO tally_writer;
-- logical_requests: before splitting a request insert ClickHouse found too large, the sink checks it took none of it.
GRANT SELECT ON tally.logical_requests TO tally_writer;
GRANT SELECT ON tally.rollup_minute TO tally_writer;
GRANT SELECT ON tally.rollup_hour TO tally_writer;
-- Superseded rows (streams/supersede.py): the lookup of a call's rows, and a superseded row read back by its key.
GRANT SELECT ON tally.call_rows TO tally_writer;
GRANT SELECT ON tally.usage_events TO tally_writer;

-- Dashboards (Grafana's datasource, the live page in server mode): read-only, with time and result caps.
CREATE SETTINGS PROFILE IF NOT EXISTS tally_dashboard_profile SETTINGS
    readonly = 1,
    max_execution_time = 30,
    max_result_rows = 100000,
    result_overflow_mode = 'throw',
    max_rows_to_read = 2000000000,
    max_memory_usage = 4000000000;
CREATE USER IF NOT EXISTS tally_dashboard IDENTIFIED WITH sha256_password BY 'change-me-dashboard'
    SETTINGS PROFILE 'tally_dashboard_profile';
GRANT SELECT ON tally.* TO tally_dashboard;

-- Per-team readers: a role whose members see only their team's rows. A member user is named team_<team_id>
-- (for example team_inbox below); the policies compare team_id with that name.
CREATE ROLE IF NOT EXISTS tally_team_reader SETTINGS PROFILE 'tally_dashboard_profile';
GRANT SELECT ON tally.usage_events TO tally_team_reader;
GRANT SELECT ON tally.logical_requests TO tally_team_reader;
GRANT SELECT ON tally.logical_requests_current TO tally_team_reader;
GRANT SELECT ON tally.rollup_minute TO tally_team_reader;
GRANT SELECT ON tally.rollup_hour TO tally_team_reader;
GRANT SELECT ON tally.rollup_day TO tally_team_reader;
GRANT SELECT ON tally.superseded_events TO tally_team_reader;
GRANT SELECT ON tally.usage_events_current TO tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_team_usage_events ON tally.usage_events
    USING team_id = replaceOne(currentUser(), 'team_', '') TO tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_team_logical_requests ON tally.logical_requests
    USING team_id = replaceOne(currentUser(), 'team_', '') TO tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_team_superseded_events ON tally.superseded_events
    USING team_id = replaceOne(currentUser(), 'team_', '') TO tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_team_rollup_minute ON tally.rollup_minute
    USING team_id = replaceOne(currentUser(), 'team_', '') TO tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_team_rollup_hour ON tally.rollup_hour
    USING team_id = replaceOne(currentUser(), 'team_', '') TO tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_team_rollup_day ON tally.rollup_day
    USING team_id = replaceOne(currentUser(), 'team_', '') TO tally_team_reader;
-- A table with a row policy hides its rows from everyone the policies do not name: everyone else sees all rows.
CREATE ROW POLICY IF NOT EXISTS tally_all_usage_events ON tally.usage_events USING 1 TO ALL EXCEPT tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_all_logical_requests ON tally.logical_requests
    USING 1 TO ALL EXCEPT tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_all_superseded_events ON tally.superseded_events
    USING 1 TO ALL EXCEPT tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_all_rollup_minute ON tally.rollup_minute USING 1 TO ALL EXCEPT tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_all_rollup_hour ON tally.rollup_hour USING 1 TO ALL EXCEPT tally_team_reader;
CREATE ROW POLICY IF NOT EXISTS tally_all_rollup_day ON tally.rollup_day USING 1 TO ALL EXCEPT tally_team_reader;

-- One member per team (repeat for each team of the owners registry).
CREATE USER IF NOT EXISTS team_inbox IDENTIFIED WITH sha256_password BY 'change-me-inbox';
GRANT tally_team_reader TO team_inbox;
ALTER USER team_inbox DEFAULT ROLE tally_team_reader;
