"""The Arrow hand-off between the roles: the same attempts and logical requests as NDJSON, to the last digit, and
the same rows in ClickHouse whichever format carried them."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest

from ops.simulate import TrafficGenerator, catalog_from_reference
from streams.fold import FoldConfig, Folder
from streams.pipeline import FoldStep, process_messages
from streams.records import Source
from streams.sink import ATTEMPT_ROWS, REQUEST_ROWS, RequestWriter, SinkWriter, decode_batch
from streams.sink_columns import is_arrow
from streams.validate import Validator
from tally.config import Settings
from tally.partitioning import partition_for
from tally.reference import snapshot_of
from tally.store import Store

pytestmark = pytest.mark.integration
OFFSETS = itertools.count()


def _outputs(events: list[dict[str, Any]], docs: Any, now: datetime, arrow: int | None) -> Any:
    by_partition: dict[int, list[bytes]] = {}
    for e in events:
        by_partition.setdefault(partition_for(e.get("parent_request_id") or e["request_id"], 4), []).append(
            orjson.dumps(e))
    messages = [(b"\n".join(lines), Source("llm.usage.v1", p, 0)) for p, lines in sorted(by_partition.items())]
    return process_messages(messages, Validator(), snapshot_of(docs), 4, now,
                            FoldStep(Folder(FoldConfig(), 4), {}, 4), 0.0, arrow)


def _sink_messages(out: Any, arrow: bool, topic: str) -> list[tuple[bytes | None, Source]]:
    """What the sink reads: one message per value, each at its own offset (its origin)."""
    if arrow:
        values = [m for p in sorted(out.attempt_messages if topic == "a" else out.request_messages)
                  for m in (out.attempt_messages if topic == "a" else out.request_messages)[p]]
    else:
        lines = out.attempts if topic == "a" else out.requests
        values = [b"\n".join(lines[p]) for p in sorted(lines)]
    return [(v, Source(topic, 0, next(OFFSETS))) for v in values]


def _ms(row: dict[str, Any]) -> dict[str, Any]:
    """A row as DateTime64(3) holds it (times floored to the millisecond), without the sink's origin."""
    return {k: (v.replace(microsecond=v.microsecond // 1000 * 1000) if isinstance(v, datetime) else v)
            for k, v in row.items() if k != "origin"}


def test_arrow_and_ndjson_hand_offs_carry_the_same_rows_and_land_the_same(tmp_path, docs, now) -> None:
    gen = TrafficGenerator(catalog_from_reference(docs), seed=31, bad_rate=0.0, start=now - timedelta(hours=2))
    events = [e for _ in range(400) for e in gen.logical_request()]
    plain = _outputs(events, docs, now, None)
    arrow = _outputs(events, docs, now, 900 * 1024)
    assert not plain.attempt_messages and not plain.request_messages and arrow.request_rows == plain.request_rows
    assert all(is_arrow(m) for ms in (*arrow.attempt_messages.values(), *arrow.request_messages.values())
               for m in ms)
    assert sum(map(len, arrow.request_messages.values())) < sum(map(len, plain.requests.values()))  # far fewer
    decoded = {}
    for kind, shape in (("a", ATTEMPT_ROWS), ("r", REQUEST_ROWS)):
        for is_arrow_path, out in ((False, plain), (True, arrow)):
            rows, dead = decode_batch(_sink_messages(out, is_arrow_path, kind), shape)
            assert not dead
            decoded[kind, is_arrow_path] = list(rows)
        key = "event_id" if kind == "a" else "logical_request_id"
        mine = sorted((_ms(r) for r in decoded[kind, True]), key=lambda r: r[key])
        theirs = sorted((_ms(r) for r in decoded[kind, False]), key=lambda r: r[key])
        assert mine == theirs  # Decimal equality: every digit of every cost
    assert len(decoded["r", True]) == plain.request_rows == 400

    # Into two databases, one per format: the same rows, the same sums, to the last digit.
    totals = []
    for database, is_arrow_path in (("tally_json", False), ("tally_arrow", True)):
        store = Store(Settings(data_dir=tmp_path / database, database=database))
        try:
            store.migrate()
            SinkWriter(store).write(decode_batch(_sink_messages(
                plain if not is_arrow_path else arrow, is_arrow_path, "a"), ATTEMPT_ROWS)[0])
            RequestWriter(store).write(decode_batch(_sink_messages(
                plain if not is_arrow_path else arrow, is_arrow_path, "r"), REQUEST_ROWS)[0])
            totals.append(store.query(
                "SELECT (SELECT count() FROM {db}.usage_events), (SELECT toString(sum(cost_total_usd)) FROM "
                "{db}.usage_events), (SELECT toInt64(sum(sign)) FROM {db}.logical_requests), "
                "(SELECT toString(sum(sign * cost_total_usd)) FROM {db}.logical_requests), "
                "(SELECT toString(sum(cost_total_usd)) FROM {db}.rollup_minute), "
                "(SELECT sum(requests) FROM {db}.rollup_minute), "
                "(SELECT toString(sum(cost_wasted_usd)) FROM {db}.rollup_minute)").rows)
        finally:
            store.close()
    assert totals[0] == totals[1]
    assert totals[0][0][0] == len(events) and totals[0][0][2] == 400


def test_rows_land_with_the_name_sent_and_the_entry_that_priced_them(tmp_path, now) -> None:
    """Issue 15 through the process step, the Arrow hand-off and the sink: model_actual as sent, priced_as as priced,
    and an attempts message of an older process worker (no priced_as column) landing with priced_as ''."""
    from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH
    from streams.sink_columns import ATTEMPT_SCHEMA_BEFORE, encode_rows
    from tally.reference import load_reference_files
    from tests.factories import event_factory

    docs = load_reference_files([GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH])
    sent = {"google": "models/gemini-2.5-flash", "bedrock": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "anthropic": "claude-sonnet-4-5-20250929", "openai": "gpt-4o-2024-01-01"}
    at = (now - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    events = [event_factory(provider=p, model_actual=m, timestamp=at, usage={"input_tokens": 1000})
              for p, m in sent.items()]
    out = _outputs(events, docs, now, 900 * 1024)
    messages = _sink_messages(out, True, "a")
    old_rows = [{k: v for k, v in r.items() if k != "priced_as"}
                for r in decode_batch(messages, ATTEMPT_ROWS)[0]]
    for r in old_rows:
        r["event_id"] = "old-" + r["event_id"]
    (older,) = encode_rows(old_rows[:1], ATTEMPT_SCHEMA_BEFORE, 10**6)
    store = Store(Settings(data_dir=tmp_path / "db", database="tally_priced_as"))
    try:
        store.migrate()
        rows, dead = decode_batch([*messages, (older, Source("a", 0, next(OFFSETS)))], ATTEMPT_ROWS)
        assert not dead
        SinkWriter(store).write(rows)
        got = {tuple(r) for r in store.query(
            "SELECT provider, model_actual, priced_as, pricing_status FROM {db}.usage_events").rows}
    finally:
        store.close()
    assert got == {
        ("google", "models/gemini-2.5-flash", "google/gemini-2.5-flash", "priced"),
        ("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
         "bedrock/regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "priced"),
        ("anthropic", "claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4-5", "priced"),
        ("openai", "gpt-4o-2024-01-01", "", "unpriced"),
        (old_rows[0]["provider"], old_rows[0]["model_actual"], "", old_rows[0]["pricing_status"]),
    }
