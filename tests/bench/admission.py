"""reserve() latency of the gateway's admission client, in process (issue 18's target: p99 under 50 µs).

Each call decides a request against a feature and a tenant budget (day and month states), prices its worst case
with the imported price card, and settles: the path a gateway runs before and after every provider call.
`python -m tests.bench.admission` prints the figures; make bench prints them in its table.

The headline (reserve_p50_us, reserve_p99_us, reserve_max_us) publishes each decision record as a gateway does:
through KafkaDecisions (orjson, then librdkafka's produce and poll), its producer pointed at a loopback port no broker
listens on, so every record is queued in librdkafka as it is before delivery and no Python object is kept. Two more
scenarios, same requests: `kept_*` keeps each record as a dict, 10,000 at a time (the bench's headline until
2026-12-05, which no gateway does: every record then outlives a young-generation collection, the figure's tail);
`deny_*` decides against a budget too small for the request (every call is denied and publishes its budget windows;
nothing to settle), records kept likewise.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH
from tally.reference import load_reference_files, parse_reference_yaml
from tally.sdk.admission import Admission, KafkaDecisions

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

    `scenarios`: also the kept-records and denial scenarios (the module's docstring), each `calls` more, each on a
    client of its own with the previous one's objects collected first (not in its figures).
    """
    from tests.conftest import free_ports

    # nothing listens there: produce() queues each record in librdkafka, as it does until a broker acknowledges
    sink = KafkaDecisions(f"127.0.0.1:{free_ports(1)[0]}", "bench.decisions", producer_config={"log_level": 0})
    published: list[Any] = []  # the records live in librdkafka's queue, not here
    out: dict[str, Any] = {"calls": calls,
                           **_figures("reserve", _timed(_admission(sink.publish), published, calls, True)),
                           "target_p99_us": TARGET_P99_US}
    del sink
    if scenarios:
        gc.collect()
        records: list[dict[str, Any]] = []
        out.update(_figures("kept", _timed(_admission(records.append), records, calls, True)))
        records.clear()
        gc.collect()
        denials: list[dict[str, Any]] = []
        out.update(_figures("deny", _timed(_admission(denials.append, budget_usd="10.001"), denials, calls, False)))
    return out


if __name__ == "__main__":
    print(measure_reserve())
