"""The query API's policy on ClickHouse's EXPLAIN AST text, the bearer-token check and the settings that gate it."""

from types import SimpleNamespace

import pytest

from streams.auth import authorized
from tally.config import load_settings
from tally.errors import ConfigError, QueryRefused
from tally.query_policy import check_select, parse_explain_ast

TOKEN = "s3cret-token-0123456789"

# Captured from chDB 26.9 (`EXPLAIN AST … FORMAT Native`, as the client sends it).
SELECT_FROM_TALLY = """SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Function count (children 1)
     ExpressionList
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier tally.usage_events (alias u)
 Identifier Native""".splitlines()


def test_a_select_over_tally_passes():
    check_select(parse_explain_ast(SELECT_FROM_TALLY), "tally")


@pytest.mark.parametrize("replace, says", [
    ("TableIdentifier system.tables", "system.tables"),
    ("Function file (alias f) (children 1)", "table function file()"),
])
def test_other_sources_are_refused(replace, says):
    lines = [replace if "TableIdentifier" in line else line for line in SELECT_FROM_TALLY]
    lines[-2] = "      " + replace
    with pytest.raises(QueryRefused, match=says.replace("(", r"\(").replace(")", r"\)")):
        check_select(parse_explain_ast(lines), "tally")


def test_into_outfile_and_other_statements_are_refused():
    outfile = [*SELECT_FROM_TALLY[:-1], " Literal 'x.txt'", " Identifier Native"]
    with pytest.raises(QueryRefused, match="INTO OUTFILE"):
        check_select(parse_explain_ast(outfile), "tally")
    with pytest.raises(QueryRefused, match="not Drop"):
        check_select(parse_explain_ast(["DropQuery  tally.usage_events"]), "tally")
    with pytest.raises(QueryRefused, match="more than one"):
        parse_explain_ast(["SelectWithUnionQuery", "SelectWithUnionQuery"])


def _request(header: str | None) -> SimpleNamespace:
    return SimpleNamespace(headers={} if header is None else {"Authorization": header})


def test_the_token_is_required_when_set():
    s = load_settings(env={"TALLY_API_TOKEN": TOKEN})
    assert authorized(_request(f"Bearer {TOKEN}"), s)
    assert not authorized(_request(None), s)
    assert not authorized(_request(f"Bearer {TOKEN}x"), s)
    assert not authorized(_request(f"Basic {TOKEN}"), s)
    assert authorized(_request(None), load_settings(env={}))  # loopback without a token: open


def test_a_non_loopback_bind_needs_a_token_and_the_token_stays_secret(tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address"):
        load_settings(env={"TALLY_WEB_HOST": "0.0.0.0"}).validated()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    s = load_settings(env={"TALLY_WEB_HOST": "0.0.0.0", "TALLY_API_TOKEN_FILE": str(token_file)}).validated()
    assert s.api_token == TOKEN and TOKEN in s.secrets
    assert TOKEN not in repr(s) and TOKEN not in str(s.to_env())
    assert load_settings(env={"TALLY_WEB_HOST": "::1"}).validated().web_loopback
    with pytest.raises(ConfigError, match="16 printable"):
        load_settings(env={"TALLY_API_TOKEN": "short"}).validated()
