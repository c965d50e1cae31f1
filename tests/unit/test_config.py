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
