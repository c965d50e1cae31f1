"""Fixtures for the integration and e2e tiers: one real Kafka broker per test session, fresh topics per test.

The fixtures are lazy: unit tests never ask for them, so they never start a broker. Set
TALLY_TEST_BOOTSTRAP=host:port to run the tiers against a broker that is already running instead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType

import pytest
from confluent_kafka.admin import AdminClient

from ops.kafka_local import LocalKafka, ensure_topics, wait_for_broker
from tally.config import Settings
from tally.errors import KafkaLocalError
from tests.factories import clock

BOOTSTRAP_ENV = "TALLY_TEST_BOOTSTRAP"
TEST_PARTITIONS = 4
# The faketime tier (`make test-faketime`) moves the clients' clock ahead but not the broker's (libfaketime makes the
# JVM crawl): the session broker accepts record timestamps up to a year ahead of its own clock (Kafka's default
# rejects any more than an hour ahead).
BROKER_PROPERTIES = {"log.message.timestamp.after.max.ms": str(366 * 86_400_000)}


@pytest.fixture(scope="session")
def now() -> datetime:
    """The suite's one clock (tests.factories.clock): derive every time a TTL, window or period meets from it."""
    return clock()


def free_ports(n: int) -> list[int]:
    """N distinct TCP ports free on 127.0.0.1 right now (ephemeral range, so never 9092/9093)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The session's own LocalKafka (None when TALLY_TEST_BOOTSTRAP points at an external broker)."""
    if os.environ.get(BOOTSTRAP_ENV):
        yield None
        return
    data_dir = tmp_path_factory.mktemp("kafka-broker")
    broker: LocalKafka | None = None
    # SIGTERM (e.g. a CI job being cancelled) would end the interpreter without running finalizers;
    # turn it into an interrupt so the broker is stopped on the way out. atexit covers the rest.
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        for attempt in range(2):
            listener, controller = free_ports(2)
            broker = LocalKafka(Settings(
                data_dir=data_dir / f"try{attempt}", kafka_bootstrap=f"127.0.0.1:{listener}",
                kafka_controller_port=controller, partitions=TEST_PARTITIONS,
            ), BROKER_PROPERTIES)
            atexit.register(broker.stop)
            try:
                broker.start(timeout=120.0)
                break
            except KafkaLocalError as exc:
                # Another process grabbed a just-picked port: pick again, once.
                if attempt or "already in use" not in str(exc):
                    raise
                atexit.unregister(broker.stop)
        yield broker
    finally:
        if broker is not None:
            broker.stop()
            atexit.unregister(broker.stop)
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def kafka_broker(local_kafka: LocalKafka | None) -> str:
    """Bootstrap address of the session's broker: started here, or the one named by TALLY_TEST_BOOTSTRAP."""
    if local_kafka is None:
        bootstrap = os.environ[BOOTSTRAP_ENV]
        wait_for_broker(bootstrap, timeout=30.0)
        return bootstrap
    return local_kafka.bootstrap


def delete_topics(bootstrap: str, names: list[str], timeout: float = 10.0) -> None:
    """Best-effort topic deletion (test cleanup); never raises."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    with contextlib.suppress(Exception):
        for fut in admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=timeout)


@pytest.fixture
def kafka_settings(kafka_broker: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings for one test: the session broker, a unique topic prefix (all topics created), tmp data dir."""
    settings = Settings(
        data_dir=tmp_path,
        kafka_bootstrap=kafka_broker,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=TEST_PARTITIONS,
    )
    ensure_topics(settings)
    yield settings
    delete_topics(kafka_broker, list(settings.topics.all()))
