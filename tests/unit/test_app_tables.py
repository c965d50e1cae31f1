"""The worker's state tables: their changelogs are written by the worker and read only on recovery."""

import asyncio

from streams.app import create_app
from tally.config import load_settings


def test_changelogs_are_not_acking_topics(tmp_path):
    # Faust's livelock check (every commit interval x 2.5) treats a partition of an acking topic as a stream's input:
    # a changelog partition the worker writes but no stream reads would be logged as "Stream has not started
    # processing" (ERROR, 15 lines) forever. Faust's own changelogs are declared with acks=False; ours must be too.
    settings = load_settings(env={}, data_dir=tmp_path)
    app = create_app(settings, "process")
    changelogs = {table.changelog_topic.get_topic_name() for table in app.tables.values()}
    assert changelogs == {settings.topics.fold_state, settings.topics.detect_state, settings.topics.otlp_state}
    for table in app.tables.values():
        app.topics.add(table.changelog_topic)
    app.topics.add(app.topic(settings.topics.usage))  # an agent's input, as Faust subscribes it
    asyncio.run(app.topics._update_indices())  # what the conductor runs when it subscribes (no broker for these)
    assert [t for t in sorted(changelogs) if app.topics.acks_enabled_for(t)] == []
    assert app.topics.acks_enabled_for(settings.topics.usage)
