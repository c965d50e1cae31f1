"""An attacker's probes against the query API's engine path (Store.api_query): each is refused or cut, and the
sink's inserts on their own connection keep landing while an API query runs."""

import threading
import time

import pytest

from tally.config import load_settings
from tally.errors import QueryRefused, StoreError
from tally.store import Store

INSERT_BOUND_S = 2.0  # an insert beside a running API query; measured 9-19 ms, bounded loosely for a shared machine


@pytest.fixture
def api_store(tmp_path):
    s = Store(load_settings(env={}, data_dir=tmp_path, query_max_execution_s=2.0, query_max_result_rows=1000))
    s.migrate()
    yield s
    s.close()


@pytest.mark.parametrize("sql, says", [
    ("SELECT * FROM file('/etc/passwd', 'LineAsString') LIMIT 2", "table function file()"),
    ("SELECT file('/etc/passwd')", "function file()"),
    ("SELECT fIlE('/etc/passwd')", "function fIlE()"),
    ("SELECT * FROM url('http://127.0.0.1:9/api/status', 'LineAsString')", "table function url()"),
    ("SELECT * FROM s3('http://127.0.0.1:9/b/k', 'CSV')", "table function s3()"),
    ("SELECT * FROM remote('127.0.0.1:9000', system.one)", "table function remote()"),
    ("SELECT * FROM executable('id', 'TSV', 'x String')", "table function executable()"),
    ("SELECT * FROM numbers(20000000000)", "table function numbers()"),
    ("SELECT count() FROM tally.usage_events WHERE event_id IN (SELECT * FROM file('/etc/hosts', 'LineAsString'))",
     "table function file()"),
    ("SELECT name FROM system.tables", "system.tables"),
    ("SELECT * FROM `system`.`users`", "system.users"),
    ("SELECT * FROM INFORMATION_SCHEMA.TABLES", "INFORMATION_SCHEMA.TABLES"),
    ("SELECT 1 WHERE 'default' IN system.users", "system.users"),
    ("SELECT * FROM tally.usage_events JOIN system.one AS o ON 1", "system.one"),
    ("SELECT hostName(), version()", "hostName()"),
    ("SELECT getSetting('max_execution_time')", "getSetting()"),
    ("SELECT dictGet('d', 'a', 1)", "dictGet()"),
    ("SELECT joinGet('system.one', 'dummy', 0)", "joinGet()"),
    ("SELECT 1; SELECT * FROM file('/etc/passwd', 'LineAsString')", "Multi-statements"),
    ("SELECT 1;\nSELECT 2", "Multi-statements"),
    ("SELECT 1 /* ; */ ; DROP TABLE tally.usage_events", "Multi-statements"),
    ("SELECT 1 -- x\n; SELECT file('/etc/passwd')", "Multi-statements"),
    ("SELECT 1 INTO OUTFILE 'stolen.txt'", "INTO OUTFILE"),
    ("SELECT 1 FORMAT JSON", "FORMAT"),
    ("SELECT 1 SETTINGS max_execution_time = 0", "readonly"),
    ("DROP TABLE tally.usage_events", "not Drop"),
    ("INSERT INTO tally.sink_offsets VALUES ('c', 't', 0, 99)", "not Insert"),
    ("SHOW TABLES FROM system", "not ShowTables"),
    ("EXPLAIN AST SELECT * FROM file('/etc/passwd')", "not Explain"),
    ("SET readonly = 0", "not Set"),
    ("SELECT/**/*/**/FROM/**/file('/etc/passwd','LineAsString')", "table function file()"),
    ("SELECT * FROM \"file\"('/etc/passwd', 'LineAsString')", "file"),
    ("SELECT\u00a0*\u00a0FROM file('/etc/passwd', 'LineAsString')", ""),
    ("SELECT * FROM fіle('/etc/passwd', 'LineAsString')", ""),  # a Cyrillic і: not ClickHouse's file
])
def test_probe_is_refused(api_store, sql, says):
    with pytest.raises(StoreError) as refused:
        api_store.api_query(sql)
    assert says.lower() in str(refused.value).lower()
    assert "root:" not in str(refused.value)


def test_into_outfile_writes_nothing(api_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QueryRefused):
        api_store.api_query(f"SELECT 1 INTO OUTFILE '{tmp_path / 'stolen.txt'}'")
    assert not (tmp_path / "stolen.txt").exists()


def test_a_10_mb_query_is_refused_before_it_is_parsed(api_store):
    sql = "SELECT " + " + ".join(["1"] * 5_000_000)
    assert len(sql) > 10_000_000
    started = time.monotonic()
    with pytest.raises(QueryRefused, match="at most 65536 are accepted"):
        api_store.api_query(sql)
    assert time.monotonic() - started < 1.0


def test_tallys_own_queries_pass_and_see_the_data(api_store):
    api_store.record_offsets("c", "t", {0: 41, 1: 7})
    res = api_store.api_query("WITH o AS (SELECT partition, max(offset) AS m FROM {db}.sink_offsets GROUP BY partition)"
                              " SELECT partition, m FROM o ORDER BY partition -- a comment")
    assert res.columns == ["partition", "m"] and res.rows == [(0, 41), (1, 7)]
    assert api_store.api_query("SELECT count() FROM usage_events").rows == [(0,)]  # unqualified: tally's


def test_a_query_that_never_ends_is_cut_and_inserts_keep_landing(api_store):
    heavy = ("SELECT count() FROM (SELECT arrayJoin(range(100000)) AS a) AS x "
             "CROSS JOIN (SELECT arrayJoin(range(100000)) AS b) AS y WHERE cityHash64(a, b) % 7 = 1")
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["rows"] = api_store.api_query(heavy).rows
        except StoreError as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.monotonic() - started

    query = threading.Thread(target=run)
    query.start()
    time.sleep(0.3)
    latencies = []
    for i in range(8):  # bounded: 8 inserts while the query runs
        started = time.monotonic()
        api_store.record_offsets("sink", "t", {0: i})
        latencies.append(time.monotonic() - started)
        time.sleep(0.1)
    query.join(timeout=30)
    assert not query.is_alive()
    assert "Timeout exceeded" in str(outcome.get("error")), outcome
    assert outcome["seconds"] < 6  # query_max_execution_s = 2, with slack for a busy machine
    assert max(latencies) < INSERT_BOUND_S, latencies
    assert api_store.stored_offsets("sink", "t") == {0: 7}


def test_results_and_memory_are_capped(api_store):
    with pytest.raises(StoreError, match="Limit for result exceeded"):
        api_store.api_query("SELECT arrayJoin(range(5000)) AS n")  # no table read: capped all the same
    with pytest.raises(StoreError, match="Limit for result exceeded"):
        api_store.api_query("SELECT * FROM (SELECT arrayJoin(range(5000)) AS n) ORDER BY n")
    with pytest.raises(StoreError, match="memory limit"):
        api_store.api_query("SELECT sum(n) FROM (SELECT arrayJoin(range(200000000)) AS n)")


def test_the_api_connection_is_readonly_even_if_the_check_were_bypassed(api_store):
    client = api_store._api_client()
    try:
        with pytest.raises(Exception, match="readonly"):
            client.query("SELECT * FROM file('/etc/passwd', 'LineAsString')")
        with pytest.raises(Exception, match="readonly"):
            client.command("DROP TABLE tally.sink_offsets")
    finally:
        api_store._api_clients.put(client)
