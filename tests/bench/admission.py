"""reserve() latency of the gateway's admission client, in process (issue 18's target: p99 under 50 µs).

Each call decides a request against a feature and a tenant budget (day and month states), prices its worst case
with the imported price card, and settles: the path a gateway runs before and after every provider call.
`python -m tests.bench.admission` prints the figures; make bench prints them in its table.

The headline (reserve_p50_us, reserve_p99_us, reserve_max_us) publishes each decision record as a gateway does:
serialized to bytes (orjson, as KafkaDecisions.publish does before handing them to librdkafka, which keeps no Python
object; the produce call itself is not in the figure). Three more scenarios, same requests: `kept_*` keeps each record
as a dict, 10,000 at a time (the bench's headline until 2026-12-05: every record then outlives a young-generation
collection, which is that figure's tail); `gc_tuned_*` is the headline with the collector's young generation raised
as tally's own workers run it (GATEWAY_GC_THRESHOLD, docs/admission.md: young collections come far less often and
each takes longer, so p99 drops and max grows); `deny_*` decides against a budget too small for the request (every
call is denied and publishes its budget windows; nothing to settle).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH
from tally.reference import load_reference_files, parse_reference_yaml
from tally.sdk.admission import Admission

TARGET_P99_US = 50.0
# gc.set_threshold for a latency-sensitive process: what streams.app.run_worker sets for tally's workers.
GATEWAY_GC_THRESHOLD = (50_000, 20, 100)

POLICY = """\
kind: routing_policy
version: "bench"
effective_at: "EFFECTIVE_AT"
reasoning_models: [openai/o4-mini]
default: {reasoning: allow, max_reasoning_tokens: 4000, on_breach: deny}
features:
  f-1: {fallback_model: openai/gpt-4.1-mini, on_breach: fallback}
"""


def _admission(publish: Callable[[dict[str, Any]], None], budget_usd: str = "1000000") -> Admission:
    admission = Admission("bench", publish=publish)
    admission.apply_references(load_reference_files([GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH]))
    now = datetime.now(UTC)
    since = (now - timedelta(days=1)).isoformat().replace("+00:00", "Z")  # in effect for the whole run
    admission.apply_references(parse_reference_yaml(POLICY.replace("EFFECTIVE_AT", since), "bench"))
    for scope, ident in (("feature", "f-1"), ("tenant", "acme")):
        for period, hours in (("day", 24), ("month", 24 * 31)):
            admission.apply_state({
                "key": f"{scope}:{ident}:{period}", "scope": scope, "id": ident, "period": period,
                "budget_usd": budget_usd, "spent_usd": "10", "computed_at": now.isoformat(),
                "period_end": (now + timedelta(hours=hours)).isoformat()})
    return admission


def _timed(admission: Admission, published: list[Any], calls: int, settle: bool) -> list[float]:
    """reserve() latencies in µs of `calls` requests after 1,000 of warm-up, sorted; each admitted one is settled."""
    samples = []
    for i in range(calls + 1000):
        started = time.perf_counter()
        decision = admission.reserve(request_id=f"r-{i}", feature_id="f-1", tenant_id="acme", provider="openai",
                                     model="o4-mini", input_tokens=1200, max_output_tokens=800)
        elapsed = time.perf_counter() - started
        if settle:
            assert decision.reservation is not None
            decision.reservation.settle(Decimal("0.001"))
        else:
            assert not decision.admitted
        if i >= 1000:
            samples.append(elapsed * 1e6)
        if len(published) > 10_000:
            published.clear()
    samples.sort()
    return samples


def _figures(prefix: str, samples: list[float]) -> dict[str, float]:
    return {f"{prefix}_p50_us": round(samples[len(samples) // 2], 2),
            f"{prefix}_p99_us": round(samples[int(len(samples) * 0.99)], 2), f"{prefix}_max_us": round(samples[-1], 2)}


def measure_reserve(calls: int = 20_000, scenarios: bool = True) -> dict[str, Any]:
    """Latency of reserve() + settle() (p50, p99, max in µs) over `calls` requests, after a warm-up.

    `scenarios`: also the kept-records, GC-tuned and denial scenarios (the module's docstring), each `calls` more,
    each on a client of its own with the previous one's objects collected first (not in its figures).
    """
    sent: list[bytes] = []

    def serialized(record: dict[str, Any]) -> None:
        sent.append(orjson.dumps(record))

    out: dict[str, Any] = {"calls": calls, **_figures("reserve", _timed(_admission(serialized), sent, calls, True)),
                           "target_p99_us": TARGET_P99_US}
    if scenarios:
        sent.clear()
        gc.collect()
        records: list[dict[str, Any]] = []
        out.update(_figures("kept", _timed(_admission(records.append), records, calls, True)))
        records.clear()
        gc.collect()
        default = gc.get_threshold()
        gc.set_threshold(*GATEWAY_GC_THRESHOLD)
        try:
            out.update(_figures("gc_tuned", _timed(_admission(serialized), sent, calls, True)))
        finally:
            gc.set_threshold(*default)
        sent.clear()
        gc.collect()
        denials: list[dict[str, Any]] = []
        out.update(_figures("deny", _timed(_admission(denials.append, budget_usd="10.001"), denials, calls, False)))
    return out


if __name__ == "__main__":
    print(measure_reserve())
