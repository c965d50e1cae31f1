"""How every tally Kafka client connects: the bootstrap servers plus TLS and SASL, in each client library's words.

One KafkaAuth (Settings.kafka) feeds librdkafka (confluent-kafka: the SDK publisher, the CLI, the alert consumer,
admin calls), aiokafka (the reference feed) and Faust (the workers). A function that takes `bootstrap` accepts a
plain "host:port,…" string (PLAINTEXT, as tests and scripts pass it) or a KafkaAuth.

Protocols: PLAINTEXT, SSL (TLS; with a client certificate when certfile and keyfile are given), SASL_PLAINTEXT and
SASL_SSL with SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN. The CA file verifies the brokers' certificates, host names
included. The password is a secret: never in repr, logs or a child's environment (it reads its own source).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tally.errors import TallyError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True)
class KafkaAuth:
    """Where and how to reach the brokers."""

    bootstrap: str
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def __str__(self) -> str:  # messages name the brokers, never the credentials
        return self.bootstrap if self.protocol == "PLAINTEXT" else f"{self.bootstrap} ({self.protocol})"

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def problems(self) -> list[str]:
        """What is wrong with these connection settings (empty when valid); files are checked to exist."""
        from pathlib import Path

        out = []
        if self.protocol not in PROTOCOLS:
            out.append(f"kafka_security_protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.sasl:
            if self.sasl_mechanism not in MECHANISMS:
                out.append(f"kafka_sasl_mechanism must be one of {', '.join(MECHANISMS)}, got "
                           f"{self.sasl_mechanism!r}")
            if not self.sasl_username or not self.sasl_password:
                out.append(f"{self.protocol} needs kafka_sasl_username and a password (TALLY_KAFKA_SASL_PASSWORD "
                           "or TALLY_KAFKA_SASL_PASSWORD_FILE)")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            out.append("a client certificate needs both kafka_ssl_certfile and kafka_ssl_keyfile")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                out.append(f"kafka_{name} {path} is not a readable file")
            if path and not self.tls:
                out.append(f"kafka_{name} is set but kafka_security_protocol {self.protocol} does not use TLS")
        return out

    def rdkafka(self) -> dict[str, Any]:
        """Librdkafka (confluent-kafka) configuration: bootstrap.servers plus security."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        if self.protocol == "PLAINTEXT":
            return conf
        conf["security.protocol"] = self.protocol
        if self.sasl:
            conf.update({"sasl.mechanisms": self.sasl_mechanism, "sasl.username": self.sasl_username,
                         "sasl.password": self.sasl_password})
        if self.tls:
            if self.ssl_cafile:
                conf["ssl.ca.location"] = self.ssl_cafile
            if self.ssl_certfile:
                conf["ssl.certificate.location"] = self.ssl_certfile
                conf["ssl.key.location"] = self.ssl_keyfile
        return conf

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the Python clients (aiokafka, Faust): the CA file, an optional client certificate."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def aiokafka(self) -> dict[str, Any]:
        """Aiokafka client keyword arguments: bootstrap_servers plus security."""
        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.protocol == "PLAINTEXT":
            return kwargs
        kwargs["security_protocol"] = self.protocol
        if self.sasl:
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def faust_credentials(self) -> Any:
        """Faust's broker_credentials (None for PLAINTEXT)."""
        import faust

        if self.protocol == "PLAINTEXT":
            return None
        if self.sasl:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         ssl_context=self.ssl_context(), mechanism=self.sasl_mechanism)
        return faust.SSLCredentials(self.ssl_context())


def as_auth(bootstrap: str | KafkaAuth) -> KafkaAuth:
    """A KafkaAuth from either form (a plain string is PLAINTEXT)."""
    return bootstrap if isinstance(bootstrap, KafkaAuth) else KafkaAuth(bootstrap)


def rdkafka_conf(bootstrap: str | KafkaAuth, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Librdkafka configuration for `bootstrap` (string or KafkaAuth), with `extra` settings added."""
    return {**as_auth(bootstrap).rdkafka(), **(extra or {})}


#: librdkafka errors that mean "these credentials or this CA will never work": fail at once, don't retry.
_REFUSALS = frozenset({-169, -181, 58, 33, 34})  # _AUTHENTICATION, _SSL, SASL_AUTHENTICATION_FAILED, SASL mechanism


class KafkaRefused(TallyError):
    """The brokers refused the connection: bad credentials, an unknown SASL mechanism or an untrusted certificate."""


def watched(bootstrap: str | KafkaAuth, extra: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Return a librdkafka configuration whose error_cb collects errors, and their list (see `metadata`)."""
    errors: list[Any] = []

    def heard(error: Any) -> None:  # only refusals, and only the first few: a long-lived client never grows it
        if error.code() in _REFUSALS and len(errors) < 8:
            errors.append(error)
    return {**rdkafka_conf(bootstrap, extra), "error_cb": heard}, errors


def metadata(client: Any, errors: list[Any], bootstrap: str | KafkaAuth, timeout: float,
             topic: str | None = None) -> Any:
    """The cluster (or one topic's) metadata, failing within a second or two of a refusal instead of at `timeout`.

    librdkafka retries a failed authentication until the call's timeout and then reports only "broker transport
    failure"; its error_cb hears the real reason at once. `client` must have been made from `watched`'s
    configuration with `errors` as its list. Raises KafkaRefused (with the broker's words and what to check) or,
    after `timeout`, the last KafkaException.
    """
    import time

    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.list_topics(topic, timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
        except KafkaException:
            if time.monotonic() >= deadline:
                raise
        if hasattr(client, "poll"):
            client.poll(0)  # serves error_cb
        refused = [e for e in errors if e.code() in _REFUSALS]
        if refused:
            auth = as_auth(bootstrap)
            hint = ("check kafka_sasl_username and the password (TALLY_KAFKA_SASL_PASSWORD or "
                    "TALLY_KAFKA_SASL_PASSWORD_FILE), kafka_sasl_mechanism and kafka_ssl_cafile")
            raise KafkaRefused(f"Kafka at {auth} refused the connection: {refused[0].str()}; {hint}")
