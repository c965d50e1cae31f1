"""The seeds' logical-request stories on the live stack: retries, a fallback, a cut stream, late usage, settling."""

from __future__ import annotations

import dataclasses
import time
from decimal import Decimal
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import EXAMPLES, Stack
from tests.factories import event_factory

pytestmark = pytest.mark.e2e

# Prices (USD per million tokens) of the 2026-11-01 sample card.
MINI_IN, MINI_OUT = Decimal("0.40"), Decimal("1.60")  # gpt-4.1-mini
FLAG_IN, FLAG_OUT = Decimal("2.00"), Decimal("8.00")  # gpt-4.1


def attempt(logical: str, n: int, *, status: str = "ok", final: bool = False, model: str = "gpt-4.1-mini",
            second: int = 0, **extra: Any) -> dict[str, Any]:
    e = event_factory(request_id=f"{logical}-a{n}", parent_request_id=logical, attempt=n, status=status,
                      final=final, model_requested="gpt-4.1-mini", model_actual=model,
                      timestamp=f"2026-11-20T10:00:{second:02d}.000Z", **extra)
    if status == "error":
        e["error"] = "server_error"
        e["usage"] = {"input_tokens": 1000}
    return e


def cost(n_in: int, n_out: int, p_in: Decimal, p_out: Decimal) -> Decimal:
    return (n_in * p_in + n_out * p_out) / 1_000_000


def publish(stack: Stack, events: list[dict[str, Any]], tmp_path: Any, name: str) -> None:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    stack.tally("publish", str(path))


def current(stack: Stack, logical: str) -> dict[str, Any]:
    rows = stack.query(
        "SELECT revision, attempts, retries, fallbacks, fallback_chain, final_model, final_status, closed_by, "
        "terminated, terminated_at_token_n, output_tokens, pricing_status, usage_complete, "
        "toString(cost_total_usd) AS total, toString(cost_wasted_usd) AS wasted, toString(cost_final_usd) AS fin "
        f"FROM tally.logical_requests_current WHERE logical_request_id = '{logical}'")
    assert len(rows) == 1, rows
    row = rows[0]
    for c in ("total", "wasted", "fin"):
        row[c] = Decimal(row[c])
    return row


def wait_for(stack: Stack, logical: str, revision: int, timeout: float = 60) -> dict[str, Any]:
    """Poll until the request's current revision is `revision` (settle decisions are not covered by `tally wait`)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = stack.query(f"SELECT max(revision) AS r FROM tally.logical_requests_current "
                           f"WHERE logical_request_id = '{logical}'")
        if rows and rows[0]["r"] == revision:
            return current(stack, logical)
        assert time.monotonic() < deadline, f"{logical} did not reach revision {revision}: {rows}"
        time.sleep(0.5)


def test_seed_stories_fold_into_logical_requests(stack, tmp_path):
    stack = Stack(dataclasses.replace(stack.settings, fold_settle_s=2.0, fold_idle_s=1.0))
    stack.tally("up", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    publish(stack, [
        # fails twice, succeeds on the third attempt
        attempt("retry", 0, status="error", second=1), attempt("retry", 1, status="error", second=2),
        attempt("retry", 2, final=True, second=4),
        # falls back from a small model to a flagship
        attempt("fallback", 0, status="error", second=1),
        attempt("fallback", 1, final=True, model="gpt-4.1", fallback_from="gpt-4.1-mini", second=3),
        # cut by the router at token 1,730, no usage reported
        attempt("cut", 0, status="terminated", final=True, usage_reported=False, stream_terminated_at_token_n=1730,
                usage={"input_tokens": 1000}, second=5),
        # no usage reported at all (its usage arrives later)
        attempt("late-usage", 0, status="terminated", final=True, usage_reported=False, usage={}, second=6),
        # an ok attempt the gateway did not mark final: settles after fold_settle_s of event time
        attempt("settles", 0, second=7),
    ], tmp_path, "stories")
    stack.tally("wait", "--timeout", "120")

    retry = current(stack, "retry")
    assert (retry["attempts"], retry["retries"], retry["fallbacks"], retry["final_status"]) == (3, 2, 0, "ok")
    assert retry["wasted"] == 2 * cost(1000, 0, MINI_IN, MINI_OUT)
    assert retry["fin"] == cost(1200, 300, MINI_IN, MINI_OUT) and retry["total"] == retry["wasted"] + retry["fin"]

    fallback = current(stack, "fallback")
    assert (fallback["fallback_chain"], fallback["final_model"], fallback["fallbacks"]) == (
        ["gpt-4.1-mini", "gpt-4.1"], "gpt-4.1", 1)
    assert fallback["fin"] == cost(1200, 300, FLAG_IN, FLAG_OUT)
    assert fallback["wasted"] == cost(1000, 0, MINI_IN, MINI_OUT)

    cut = current(stack, "cut")
    assert (cut["terminated"], cut["terminated_at_token_n"], cut["output_tokens"]) == (True, 1730, 1730)
    assert (cut["final_status"], cut["pricing_status"]) == ("terminated", "estimated")
    assert cut["total"] == cost(1000, 1730, MINI_IN, MINI_OUT)  # the tokens before the cut, not max_tokens

    late = current(stack, "late-usage")
    assert (late["pricing_status"], late["usage_complete"], late["total"], late["revision"]) == (
        "no_usage", False, 0, 1)

    # The real usage of the same call arrives later: a new revision corrects the request.
    publish(stack, [attempt("late-usage", 0, status="terminated", final=True, second=40,
                            usage={"input_tokens": 1000, "output_tokens": 812})], tmp_path, "late")
    stack.tally("wait", "--timeout", "120")
    late = current(stack, "late-usage")
    assert (late["pricing_status"], late["usage_complete"], late["revision"]) == ("priced", True, 2)
    assert late["total"] == cost(1000, 812, MINI_IN, MINI_OUT) and late["attempts"] == 1

    settled = wait_for(stack, "settles", 1)
    assert (settled["final_status"], settled["closed_by"]) == ("ok", "settled")

    # Aggregates count each request once, at its latest revision.
    counts = stack.query("SELECT toInt64(sum(sign)) AS n FROM tally.logical_requests")[0]
    assert counts == {"n": 5}
