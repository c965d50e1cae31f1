"""deploy/clickhouse/users.sql exercised on a real ClickHouse server (chDB has no access control).

Runs only when TALLY_TEST_CLICKHOUSE_URL names a server with an administrator (http://admin:pass@host:port) on
which tally's migrations and users.sql may be applied; skipped, with that reason, otherwise. The embedded
equivalents (the parser allow-list, the limits, readonly) run always: tests/integration/test_query_attacks.py.
"""

import os
import uuid
from urllib.parse import urlparse, urlunparse

import clickhouse_connect
import pytest

from tally.config import REPO_ROOT, load_settings
from tally.store import Store, split_statements

SERVER = os.environ.get("TALLY_TEST_CLICKHOUSE_URL", "")
pytestmark = pytest.mark.skipif(not SERVER, reason="TALLY_TEST_CLICKHOUSE_URL is not set: no ClickHouse server "
                                "with access control to exercise users.sql against (chDB has none)")
USERS_SQL = REPO_ROOT / "deploy" / "clickhouse" / "users.sql"


@pytest.fixture(scope="module")
def server():
    settings = load_settings(env={}, clickhouse_url=SERVER)
    with Store(settings) as admin:
        admin.migrate()
        for statement in split_statements(USERS_SQL.read_text()):
            admin.command(statement)
        admin.command("INSERT INTO tally.sink_offsets (consumer, topic, partition, offset) VALUES "
                      f"('lp-{uuid.uuid4().hex}', 't', 0, 1)")
        yield admin


def _as(server, user: str, password: str):
    url = urlparse(SERVER)
    port = f":{url.port}" if url.port else ""
    return clickhouse_connect.get_client(dsn=urlunparse(url._replace(netloc=f"{user}:{password}@{url.hostname}{port}")))


def test_the_writer_inserts_but_cannot_change_schema_or_read_other_tables(server):
    writer = _as(server, "tally_writer", "change-me-writer")
    writer.command("INSERT INTO tally.sink_offsets (consumer, topic, partition, offset) VALUES ('lp', 't', 0, 2)")
    assert writer.query("SELECT count() FROM tally.event_ids").result_rows
    for sql in ("DROP TABLE tally.sink_offsets", "ALTER TABLE tally.usage_events DELETE WHERE 1",
                "SELECT * FROM tally.sink_offsets", "SELECT * FROM file('/etc/passwd', 'LineAsString')"):
        with pytest.raises(Exception, match="ACCESS_DENIED|Not enough privileges"):
            writer.query(sql)


def test_the_dashboard_user_is_readonly_and_capped(server):
    dashboard = _as(server, "tally_dashboard", "change-me-dashboard")
    assert dashboard.query("SELECT count() FROM tally.usage_events").result_rows
    with pytest.raises(Exception, match="READONLY|ACCESS_DENIED|Not enough privileges"):
        dashboard.command("INSERT INTO tally.sink_offsets (consumer, topic, partition, offset) VALUES ('x','t',0,1)")
    with pytest.raises(Exception, match="TIMEOUT_EXCEEDED|TOO_MANY_ROWS|Limit"):
        dashboard.query("SELECT number FROM system.numbers LIMIT 200000")


def test_a_team_reader_sees_only_its_team(server):
    server.command("INSERT INTO tally.rollup_day (bucket, team_id, feature_id) VALUES (today(), 'inbox', 'a'), "
                   "(today(), 'billing', 'b')")
    team = _as(server, "team_inbox", "change-me-inbox")
    teams = {r[0] for r in team.query("SELECT DISTINCT team_id FROM tally.rollup_day").result_rows}
    assert teams == {"inbox"}
    with pytest.raises(Exception, match="ACCESS_DENIED|Not enough privileges"):
        team.query("SELECT count() FROM tally.sink_offsets")
