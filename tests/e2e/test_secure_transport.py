"""Kafka over SASL_SSL (SCRAM-SHA-512, TLS verified against the test CA), for real: the project's own broker with a
SASL_SSL listener (tests/secure_kafka.py), and every tally client through it — the SDK publisher, the CLI, a worker
(Faust and aiokafka) and the alert consumer — publish → worker → ClickHouse, to the oracle's totals. A wrong password
is a clear error within seconds for each, not a hang.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from ops.kafka_local import ensure_topics
from ops.simulate import TrafficGenerator, catalog_from_reference
from tally.config import Settings
from tally.errors import PublishError
from tally.kafka_auth import KafkaRefused
from tally.reference import load_reference_files
from tally.sdk.publisher import Publisher
from tests.conftest import BROKER_PROPERTIES, TEST_PARTITIONS, free_ports
from tests.e2e.conftest import EXAMPLES, REFERENCE_FILES, Stack
from tests.secure_kafka import MECHANISM, PASSWORD, USER, SecureBroker, start_secure_broker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    plain, secure, controller = free_ports(3)
    broker = start_secure_broker(tmp_path_factory.mktemp("sasl-ssl"), plain, secure, controller, TEST_PARTITIONS,
                                 BROKER_PROPERTIES)
    try:
        yield broker
    finally:
        broker.broker.stop()


def secure_stack(broker: SecureBroker, tmp_path: Path, password: str = PASSWORD) -> Stack:
    """A stack whose every Kafka client uses SASL_SSL; the password comes from a file, as a Secret would give it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "kafka-password"
    secret.write_text(password + "\n")
    settings = Settings(data_dir=tmp_path / "data", kafka_bootstrap=broker.auth.bootstrap, partitions=TEST_PARTITIONS,
                        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism=MECHANISM, kafka_sasl_username=USER,
                        kafka_sasl_password_file=str(secret), kafka_ssl_cafile=broker.auth.ssl_cafile,
                        web_port=free_ports(1)[0], topic_prefix="secure.")
    return Stack(settings)


def test_publish_worker_clickhouse_and_the_cli_all_through_sasl_ssl(secure_broker, tmp_path) -> None:
    stack = secure_stack(secure_broker, tmp_path)
    try:
        assert "secure." in stack.tally("kafka", "topics").stderr.decode()  # the admin client: created them
        stack.tally("up", "--role", "all", timeout=180)  # Faust (aiokafka) with SASLCredentials and the CA
        stack.tally("reference", "load", str(EXAMPLES))  # the CLI's producer
        gen = TrafficGenerator(catalog_from_reference(load_reference_files(REFERENCE_FILES)), seed=23,
                               bad_rate=0.0, start=datetime.now(UTC) - timedelta(hours=1))
        events = [orjson.loads(line) for line in gen.lines(800)]
        auth = dataclasses.replace(secure_broker.auth)  # the SDK, as a gateway embeds it
        with Publisher(auth, stack.settings.topics.usage) as pub:
            for e in events:
                pub.publish(e)
            pub.publish_line(b'{"schema_version": 1, "prompt": "a line the pipeline refuses"}')
        stack.tally("wait", "--timeout", "180", timeout=240)  # offsets and positions through SASL_SSL
        stack.assert_matches_ground_truth(events)
        shown = stack.tally("dlq", "show").stdout.decode()  # the CLI's consumer
        assert "missing_field" in shown or "unknown_field" in shown
        alerts = stack.tally("alerts", "--sink", "stdout", "--max-messages", "0", timeout=60)  # reaches the brokers
        assert alerts.returncode == 0
    finally:
        stack.tally("down", check=False, timeout=120)


def test_a_wrong_password_is_a_clear_error_within_seconds(secure_broker, tmp_path) -> None:
    good = secure_stack(secure_broker, tmp_path / "good")
    good.tally("kafka", "topics")
    wrong = secure_stack(secure_broker, tmp_path / "wrong", password="not-the-password")
    wrong.settings = dataclasses.replace(wrong.settings, topic_prefix=good.settings.topic_prefix)
    wrong.env["TALLY_TOPIC_PREFIX"] = good.settings.topic_prefix
    refused = "refused the connection"
    started = time.monotonic()
    with pytest.raises(PublishError, match=refused):
        Publisher(secure_broker.wrong_password(), good.settings.topics.usage)
    assert time.monotonic() - started < 10
    for args in (("kafka", "topics"), ("worker", "--role", "process"), ("dlq", "show"),
                 ("alerts", "--max-messages", "1")):
        started = time.monotonic()
        proc = wrong.tally(*args, check=False, timeout=60)
        took = time.monotonic() - started
        said = proc.stderr.decode() + proc.stdout.decode()
        assert proc.returncode != 0, args
        assert refused in said and "SASL authentication" in said, (args, said[-2000:])
        assert "not-the-password" not in said  # the secret is never printed
        assert took < 30, (args, took)  # seconds (an interpreter and its imports included), not the 30 s timeouts
    with pytest.raises(KafkaRefused, match=refused):  # the admin client, in process
        ensure_topics(dataclasses.replace(wrong.settings, kafka_sasl_password="not-the-password"))
