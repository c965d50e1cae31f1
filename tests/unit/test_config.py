from pathlib import Path

import pytest

from tally.config import Settings, load_settings
from tally.errors import ConfigError


def test_defaults_are_valid_and_embedded():
    s = load_settings(env={})
    assert s.problems() == []
    assert s.embedded and s.ch_url.startswith("chdb:///") and s.ch_url.endswith("/.tally/chdb")
    assert s.topics.usage == "llm.usage.v1" and s.topics.dlq == "llm.usage.dlq.v1"
    assert s.group_id("sink") == "tally-sink"


def test_env_then_flags_win():
    s = load_settings(env={"TALLY_PARTITIONS": "8", "TALLY_TOPIC_PREFIX": "a.", "TALLY_DATA_DIR": "relative/x"},
                      topic_prefix="b.", partitions=None)
    assert s.partitions == 8 and s.topic_prefix == "b." and s.data_dir == Path("relative/x").resolve()
    assert s.topics.attempts == "b.llm.cost.attempts.v1"


def test_every_problem_is_reported_at_once():
    s = Settings(partitions=0, kafka_bootstrap="nohostport", clickhouse_url="mysql://x", web_port=70000,
                 batch_within_s=0, log_level="LOUD")
    problems = s.problems()
    assert len(problems) >= 6
    with pytest.raises(ConfigError) as exc:
        s.validated()
    assert "partitions" in str(exc.value) and "clickhouse_url" in str(exc.value)


def test_malformed_env_values_are_collected():
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"TALLY_PARTITIONS": "four", "TALLY_WEB_PORT": "x"})
    assert len(exc.value.problems) == 2


def test_password_is_redacted_and_kept_secret():
    s = load_settings(env={}, clickhouse_url="https://writer:hunter2@ch.internal:8443")
    assert "hunter2" not in s.redacted_ch_url() and "***" in s.redacted_ch_url()
    assert "hunter2" not in repr(s.secrets) or s.secrets == ("hunter2",)
    assert not s.embedded


def test_to_env_round_trips():
    s = load_settings(env={}, topic_prefix="p.", partitions=6, web_port=7001)
    assert load_settings(env=s.to_env()) == s


def test_the_future_skew_is_a_setting_and_must_not_be_negative():
    assert load_settings(env={}).max_future_skew_s == 900.0
    assert load_settings(env={"TALLY_MAX_FUTURE_SKEW_S": "60"}).max_future_skew_s == 60.0
    assert Settings(max_future_skew_s=-1).problems() == ["max_future_skew_s must not be negative, got -1"]


def test_an_https_clickhouse_is_verified_against_its_ca_file(tmp_path) -> None:
    from tally.store import Store

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    server = load_settings(env={}, data_dir=tmp_path, clickhouse_url="https://tally_writer:pw@ch.example:8443",
                           clickhouse_ca_file=str(ca))
    assert server.problems() == []
    assert Store(server).tls() == {"verify": True, "ca_cert": str(ca)}
    public = load_settings(env={}, data_dir=tmp_path, clickhouse_url="https://tally_writer:pw@ch.example:8443")
    assert Store(public).tls() == {"verify": True}
    assert Store(load_settings(env={}, data_dir=tmp_path)).tls() == {}  # chDB
    plain = load_settings(env={}, data_dir=tmp_path, clickhouse_url="http://ch.example:8123",
                          clickhouse_ca_file=str(ca))
    assert any("clickhouse_ca_file" in p for p in plain.problems())


def test_kafka_security_settings_are_checked_and_the_password_stays_secret(tmp_path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("s3cret-scram-password\n")
    env = {"TALLY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "TALLY_KAFKA_SASL_USERNAME": "tally",
           "TALLY_KAFKA_SASL_PASSWORD_FILE": str(secret), "TALLY_DATA_DIR": str(tmp_path)}
    s = load_settings(env=env)
    assert s.problems() == [] and s.kafka.sasl_password == "s3cret-scram-password"
    conf = s.kafka.rdkafka()
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert "s3cret" not in repr(s) and "s3cret" not in repr(s.kafka) and "s3cret" not in str(s.kafka)
    assert "TALLY_KAFKA_SASL_PASSWORD" not in s.to_env()  # a child reads the file itself
    assert "s3cret-scram-password" in s.secrets  # what a caller must never show (the URL's password too)
    no_password = load_settings(env={**env, "TALLY_KAFKA_SASL_PASSWORD_FILE": ""})
    assert any("needs kafka_sasl_username and a password" in p for p in no_password.problems())
    half_cert = load_settings(env={**env, "TALLY_KAFKA_SSL_CERTFILE": str(secret)})
    assert any("needs both kafka_ssl_certfile and kafka_ssl_keyfile" in p for p in half_cert.problems())
    assert any("must be one of" in p for p in load_settings(
        env={"TALLY_KAFKA_SECURITY_PROTOCOL": "TLS", "TALLY_DATA_DIR": str(tmp_path)}).problems())
