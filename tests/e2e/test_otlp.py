"""OTel GenAI spans, published as the Collector's Kafka exporter writes them, through the live stack: priced,
attributed, folded into logical requests, exactly once (a re-delivered batch, a crash between delivery and
position), bad spans in the DLQ with their bytes."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from ops import stack as stack_ops
from tests.e2e.conftest import EXAMPLES
from tests.factories import clock
from tests.otlp_spans import SpanRecorder, ids, ns, otlp_json, otlp_proto

pytestmark = pytest.mark.e2e

# (provider attribute as instrumentations write it, tally's provider, model) from the example price cards
MODELS = [("openai", "openai", "gpt-4.1"), ("openai", "openai", "gpt-4.1-mini"), ("openai", "openai", "o4-mini"),
          ("anthropic", "anthropic", "claude-haiku-4-5"), ("gcp.gemini", "google", "gemini-2.5-flash")]
# services (their resource's service.name is the feature; the owners registry names the team) and one that says it
SERVICES = [{"service.name": "search_answer"}, {"service.name": "smart_reply"},
            {"service.name": "ticket_triage", "service.namespace": "support"}]


def traffic(seed: int, requests: int, start: Any) -> tuple[list[SpanRecorder], list[dict[str, Any]]]:
    """`requests` agent runs, each a parent span over 1-3 calls (a failed attempt, a retry, a fallback model).

    Returns the recorders holding the spans and the events v1 the spans stand for, written down here from the
    test's own choices (not by the code under test): the ground truth.
    """
    rng = random.Random(seed)
    recorders = [SpanRecorder(r) for r in SERVICES]
    expected: list[dict[str, Any]] = []
    for n in range(requests):
        s = rng.randrange(len(SERVICES))
        rec, resource = recorders[s], SERVICES[s]
        t = start + timedelta(seconds=n * 0.7)
        agent = rec.open("invoke_agent", t, {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "a"})
        tags = {"feature_id": resource["service.name"], **({"team_id": resource["service.namespace"]}
                                                          if "service.namespace" in resource else {})}
        calls = rng.choice([1, 1, 2, 3])
        for k in range(calls):
            system, provider, model = MODELS[rng.randrange(len(MODELS))]
            begin, end = t + timedelta(seconds=0.1 + k * 0.2), t + timedelta(seconds=0.25 + k * 0.2)
            attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": system,
                                     "gen_ai.request.model": model}
            failed = k < calls - 1 and rng.random() < 0.5
            usage: dict[str, int] = {}
            if failed:
                attrs["error.type"] = "timeout"
            else:
                inp, read, out, reasoning = (rng.randrange(100, 5000), rng.randrange(0, 90),
                                             rng.randrange(1, 900), 0)
                if model == "o4-mini":
                    reasoning = rng.randrange(0, out)
                attrs.update({"gen_ai.response.model": model, "gen_ai.usage.input_tokens": inp,
                              "gen_ai.usage.output_tokens": out, "gen_ai.usage.cache_read.input_tokens": read,
                              "gen_ai.usage.reasoning.output_tokens": reasoning})
                usage = {"input_tokens": inp - read, "output_tokens": out - reasoning,
                         "reasoning_tokens": reasoning, "cache_read_tokens": read, "cache_write_tokens": 0,
                         "cache_write_1h_tokens": 0}
            span = rec.span("chat", begin, end, attrs, parent=agent, error="upstream timed out" if failed else None)
            trace_id, span_id = ids(span)
            expected.append({"event_id": f"{trace_id}-{span_id}", "request_id": f"{trace_id}-{span_id}",
                             "parent_request_id": f"{trace_id}-{ids(agent)[1]}", "provider": provider,
                             "model_actual": model, "timestamp": end.isoformat(), "usage": usage, "tags": tags,
                             "status": "error" if failed else "ok"})
        agent.end(end_time=ns(t + timedelta(seconds=1)))
    return recorders, expected


def messages(recorders: Sequence[SpanRecorder], per_message: int) -> list[bytes]:
    """The spans as the Collector batches them: up to `per_message` spans a message (a trace may straddle two),
    every other message otlp_json, the rest otlp_proto."""
    out: list[bytes] = []
    for rec in recorders:
        spans = rec.finished()
        for i in range(0, len(spans), per_message):
            encode = otlp_json if len(out) % 2 else otlp_proto
            out.append(encode(spans[i:i + per_message]))
    return out


def publish(stack: Any, values: Sequence[bytes]) -> None:
    """As the Collector's Kafka exporter does by default: one message per request, no key, acks from all."""
    producer = Producer({**stack.settings.kafka.rdkafka(), "acks": "all", "enable.idempotence": True})
    for value in values:
        producer.produce(stack.settings.topics.otlp, value=value)
    assert producer.flush(60) == 0


def wait_for_requests(stack: Any, expected: int) -> None:
    deadline = time.monotonic() + 120
    while stack.query("SELECT toInt64(sum(sign)) AS n FROM tally.logical_requests")[0]["n"] != expected:
        assert time.monotonic() < deadline, "logical requests not all emitted within 120 s"
        time.sleep(1)


def test_collector_spans_are_priced_attributed_and_folded_exactly_once(stack) -> None:
    recorders, expected = traffic(seed=7, requests=150, start=clock() - timedelta(hours=3))
    values = messages(recorders, per_message=25)
    # a span the pipeline cannot map (no model), and a message that is not OTLP at all
    bad = SpanRecorder({"service.name": "search_answer"})
    bad.span("chat", clock() - timedelta(hours=2), clock() - timedelta(hours=2) + timedelta(seconds=1), {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.usage.input_tokens": 3})
    values += [otlp_proto(bad.finished()), b"\x0a\xff\xff\xff\xff\x0f"]
    stack.env["TALLY_OTLP_LOGICAL_REQUEST"] = "parent"  # the agent span groups its attempts (docs/otlp.md)
    info = orjson.loads(stack.tally("up", timeout=180).stdout)  # the default stack: sink + process workers
    assert info["workers"]
    stack.tally("reference", "load", str(EXAMPLES))
    publish(stack, values)
    publish(stack, values[:3])  # the Collector retried three batches: their spans again, same ids
    waited = stack.tally("wait", "--timeout", "240", timeout=300)
    said = (waited.stdout + waited.stderr).decode()
    assert f"{len(values) + 3:,} OTLP messages" in said, said

    stack.assert_matches_ground_truth(expected)
    rows = stack.query("SELECT event_id, status, logical_request_id, feature_id, team_id, "
                       "pricing_status FROM tally.usage_events")
    by_id = {r["event_id"]: r for r in rows}
    for e in expected:
        row = by_id[e["event_id"]]
        assert (row["status"], row["logical_request_id"], row["feature_id"]) == (
            e["status"], e["parent_request_id"], e["tags"]["feature_id"]), row
        assert row["team_id"], row  # attributed: the service namespace, else the registry's owner of the feature
    assert Counter(r["pricing_status"] for r in rows if r["status"] == "ok") == {"priced": sum(
        e["status"] == "ok" for e in expected)}
    wait_for_requests(stack, len({e["parent_request_id"] for e in expected}))
    stack.assert_requests_match_ground_truth(expected)

    dlq = orjson.loads(stack.tally("dlq", "show", "--format", "json", "--limit", "100").stdout)
    assert dlq["by_reason"] == {"otlp_unmappable": 1, "otlp_undecodable": 1}
    # a replayed OTLP dead letter goes back to the OTLP topic (the span alone), and is refused again there
    replayed = stack.tally("dlq", "replay", "--reason", "otlp_unmappable")
    said = (replayed.stdout + replayed.stderr).decode()
    assert f"replayed 1 OTLP spans to {stack.settings.topics.otlp}" in said, said
    stack.tally("wait", "--timeout", "120", timeout=180)
    dlq = orjson.loads(stack.tally("dlq", "show", "--format", "json", "--limit", "100").stdout)
    assert dlq["by_reason"] == {"otlp_unmappable": 2, "otlp_undecodable": 1}


def test_a_crash_between_delivery_and_position_replays_spans_without_a_double_count(stack) -> None:
    """The otlp stage crashes after its events are delivered but before its position is stored: the batch is read
    again after the restart, its events (same ids) are dropped downstream, nothing is lost or counted twice."""
    recorders, expected = traffic(seed=11, requests=60, start=clock() - timedelta(hours=4))
    values = messages(recorders, per_message=10)
    stack.env["TALLY_OTLP_LOGICAL_REQUEST"] = "parent"
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    stack.tally("down", timeout=120)
    stack.env["TALLY_FAILPOINT"] = "otlp.after_delivery:1"
    stack.tally("up", "--role", "all", timeout=180)
    pid = stack.worker_pid()
    publish(stack, values)
    deadline = time.monotonic() + 120
    while stack_ops.alive(pid, b"ops.cli", b"worker"):
        assert time.monotonic() < deadline, "the otlp failpoint did not fire within 120 s"
        time.sleep(0.5)
    assert "failpoint otlp.after_delivery fired" in stack_ops.log_file(stack.settings, "all").read_text()
    del stack.env["TALLY_FAILPOINT"]
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("wait", "--timeout", "240", timeout=300)
    stack.assert_matches_ground_truth(expected)
    wait_for_requests(stack, len({e["parent_request_id"] for e in expected}))
    stack.assert_requests_match_ground_truth(expected)


def test_simulated_traffic_as_collector_spans_lands_like_the_sdks(stack) -> None:
    """`tally simulate --otlp` sends its events as OTel spans; they land as the same events would from the SDK."""
    stack.tally("up", "--role", "all", timeout=180)
    stack.tally("reference", "load", str(EXAMPLES))
    sim = stack.tally("simulate", "--otlp", "otlp_json", "--count", "400", "--rate", "2000", "--seed", "3",
                      timeout=180)
    assert f"published 400 events as otlp_json spans to {stack.settings.topics.otlp}" in sim.stderr.decode()
    stack.tally("wait", "--timeout", "180", timeout=240)
    lines = stack.tally("simulate", "--count", "400", "--seed", "3", "--bad-rate", "0", "--output", "/dev/stdout")
    sent = [orjson.loads(line) for line in lines.stdout.splitlines() if line.startswith(b"{")]
    assert len(sent) == 400
    rows = stack.query("SELECT model_actual, input_tokens + cache_read_tokens AS inp, feature_id FROM "
                       "tally.usage_events")
    assert Counter((r["model_actual"], r["inp"], r["feature_id"]) for r in rows) == Counter(
        (e["model_actual"], e["usage"].get("input_tokens", 0) + e["usage"].get("cache_read_tokens", 0),
         e["tags"].get("feature_id", "tally-simulate")) for e in sent)
