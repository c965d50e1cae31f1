"""deploy/clickhouse/users.sql: every statement parses in ClickHouse's own parser and names existing tables.

chDB has no access management (its only user may not create users, roles or row policies), so the row policy is
not exercised here; on a server, apply the file and query as team_inbox to see only team inbox's rows.
"""

import re

from tally.config import REPO_ROOT
from tally.store import split_statements

USERS_SQL = REPO_ROOT / "deploy" / "clickhouse" / "users.sql"


def test_every_statement_parses_and_names_existing_tables(store):
    statements = split_statements(USERS_SQL.read_text())
    kinds = {" ".join(s.split()[:2]).upper() for s in statements}
    assert {"CREATE USER", "CREATE ROLE", "CREATE ROW", "CREATE SETTINGS", "GRANT INSERT", "GRANT SELECT"} <= kinds
    for sql in statements:
        # formatQuery parses without executing; a syntax error raises.
        formatted = store.query("SELECT formatQuery({q:String})", parameters={"q": sql}).rows[0][0]
        assert formatted, sql
    tables = {r[0] for r in store.query("SELECT name FROM system.tables WHERE database = 'tally'").rows}
    named = set(re.findall(r"\btally\.(\w+)", USERS_SQL.read_text()))
    assert named and named <= tables, named - tables


def test_the_writer_cannot_change_schema_and_the_dashboard_is_capped():
    text = USERS_SQL.read_text()
    writer = [s for s in split_statements(text) if "TO tally_writer" in s]
    assert writer and all(s.startswith(("GRANT INSERT", "GRANT SELECT")) for s in writer)
    assert "readonly = 1" in text and "max_execution_time" in text and "max_result_rows" in text
