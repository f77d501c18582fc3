"""Settings: YAML + environment, errors naming the key, masked output, and the generated reference."""

import subprocess
import sys

import pytest

from worker.config import ConfigError, load_settings
from worker.config_reference import REFERENCE_PATH, render


def test_defaults_point_at_the_embedded_services_on_loopback():
    s = load_settings()
    assert s.kafka.bootstrap_servers == ["127.0.0.1:9092"]
    assert s.redis.url.startswith("redis://127.0.0.1:")
    assert s.topics.events == "chat.events" and s.topics.dlq == "moderation.dlq"
    assert s.policies[s.default_policy].threshold == 0.5


def test_environment_overrides_yaml(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  group_id: from-yaml\nbatching:\n  max_size: 8\n")
    monkeypatch.setenv("MW_KAFKA__GROUP_ID", "from-env")
    s = load_settings(cfg)
    assert s.kafka.group_id == "from-env"
    assert s.batching.max_size == 8


def test_list_values_from_environment_are_json(monkeypatch):
    monkeypatch.setenv("MW_KAFKA__BOOTSTRAP_SERVERS", '["a:1","b:2"]')
    assert load_settings().kafka.bootstrap_servers == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("kafka:\n  bootstrapp_servers: [x]\n", "kafka.bootstrapp_servers"),
        ("redis:\n  ttl_seconds: 0\n", "redis.ttl_seconds"),
        ("batching:\n  max_size: many\n", "batching.max_size"),
        ("policies:\n  default:\n    categories: [S99]\n", "policies.default.categories"),
        ("default_policy: strict\n", "default_policy"),
        ("unknown_section: {}\n", "unknown_section"),
    ],
)
def test_bad_key_or_value_fails_naming_the_key(tmp_path, yaml_text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert key.split(".")[-1] in str(exc.value)


def test_missing_or_non_mapping_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)


def test_config_command_masks_secrets_and_rejects_bad_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n  sasl_username: u\n"
                   "  sasl_password: hunter2\n")
    out = subprocess.run([sys.executable, "-m", "worker", "config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "sasl_username: u" in out.stdout
    cfg.write_text("kafka:\n  nope: 1\n")
    out = subprocess.run([sys.executable, "-m", "worker", "config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "kafka.nope" in out.stderr


def test_config_reference_is_up_to_date():
    assert REFERENCE_PATH.read_text() == render(), "run: python -m worker.config_reference"


def test_a_bad_override_names_the_full_key():
    with pytest.raises(ConfigError, match=r"serve\.max_batch_size"):
        load_settings(None, serve__max_batch_size=0)
    with pytest.raises(ConfigError, match=r"unknown configuration key: kafka\.nope"):
        load_settings(None, kafka__nope=1)
