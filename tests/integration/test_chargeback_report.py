"""The chargeback report on real ClickHouse (chDB): known priced rows written by the sinks, figures checked by hand."""

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal as D

import orjson
import pytest

from ops.reports.chargeback import UNATTRIBUTED, Period, build_report, parse_rules, pct, run_report
from ops.reports.chargeback import fetch as fetch_data
from streams.fold import FoldConfig, Folder, apply_writes
from streams.pipeline import FoldStep, process_messages
from streams.records import COST_COLUMNS, Source
from streams.sink import ATTEMPT_ROWS, REQUEST_ROWS, RequestWriter, SinkWriter, decode_rows
from streams.validate import Validator
from tally.partitioning import partition_for
from tally.reference import snapshot_of
from tests.factories import attempt_row_factory, event_factory, in_message

pytestmark = pytest.mark.integration
OFFSETS = itertools.count()  # each sink input message of these tests at its own offset

NOV = Period(date(2026, 11, 1), date(2026, 12, 1), "2026-11")
NOW = datetime(2026, 11, 24, 0, 30, tzinfo=UTC)   # week over week: [11-17 01:00, 11-24 01:00) vs the week before
SEARCH = "/v1/search/answer"

RULES = """
shared_costs:
  - {name: observability, amount_usd: "10.00", period: "2026-11", rule: proportional_to_requests}
  - {name: commitment, amount_usd: "1.00", period: "2026-11", rule: proportional_to_tokens}
  - name: platform
    amount_usd: "3.00"
    period: "2026-11"
    rule: fixed_split
    split: {search: "33.33", inbox: "33.33", growth: "33.34"}
  - {name: october_thing, amount_usd: "5.00", period: "2026-10", rule: proportional_to_requests}
"""


def attempt(lid, day, *, team="search", feature="search_answer", endpoint=SEARCH, deploy="v1", n=0, final=True,
            status="ok", output_tokens=300, reasoning_tokens=0, **costs):
    """A priced attempt at 12:00 UTC on `day` of Nov 2026 (or a date), with the given class costs (strings)."""
    when = day if isinstance(day, date) else date(2026, 11, day)
    ts = datetime(when.year, when.month, when.day, 12, n, tzinfo=UTC)
    r = attempt_row_factory(lid, attempt=n, final=final, status=status, ts_ms=int(ts.timestamp() * 1000),
                            feature_id=feature, output_tokens=output_tokens)
    r.update(team_id=team, endpoint=endpoint, deploy_version=deploy, reasoning_tokens=reasoning_tokens)
    for c in COST_COLUMNS:
        r[c] = D(costs.get(c.removeprefix("cost_").removesuffix("_usd"), "0"))
    r["cost_total_usd"] = sum((r[c] for c in COST_COLUMNS if c != "cost_total_usd"), D(0))
    if team == "":
        r.update(attribution_status="unattributed", attribution_reason="unknown_feature")
    return r


def scenario():
    """Requests as lists of attempts (input tokens 1000 per attempt, output 300 unless said)."""
    return [
        [attempt("S0", date(2026, 10, 28), deploy="v0", output="0.2")],                     # before the period
        [attempt("S1", 10, input="0.10", output="0.20", reasoning="0.30", reasoning_tokens=300)],
        [attempt("S2", 10, n=0, final=False, status="error", input="0.05"),
         attempt("S2", 10, n=1, output="0.10", reasoning="0.50", reasoning_tokens=500)],
        [attempt("S3", 11, output="0.40")],
        [attempt("S4", 12, deploy="v2", output="0.10", reasoning="0.90", reasoning_tokens=900)],
        [attempt("I1", 20, team="inbox", feature="summarize_email_v2", endpoint="/v1/summarize", deploy="",
                 input="0.000000000000000001", output="1.000000000000000002")],
        [attempt("I2", 21, team="inbox", feature="summarize_email_v2", endpoint="/v1/summarize", deploy="",
                 output="0.05", reasoning="0.25", cache_read="0.01", tools="0.02", reasoning_tokens=100)],
        [attempt("U1", 15, team="", feature="experimental_agent", endpoint="", deploy="", output="0.70")],
    ]


@pytest.fixture
def loaded(store, now):
    """The scenario written by the sinks: attempts ingested and requests emitted at `now` (inside the dedup window)."""
    requests = scenario()
    assert SinkWriter(store).write(in_message([a for req in requests for a in req])) == 9
    folder, state, writer = Folder(FoldConfig(), 4), {}, RequestWriter(store)
    for req in requests:
        res = folder.fold(req, state, req[-1]["ts"].timestamp() + 1, now)
        apply_writes(state, res.writes)
        assert writer.write(res.emitted) == 1
    return store


def query_of(store, through_json=False):
    def query(sql):
        res = store.query(sql)
        rows = [list(r) for r in res.rows]
        if through_json:  # what the worker's /api/query returns (orjson, default=str)
            rows = orjson.loads(orjson.dumps(rows, default=str))
        return res.columns, rows
    return query


def table(report, name):
    t = next(t for t in report.tables if t.name == name)
    return [dict(zip(t.columns, r, strict=True)) for r in t.rows]


def test_chargeback_figures_equal_hand_computed_values(loaded):
    rules = parse_rules(RULES, "rules.yaml")
    data = fetch_data(query_of(loaded), NOV, NOW)
    assert fetch_data(query_of(loaded, through_json=True), NOV, NOW) == data
    report = build_report("chargeback", data, NOV, rules, NOW, "chDB")

    classes = {r["team"]: r for r in table(report, "classes")}
    assert list(classes) == ["search", "inbox", UNATTRIBUTED]  # by cost, the unattributed bucket last
    assert classes["search"] == {
        "team": "search", "input_usd": D("0.15"), "output_usd": D("0.80"), "reasoning_usd": D("1.70"),
        "cache_read_usd": D(0), "cache_write_usd": D(0), "tools_usd": D(0), "total_usd": D("2.65"),
        "reasoning_share_pct": D("64.15")}
    assert classes["inbox"]["total_usd"] == D("1.330000000000000003")  # exact to 1e-18
    assert (classes["inbox"]["cache_read_usd"], classes["inbox"]["tools_usd"]) == (D("0.01"), D("0.02"))
    assert classes["inbox"]["reasoning_share_pct"] == D("18.80")  # 0.25 / 1.330000000000000003
    assert classes[UNATTRIBUTED]["total_usd"] == D("0.70")

    charges = {r["team"]: r for r in table(report, "charges")}
    # observability 10.00 by requests 4 / 2 / 1: 5.71, 2.86, 1.43 (largest remainders .857 and .714 get a cent);
    # commitment 1.00 by tokens 8,200 / 2,700 / 1,300: 0.67, 0.22, 0.11; platform 3.00 at 33.33/33.33/33.34 %.
    assert charges["search"] == {
        "team": "search", "cost_center": "", "requests": 4, "direct_usd": D("2.65"),
        "allocated_usd": D("7.38"), "charged_usd": D("10.03"), "reasoning_share_pct": D("64.15"),
        "retry_waste_pct": D("1.89"), "wow_change_pct": D("-100.00")}
    assert charges["inbox"]["allocated_usd"] == D("4.08")
    assert charges["inbox"]["charged_usd"] == D("5.410000000000000003")
    assert charges["inbox"]["wow_change_pct"] is None  # nothing in the week before
    assert charges[UNATTRIBUTED]["allocated_usd"] == D("1.54")
    assert charges[UNATTRIBUTED]["charged_usd"] is None  # charged to nobody
    assert charges["growth"]["direct_usd"] == 0 and charges["growth"]["allocated_usd"] == D("1.00")

    alloc = [(r["item"], r["team"], r["basis"], r["allocated_usd"]) for r in table(report, "allocations")]
    assert alloc == [
        ("observability", "search", 4, D("5.71")), ("observability", "inbox", 2, D("2.86")),
        ("observability", UNATTRIBUTED, 1, D("1.43")),
        ("commitment", "search", 8200, D("0.67")), ("commitment", "inbox", 2700, D("0.22")),
        ("commitment", UNATTRIBUTED, 1300, D("0.11")),
        ("platform", "growth", D("33.34"), D("1.00")), ("platform", "inbox", D("33.33"), D("1.00")),
        ("platform", "search", D("33.33"), D("1.00"))]
    assert any("october_thing" in n and "not allocated" in n for n in report.notes)

    waste = {r["team"]: r for r in table(report, "waste")}
    assert (waste["search"]["requests"], waste["search"]["request_cost_usd"], waste["search"]["wasted_usd"]) == (
        4, D("2.65"), D("0.05"))

    endpoints = table(report, "reasoning_endpoints")
    assert [(e["team"], e["endpoint"], e["requests"], e["reasoning_requests"], e["reasoning_tokens"],
             e["p50_reasoning_per_request"], e["p90_reasoning_per_request"], e["reasoning_per_output_token"],
             e["reasoning_usd"]) for e in endpoints] == [
        ("inbox", "/v1/summarize", 2, 1, 100, 100, 100, D("0.17"), D("0.25")),
        # S1 300, S2 500, S4 900 (S3 had none): exact p50 500, p90 900; output tokens 300 × 5 attempts
        ("search", SEARCH, 4, 3, 1700, 500, 900, D("1.13"), D("1.70"))]

    week = {r["team"]: r for r in table(report, "week_over_week")}
    assert (week["search"]["last_7d_usd"], week["search"]["prior_7d_usd"]) == (D(0), D("2.65"))
    assert (week["inbox"]["last_7d_usd"], week["inbox"]["prior_7d_usd"]) == (D("1.330000000000000003"), D(0))

    daily = {r["day"]: r for r in table(report, "reasoning_daily")}
    assert (daily[date(2026, 11, 10)]["search"], daily[date(2026, 11, 11)]["search"],
            daily[date(2026, 11, 12)]["search"], daily[date(2026, 11, 13)]["search"]) == (
        D("64.00"), D("0.00"), D("90.00"), None)

    jumps = [(j["team"], j["day"], j["share_before_pct"], j["share_pct"], j["change_pp"], j["deploys"])
             for j in table(report, "reasoning_jumps")]
    assert jumps == [
        ("search", date(2026, 11, 10), D("0.00"), D("64.00"), D("64.00"), f"{SEARCH} v1 (2026-11-10 12:00)"),
        ("search", date(2026, 11, 11), D("64.00"), D("0.00"), D("-64.00"), ""),
        ("search", date(2026, 11, 12), D("0.00"), D("90.00"), D("90.00"), f"{SEARCH} v2 (2026-11-12 12:00)"),
        ("inbox", date(2026, 11, 21), D("0.00"), D("75.76"), D("75.76"), "")]

    deploys = [(d["deploy_version"], d["previous_version"], d["first_seen"], d["share_day_before_pct"],
                d["share_deploy_day_pct"], d["share_day_after_pct"]) for d in table(report, "deploys")]
    assert deploys == [
        ("v1", "v0", datetime(2026, 11, 10, 12, tzinfo=UTC), D("0.00"), D("64.00"), D("0.00")),
        ("v2", "v1", datetime(2026, 11, 12, 12, tzinfo=UTC), D("0.00"), D("90.00"), None)]

    unattributed = table(report, "unattributed")
    assert unattributed == [{"reason": "unknown_feature", "feature_id": "experimental_agent", "attempts": 1,
                             "cost_usd": D("0.70"), "pct_of_total": D("14.96")}]
    assert report.notes[0] == ("Direct LLM cost 4.680000000000000003 USD; unattributed 0.70 USD (14.96 %); "
                               "shared costs allocated: 14.00 USD.")


def test_showback_frames_the_same_figures_as_information(loaded, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    charge = run_report("chargeback", query_of(loaded), NOV, rules, NOW, "chDB")
    show = run_report("showback", query_of(loaded), NOV, rules, NOW, "chDB")
    assert show.title == "Showback 2026-11" and charge.title == "Chargeback 2026-11"
    assert "would_be_charged_usd" in show.tables[0].columns and "charged_usd" in charge.tables[0].columns
    assert [t.rows for t in show.tables] == [t.rows for t in charge.tables]
    assert show.notes[0].startswith("Showback: ")


def test_cli_renders_the_report_from_the_store_when_no_worker_runs(loaded, tmp_path, capsys):
    from ops.cli import main
    from tests.conftest import free_ports

    loaded.close()  # release the chDB directory: with no worker answering, the CLI opens it itself
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    args = ["--data-dir", str(tmp_path), "--web-port", str(free_ports(1)[0]), "report"]
    main([*args, "--format", "json", "chargeback", "--period", "2026-11", "--rules", str(rules)])
    doc = orjson.loads(capsys.readouterr().out)
    charges = {r["team"]: r for r in doc["tables"]["charges"]["rows"]}
    assert (charges["search"]["direct_usd"], charges["search"]["charged_usd"]) == ("2.65", "10.03")
    assert charges["inbox"]["charged_usd"] == "5.410000000000000003"

    out = tmp_path / "nov.csv"
    main([*args, "--format", "csv", "--table", "allocations", "--output", str(out), "showback", "--period",
          "2026-11", "--rules", str(rules)])
    assert out.read_text().splitlines()[:2] == [
        "item,rule,period,item_usd,team,basis,share_pct,allocated_usd",
        "observability,proportional to logical requests,2026-11,10,search,4,57.1,5.71"]

    (tmp_path / "bad.yaml").write_text("shared_costs:\n  - {name: x, amount_usd: 5, period: '2026-11', "
                                       "rule: proportional_to_tokens}\n")
    for bad, message in (([*args, "chargeback", "--period", "2026-13"], "'2026-13' is not a month"),
                         ([*args, "chargeback", "--rules", str(tmp_path / "bad.yaml")],
                          "amount_usd must be a quoted decimal string"),
                         ([*args, "--table", "nope", "chargeback"], "no table named 'nope'")):
        with pytest.raises(SystemExit) as exit_:
            main(bad)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err.replace("\n", " ")


def test_spend_tagged_with_a_ghost_team_is_unattributed_not_billed(store, docs):
    # Issue 11: `team_id: ghost_team` (not in the registry) was stored as attributed and billed to a team with no
    # cost center. Through the real validate → enrich → fold → sinks, it now lands in the unattributed bucket.
    ghost, known = (event_factory(timestamp=f"2026-11-15T12:00:0{i}Z", final=True,
                                  tags={"team_id": team, "feature_id": "search_answer", "endpoint": SEARCH})
                    for i, team in enumerate(("ghost_team", "search")))
    messages = [(orjson.dumps(e), Source("llm.usage.v1", partition_for(e["request_id"], 4), i))
                for i, e in enumerate((ghost, known))]
    out = process_messages(messages, Validator(), snapshot_of(docs), 4, NOW,
                           FoldStep(Folder(FoldConfig(), 4), {}, 4), NOW.timestamp())
    attempts = [r for lines in out.attempts.values()
                for r in decode_rows(b"\n".join(lines), Source("a", 0, next(OFFSETS)), ATTEMPT_ROWS)[0]]
    requests = [r for lines in out.requests.values()
                for r in decode_rows(b"\n".join(lines), Source("r", 0, next(OFFSETS)), REQUEST_ROWS)[0]]
    assert (SinkWriter(store).write(attempts), RequestWriter(store).write(requests)) == (2, 2)
    cost = {r["event_id"]: D(r["cost_total_usd"]) for r in attempts}
    assert cost[ghost["event_id"]] > 0

    report = build_report("chargeback", fetch_data(query_of(store), NOV, NOW), NOV, parse_rules(RULES, "r.yaml"),
                          NOW, "chDB")
    classes = {r["team"]: r["total_usd"] for r in table(report, "classes")}
    assert classes == {"search": cost[known["event_id"]], UNATTRIBUTED: cost[ghost["event_id"]]}
    charges = {r["team"]: r for r in table(report, "charges")}
    assert "ghost_team" not in charges and charges[UNATTRIBUTED]["charged_usd"] is None  # charged to nobody
    assert table(report, "unattributed") == [
        {"reason": "unknown_team", "feature_id": "search_answer", "attempts": 1, "cost_usd": cost[ghost["event_id"]],
         "pct_of_total": pct(cost[ghost["event_id"]], sum(cost.values()))}]
    stored = store.query("SELECT team_id, tags['team_id'], attribution_reason, attribution_conflict FROM "
                         f"{{db}}.usage_events WHERE event_id = '{ghost['event_id']}'").rows
    assert [tuple(r) for r in stored] == [("", "ghost_team", "unknown_team",
                                           "team_id: tag=ghost_team not in registry 2026-02-01")]


def test_the_gateways_denials_and_fallbacks_are_charged_to_the_feature_s_team(loaded):
    import re

    from streams.decisions import DecisionWriter, decode_decisions
    from streams.records import Source
    from tally.reference import parse_reference_yaml
    from tally.sdk.admission import Admission
    from tests.unit.test_admission import CARD, REQ, policy, state

    at = (NOV.start_dt + timedelta(days=20)).timestamp()
    records: list = []
    gateway = Admission("gw-cb", publish=records.append, clock=lambda: at)
    # a card in effect in the report's period whatever the suite's clock (the shared CARD follows the clock)
    since = (NOV.start_dt - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    card = re.sub(r'effective_at: "[^"]+"', f'effective_at: "{since}"', CARD)
    gateway.apply_references(parse_reference_yaml(card, "card") + parse_reference_yaml(policy("p", at - 60), "p"))
    when = datetime.fromtimestamp(at, UTC)
    gateway.apply_state({**state("0.995"), "key": "feature:summarize_email_v2:day", "id": "summarize_email_v2",
                         "computed_at": when.isoformat(), "period_end": (when + timedelta(hours=1)).isoformat()})
    ask = {**REQ, "feature_id": "summarize_email_v2"}
    gateway.reserve(request_id="big", **{**ask, "model": "gpt-4.1-mini", "max_output_tokens": 90_000})
    rows, _ = decode_decisions([(b"\n".join(orjson.dumps(r) for r in records), Source("d", 0, 0))])
    DecisionWriter(loaded).write(rows)
    report = build_report("chargeback", fetch_data(query_of(loaded), NOV, NOW), NOV, parse_rules(RULES, "r.yaml"),
                          NOW, "chDB")
    assert table(report, "admission") == [{
        "team": "inbox", "feature_id": "summarize_email_v2", "action": "deny",
        "reason": "reservation_exceeds_remaining", "decisions": 1,
        "avoided_usd": D("0.0004") + D("0.144")}]  # 1,000 input + 90,000 output of gpt-4.1-mini
