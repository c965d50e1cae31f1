import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer

from ops.cli import _load_reference
from streams.reference_feed import ReferenceFeed
from tally.reference import ReferenceStore, load_reference_files, parse_reference_yaml

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "reference"


async def _until(cond, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_feed_loads_everything_before_ready_then_follows_changes(kafka_settings):
    s = kafka_settings
    docs = _load_reference(s, sorted(EXAMPLES.glob("*.yaml")))
    cards = [d for d in docs if d.kind == "price_card"]
    later = max(cards, key=lambda d: d.effective_at)

    async def scenario():
        store = ReferenceStore()
        feed = ReferenceFeed(s.kafka_bootstrap, s.topics.reference(), store)
        task = asyncio.create_task(feed.run())
        try:
            await asyncio.wait_for(feed.ready.wait(), 30)
            # ready means everything that was on the topics is applied, not just some of it
            assert {(v.kind, v.version) for v in store.versions()} == {(d.kind, d.version) for d in docs}
            # a new version published while the worker runs is picked up without a restart
            text = (EXAMPLES / "price_cards.yaml").read_text().split("\n---\n")[-1]
            text = text.replace(f'version: "{later.version}"', 'version: "2027-01-01"').replace(
                f'effective_at: "{later.effective_at:%Y-%m-%d}T00:00:00Z"', 'effective_at: "2027-01-01T00:00:00Z"')
            (newer,) = parse_reference_yaml(text, "newer.yaml")
            assert newer.version == "2027-01-01"
            p = Producer({"bootstrap.servers": s.kafka_bootstrap})
            p.produce(s.topics.price_cards, key=newer.key(), value=newer.to_json())
            p.flush(10)
            await _until(lambda: store.price_card_at(datetime(2027, 2, 1, tzinfo=UTC)) is not None
                         and store.price_card_at(datetime(2027, 2, 1, tzinfo=UTC)).version == "2027-01-01")
            # history is not rewritten: an earlier timestamp still gets the earlier card
            assert store.price_card_at(datetime(2026, 11, 2, tzinfo=UTC)).version == later.version
            # a tombstone removes the version
            p.produce(s.topics.price_cards, key=newer.key(), value=None)
            p.flush(10)
            await _until(lambda: store.price_card_at(datetime(2027, 2, 1, tzinfo=UTC)).version == later.version)
            # junk from a foreign producer is skipped, not fatal
            p.produce(s.topics.owners, key=b"x", value=b"not json")
            p.flush(10)
            await asyncio.sleep(1.0)
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_reference_files_are_validated_before_publishing(kafka_settings, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: price_card\nversion: '1'\neffective_at: 'yesterday'\ncurrency: USD\nmodels: []\n")
    with pytest.raises(Exception, match="bad.yaml:3"):
        _load_reference(kafka_settings, [bad])
    assert load_reference_files(sorted(EXAMPLES.glob("*.yaml")))
