"""The project's own Kafka broker: start, status, topics, refusals, clean stop."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from ops.kafka_local import (
    DLQ_MAX_MESSAGE_BYTES,
    USAGE_MAX_MESSAGE_BYTES,
    LocalKafka,
    ensure_topics,
    wait_for_broker,
)
from tally.config import Settings
from tally.errors import KafkaLocalError
from tests.conftest import delete_topics, free_ports

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _topic_configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    return {res.name: {k: str(v.value) for k, v in fut.result(timeout=10).items()}
            for res, fut in futures.items()}


@pytest.fixture
def fresh_settings(kafka_broker: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings with a unique prefix whose topics do not exist yet (deleted afterwards)."""
    settings = Settings(data_dir=tmp_path, kafka_bootstrap=kafka_broker,
                        topic_prefix=f"t{uuid.uuid4().hex[:8]}.", partitions=4)
    yield settings
    delete_topics(kafka_broker, list(settings.topics.all()))


def test_session_broker_runs_and_answers(local_kafka: LocalKafka | None, kafka_broker: str) -> None:
    wait_for_broker(kafka_broker, timeout=5)
    if local_kafka is None:
        pytest.skip("TALLY_TEST_BOOTSTRAP: the broker is external, not a LocalKafka")
    status = local_kafka.status()
    assert status["running"] is True
    assert status["answers_metadata"] is True
    assert status["bootstrap"] == kafka_broker
    assert isinstance(status["pid"], int)

    # Another LocalKafka on the same data dir sees the same broker, and start() is a no-op.
    other = LocalKafka(local_kafka.settings)
    assert other.status()["pid"] == status["pid"]
    started = time.monotonic()
    other.start(timeout=10)
    assert time.monotonic() - started < 5
    assert local_kafka.status()["pid"] == status["pid"]

    # The SLF4J binding works: the broker's own lines reach server.log, and no binder warning anywhere.
    server_log = local_kafka.server_log.read_text()
    assert "Kafka Server started" in server_log
    assert "StaticLoggerBinder" not in local_kafka.console_log.read_text() + server_log


def test_ensure_topics_is_idempotent(fresh_settings: Settings) -> None:
    topics = fresh_settings.topics
    assert ensure_topics(fresh_settings) == list(topics.all())
    assert ensure_topics(fresh_settings) == []

    md = AdminClient({"bootstrap.servers": fresh_settings.kafka_bootstrap}).list_topics(timeout=10)
    for name in topics.all():
        assert len(md.topics[name].partitions) == 4, name

    configs = _topic_configs(fresh_settings.kafka_bootstrap, list(topics.all()))
    for name in topics.compacted():
        assert configs[name]["cleanup.policy"] == "compact", name
    for name in (topics.usage, topics.dlq, topics.attempts, topics.requests, topics.alerts):
        assert configs[name]["cleanup.policy"] == "delete", name
    assert int(configs[topics.dlq]["max.message.bytes"]) == DLQ_MAX_MESSAGE_BYTES > 8 * MIB
    assert int(configs[topics.usage]["max.message.bytes"]) == USAGE_MAX_MESSAGE_BYTES == 2 * MIB


def test_ensure_topics_refuses_other_partition_count(kafka_settings: Settings) -> None:
    with pytest.raises(KafkaLocalError, match=rf"{kafka_settings.topics.usage} has 4"):
        ensure_topics(dataclasses.replace(kafka_settings, partitions=2))


def test_ensure_topics_refuses_uncompacted_reference_topic(fresh_settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": fresh_settings.kafka_bootstrap})
    owners = fresh_settings.topics.owners
    admin.create_topics([NewTopic(owners, num_partitions=4, replication_factor=1)])[owners].result(timeout=10)
    with pytest.raises(KafkaLocalError, match=rf"without cleanup.policy=compact: {owners}"):
        ensure_topics(fresh_settings)


@pytest.mark.parametrize("which", ["listener", "controller"])
def test_port_in_use_is_named(tmp_path: Path, which: str) -> None:
    listener, controller = free_ports(2)
    busy = listener if which == "listener" else controller
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        kafka = LocalKafka(Settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{listener}",
                                    kafka_controller_port=controller))
        label = "Kafka listener" if which == "listener" else "KRaft controller"
        with pytest.raises(KafkaLocalError, match=rf"port {busy} \({label}\) is already in use"):
            kafka.start(timeout=10)
    assert not kafka.pid_file.exists()
    assert kafka.status()["running"] is False


def test_non_loopback_listener_is_refused(tmp_path: Path) -> None:
    kafka = LocalKafka(Settings(data_dir=tmp_path, kafka_bootstrap="192.0.2.10:9092"))
    with pytest.raises(KafkaLocalError, match="loopback"):
        kafka.start(timeout=5)
    assert not kafka.pid_file.exists()


def test_start_stop_restart_is_clean(tmp_path: Path) -> None:
    listener, controller = free_ports(2)
    settings = Settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{listener}",
                        kafka_controller_port=controller, partitions=2)
    kafka = LocalKafka(settings)
    try:
        kafka.start(timeout=90)
        pid = kafka.status()["pid"]
        assert isinstance(pid, int)
        assert ensure_topics(settings) == list(settings.topics.all())
        cluster_meta = (kafka.log_dir / "meta.properties").read_text()

        assert kafka.stop() is True
        assert not Path(f"/proc/{pid}").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        status = kafka.status()
        assert status["running"] is False
        assert status["answers_metadata"] is False
        assert status["pid"] is None
        assert not kafka.pid_file.exists()
        assert kafka.stop() is False

        # Restart on the same data dir: not reformatted, topics still there.
        kafka.start(timeout=90)
        assert (kafka.log_dir / "meta.properties").read_text() == cluster_meta
        assert ensure_topics(settings) == []
    finally:
        kafka.stop()
    assert kafka.status()["running"] is False


def test_broker_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    listener, controller = free_ports(2)
    kafka = LocalKafka(Settings(data_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{listener}",
                                kafka_controller_port=controller))
    # A log dir "formatted" for another node: formatting is skipped and the broker refuses to start.
    kafka.log_dir.mkdir(parents=True)
    (kafka.log_dir / "meta.properties").write_text(
        "version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=7\ndirectory.id=AAAAAAAAAAAAAAAAAAAAAA\n"
    )
    try:
        with pytest.raises(KafkaLocalError, match="exited with status") as info:
            kafka.start(timeout=60)
        assert "last lines of" in str(info.value)
        assert not kafka.pid_file.exists()
    finally:
        kafka.stop()
