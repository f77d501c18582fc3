"""docker-compose.yml is a valid Compose file and consistent with the worker, the Dockerfile and Prometheus.

No Docker engine runs here: the file is validated against the Compose Specification's JSON Schema and
checked for what the schema cannot see (references, ports, env keys, mounted files).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema_rs
import pytest
import yaml

from tests.ops.helpers import REPO, deploy_schema, settings_field_for_env
from worker.config import load_settings

COMPOSE = REPO / "docker-compose.yml"
ONE_SHOT = {"kafka-init", "model-init", "demo-producer"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    return jsonschema_rs.validator_for(json.loads(deploy_schema("compose-spec.json").read_text()))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _host_port(mapping: str) -> tuple[str, int, int]:
    host_ip, host_port, container_port = mapping.split(":")
    return host_ip, int(host_port), int(container_port)


def test_compose_file_validates_against_the_compose_spec(compose, compose_validator) -> None:
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in compose_validator.iter_errors(compose)
    ]
    assert errors == []


def test_the_schema_check_catches_a_malformed_service(compose, compose_validator) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"] = {"redis": {"condition": "eventually"}}
    assert not compose_validator.is_valid(broken)


def test_expected_services_exist(compose) -> None:
    assert {"kafka", "kafka-init", "redis", "model-init", "worker", "prometheus", "grafana"} <= set(
        compose["services"]
    )
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:")
    kafka_env = _env(compose["services"]["kafka"])
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft, single node


def test_dependencies_name_existing_services_and_one_shots_do_not_restart(compose) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for target in depends if isinstance(depends, list) else depends.keys():
            assert target in services, f"{name} depends on missing {target}"
            if (
                isinstance(depends, dict)
                and depends[target].get("condition") == "service_completed_successfully"
            ):
                assert target in ONE_SHOT, (
                    f"{name} waits for {target} to exit, but it is a long-running service"
                )
    for name in ONE_SHOT:
        assert services[name].get("restart") == "no"


def test_named_volumes_are_declared_and_bind_mounts_exist(compose) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_published_ports_are_loopback_only_and_unique(compose) -> None:
    seen: dict[int, str] = {}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host_ip, host_port, _ = _host_port(mapping)
            assert host_ip == "127.0.0.1", f"{name} publishes {mapping} beyond loopback"
            assert host_port not in seen, f"{name} and {seen.get(host_port)} both publish {host_port}"
            seen[host_port] = name


def test_worker_environment_keys_are_real_settings_that_load(compose, monkeypatch) -> None:
    for name in ("worker", "model-init", "demo-producer"):
        env = {k: v for k, v in _env(compose["services"][name]).items() if k.startswith("MW_")}
        assert env, name
        for key in env:
            settings_field_for_env(key)
    env = {k: v for k, v in _env(compose["services"]["worker"]).items() if k.startswith("MW_")}
    monkeypatch.delenv("MW_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == ["kafka:9092"]
    assert settings.redis.url.startswith("redis://redis:")
    assert (settings.ops.host, settings.ops.port) == ("0.0.0.0", 9400)


def test_worker_endpoints_match_kafka_redis_prometheus_and_the_published_port(compose, monkeypatch) -> None:
    services = compose["services"]
    env = _env(services["worker"])
    (bootstrap,) = json.loads(env["MW_KAFKA__BOOTSTRAP_SERVERS"])
    host, _ = bootstrap.split(":")
    assert host in services
    assert f"PLAINTEXT://{bootstrap}" in _env(services[host])["KAFKA_ADVERTISED_LISTENERS"]
    assert re.match(r"redis://redis:6379/\d+$", env["MW_REDIS__URL"])

    ops_port = int(env["MW_OPS__PORT"])
    assert [_host_port(p)[2] for p in services["worker"]["ports"]] == [ops_port]
    assert str(ops_port) in " ".join(services["worker"]["healthcheck"]["test"])
    prometheus = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"worker:{ops_port}" in targets
    datasources = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_topic_creation_covers_every_configured_topic(compose) -> None:
    env = _env(compose["services"]["worker"])
    script = compose["services"]["kafka-init"]["command"][0]
    created = set(re.findall(r"([\w.]+):\d+", script.split("for topic in", 1)[1].split(";", 1)[0]))
    assert {env[f"MW_TOPICS__{t}"] for t in ("EVENTS", "FLAGGED", "VERDICTS", "DLQ")} <= created


def test_model_init_writes_where_the_worker_reads(compose) -> None:
    services = compose["services"]
    model_path = _env(services["worker"])["MW_MODEL__PATH"]
    assert services["model-init"]["command"] == ["build-tiny-model", model_path]
    worker_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["worker"]["volumes"]}
    init_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["model-init"]["volumes"]}
    mount = next(m for m in worker_mounts if model_path.startswith(m + "/"))
    assert init_mounts[mount] == worker_mounts[mount]


def test_worker_image_builds_from_the_dockerfile_with_cpu_and_cuda_variants(compose) -> None:
    build = compose["services"]["worker"]["build"]
    dockerfile = (REPO / build["context"] / build["dockerfile"]).read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.MULTILINE | re.IGNORECASE))
    assert {"torch-cpu", "torch-cuda", "runtime"} <= stages
    assert "FROM torch-${VARIANT} AS runtime" in dockerfile
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, flags=re.MULTILINE)
    assert "VARIANT" in build["args"]
    # Everything the Dockerfile copies exists in the build context.
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (REPO / build["context"] / path).exists(), path


def test_grafana_provisions_the_charts_dashboard(compose) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/dashboards/moderation-worker.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./helm/moderation-worker/dashboards"] == path
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert (REPO / "helm/moderation-worker/dashboards/moderation-worker.json").is_file()
