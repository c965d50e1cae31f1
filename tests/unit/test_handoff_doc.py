"""docs/handoff.md lists the Arrow schemas of the internal topics exactly as the code defines them."""

from pathlib import Path

import pytest

from streams.sink_columns import ATTEMPT_SCHEMA, REQUEST_SCHEMA

DOC = Path(__file__).resolve().parents[2] / "docs" / "handoff.md"


@pytest.mark.parametrize(("topic", "schema"), [("llm.cost.attempts.v1", ATTEMPT_SCHEMA),
                                                ("llm.cost.requests.v1", REQUEST_SCHEMA)])
def test_the_documented_arrow_schema_is_the_code_s(topic, schema) -> None:
    section = DOC.read_text().split(f"### `{topic}`", 1)[1].split("###", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| column")]
    assert rows == [f"| {f.name} | `{f.type}` | {'yes' if f.nullable else ''} |" for f in schema]
