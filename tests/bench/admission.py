"""reserve() latency of the gateway's admission client, in process (issue 18's target: p99 under 50 µs).

Each call decides a request against a feature and a tenant budget (day and month states), prices its worst case
with the imported price card, and settles: the path a gateway runs before and after every provider call.
`python -m tests.bench.admission` prints the figures; make bench prints them in its table.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH
from tally.reference import load_reference_files, parse_reference_yaml
from tally.sdk.admission import Admission

TARGET_P99_US = 50.0

POLICY = """\
kind: routing_policy
version: "bench"
effective_at: "EFFECTIVE_AT"
reasoning_models: [openai/o4-mini]
default: {reasoning: allow, max_reasoning_tokens: 4000, on_breach: deny}
features:
  f-1: {fallback_model: openai/gpt-4.1-mini, on_breach: fallback}
"""


def measure_reserve(calls: int = 20_000) -> dict[str, Any]:
    """Latency of reserve() + settle() (p50, p99, max in µs) over `calls` requests, after a warm-up."""
    records: list[dict[str, Any]] = []
    admission = Admission("bench", publish=records.append)
    admission.apply_references(load_reference_files([GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH]))
    now = datetime.now(UTC)
    since = (now - timedelta(days=1)).isoformat().replace("+00:00", "Z")  # in effect for the whole run
    admission.apply_references(parse_reference_yaml(POLICY.replace("EFFECTIVE_AT", since), "bench"))
    for scope, ident in (("feature", "f-1"), ("tenant", "acme")):
        for period, hours in (("day", 24), ("month", 24 * 31)):
            admission.apply_state({
                "key": f"{scope}:{ident}:{period}", "scope": scope, "id": ident, "period": period,
                "budget_usd": "1000000", "spent_usd": "10", "computed_at": now.isoformat(),
                "period_end": (now + timedelta(hours=hours)).isoformat()})
    samples = []
    for i in range(calls + 1000):
        started = time.perf_counter()
        decision = admission.reserve(request_id=f"r-{i}", feature_id="f-1", tenant_id="acme", provider="openai",
                                     model="o4-mini", input_tokens=1200, max_output_tokens=800)
        elapsed = time.perf_counter() - started
        assert decision.reservation is not None
        decision.reservation.settle(Decimal("0.001"))
        if i >= 1000:
            samples.append(elapsed * 1e6)
        if len(records) > 10_000:
            records.clear()
    samples.sort()
    return {"calls": calls, "reserve_p50_us": round(samples[len(samples) // 2], 2),
            "reserve_p99_us": round(samples[int(len(samples) * 0.99)], 2), "reserve_max_us": round(samples[-1], 2),
            "target_p99_us": TARGET_P99_US}


if __name__ == "__main__":
    print(measure_reserve())
