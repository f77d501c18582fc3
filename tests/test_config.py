"""Settings: YAML + environment, errors naming the key, masked output, and the generated reference."""

import subprocess
import sys

import pytest

from tools.config_reference import REFERENCE_PATH, render
from worker.config import ConfigError, load_settings


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
    cfg.write_text(
        "kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n  sasl_username: u\n"
        "  sasl_password: hunter2\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "worker", "config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "sasl_username: u" in out.stdout
    cfg.write_text("kafka:\n  nope: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "worker", "config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "kafka.nope" in out.stderr


def test_config_reference_is_up_to_date():
    assert REFERENCE_PATH.read_text() == render(), "run: python -m tools.config_reference"


def test_a_bad_override_names_the_full_key():
    with pytest.raises(ConfigError, match=r"serve\.max_batch_size"):
        load_settings(None, serve__max_batch_size=0)
    with pytest.raises(ConfigError, match=r"unknown configuration key: kafka\.nope"):
        load_settings(None, kafka__nope=1)


def _cli(*args, env=None, timeout=60):
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=full_env,
    )


def test_config_command_masks_the_password_inside_url_settings():
    out = _cli(
        "config",
        env={"MW_REDIS__URL": "redis://user:s3cr3t@127.0.0.1:6379/0", "MW_MODEL__HF_TOKEN": "hf_abcdef"},
    )
    assert out.returncode == 0, out.stderr
    assert "s3cr3t" not in out.stdout and "hf_abcdef" not in out.stdout
    assert "redis://user:**********@127.0.0.1:6379/0" in out.stdout


def test_url_credentials_are_masked_in_log_lines():
    import io
    import json
    import logging

    from worker.ops.logs import configure_logging

    stream = io.StringIO()
    handler = configure_logging(stream=stream)
    try:
        logging.getLogger("t").warning("cache at redis://:pw1@h:1/0 down", extra={"url": "redis://u:pw2@h:1"})
    finally:
        logging.getLogger().removeHandler(handler)
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert "pw1" not in line["msg"] and "pw2" not in line["url"]
    assert line["url"] == "redis://u:**********@h:1"


def test_a_comma_separated_broker_list_in_the_environment_is_accepted(monkeypatch):
    monkeypatch.setenv("MW_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    assert load_settings().kafka.bootstrap_servers == ["127.0.0.1:9092"]
    monkeypatch.setenv("MW_KAFKA__BOOTSTRAP_SERVERS", "a:1, b:2")
    assert load_settings().kafka.bootstrap_servers == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MW_POLICIES": "notjson"}, "policies"),
        ({"MW_BATCHNG__MAX_SIZE": "5"}, "batchng"),
        ({"MW_BATCHING__MAX_SZE": "5"}, "batching.max_sze"),
        ({"MW_BATCHING__MAX_SIZE": "many"}, "batching.max_size"),
        ({"MW_POLICIES__DEFAULT__THRESHOLD": "2"}, "policies.default.threshold"),
        ({"MW_IMAGE_FETCH__ALLOW_NETWORKS": "not-a-cidr"}, "image_fetch.allow_networks"),
    ],
)
def test_every_environment_mistake_is_one_line_naming_the_key_with_exit_2(env, key):
    out = _cli("config", env=env)
    assert out.returncode == 2, out.stdout[-300:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert key in lines[0] and next(iter(env)) in lines[0]
    assert "Traceback" not in out.stderr


def test_config_reference_shows_the_policies_default_as_json_not_a_python_repr():
    row = next(line for line in render().splitlines() if line.startswith("| `policies` |"))
    assert '{"default": {"categories": null' in row and "categories=[" not in row
