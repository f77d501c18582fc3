"""Plain logic of the Ray runtime, without Ray running: env, settings transfer, sizing, HTTP contract."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from worker.config import ConfigError, Settings, load_settings
from worker.contracts.rejections import Reason, Rejection
from worker.runners.ray_actor import worker_device
from worker.runners.ray_env import LOCAL_RAY_ENV, local_ray_env, settings_from_payload, settings_payload
from worker.runners.ray_fleet import planned_worker_count
from worker.serve.app import deployment_options, settings_from_args
from worker.serve.http_contract import (
    TOO_MANY_EVENTS,
    UNSUPPORTED_MEDIA_TYPE,
    error_body,
    from_rejection,
    is_json_content_type,
    status_for,
)

REPO = Path(__file__).resolve().parents[2]


def test_local_ray_env_keeps_ray_on_loopback_without_auth_or_usage_reporting() -> None:
    local_ray_env()
    assert {k: os.environ[k] for k in LOCAL_RAY_ENV} == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is False  # ray was imported after the variable was set


def test_settings_sent_to_an_actor_ignore_the_actors_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(kafka__group_id="driver-group", kafka__sasl_password="s3cret")
    monkeypatch.setenv("MW_KAFKA__GROUP_ID", "actor-env-group")
    rebuilt = settings_from_payload(settings_payload(settings))
    assert rebuilt.kafka.group_id == "driver-group"
    assert (
        rebuilt.kafka.sasl_password is not None and rebuilt.kafka.sasl_password.get_secret_value() == "s3cret"
    )
    assert isinstance(rebuilt, Settings)


@pytest.mark.parametrize(
    ("num_workers", "per_worker", "cluster_gpus", "expected"),
    [
        (None, 1.0, 4.0, (4, 1.0)),  # one per GPU
        (None, 0.5, 2.0, (4, 0.5)),  # two per GPU
        (2, 1.0, 8.0, (2, 1.0)),  # configured count wins
        (None, 1.0, 0.0, (1, 0.0)),  # no GPU: one CPU worker
        (3, 1.0, 0.0, (3, 0.0)),
    ],
)
def test_planned_worker_count(
    num_workers: int | None, per_worker: float, cluster_gpus: float, expected: tuple
) -> None:
    settings = load_settings(ray__num_workers=num_workers, ray__num_gpus_per_worker=per_worker)
    assert planned_worker_count(settings, cluster_gpus) == expected


def test_worker_device_is_cuda0_only_when_a_gpu_is_assigned_and_visible() -> None:
    assert worker_device(["1"], cuda_available=True) == "cuda:0"  # Ray narrows CUDA_VISIBLE_DEVICES to it
    assert worker_device(["1"], cuda_available=False) == "cpu"  # fake GPU on a CPU box
    assert worker_device([], cuda_available=True) == "cpu"


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (Reason.INVALID_JSON, 400),
        (Reason.INVALID_UTF8, 400),
        (Reason.DUPLICATE_KEY, 400),
        (Reason.RECORD_TOO_LARGE, 413),
        (TOO_MANY_EVENTS, 413),
        (UNSUPPORTED_MEDIA_TYPE, 415),
        (Reason.MISSING_FIELD, 422),
        (Reason.UNKNOWN_ROLE, 422),
        (Reason.UNKNOWN_POLICY, 422),
        (Reason.IMAGE_UNDECODABLE, 422),
        (Reason.ENGINE_ERROR, 500),
    ],
)
def test_http_status_of_each_reason(reason: str, status: int) -> None:
    assert status_for(reason) == status


def test_batch_errors_name_the_item_and_its_field() -> None:
    err = from_rejection(Rejection(Reason.UNKNOWN_ROLE, "role 'wizard' is unknown", "messages[0].role"), 2)
    assert (err.field, err.index, err.status) == ("[2].messages[0].role", 2, 422)
    status, body = error_body([err])
    assert status == 422
    assert body["error"] == {
        "status": 422,
        "reason": "unknown_role",
        "message": "role 'wizard' is unknown",
        "field": "[2].messages[0].role",
        "index": 2,
    }


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/vnd.mw+json", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        (None, False),
    ],
)
def test_json_content_types(content_type: str | None, ok: bool) -> None:
    assert is_json_content_type(content_type) is ok


def test_serve_args_merge_inline_sections_over_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump({"serve": {"max_batch_size": 8, "num_replicas": 2}}))
    settings = settings_from_args({"config": str(config), "settings": {"serve": {"max_batch_size": 4}}})
    assert (settings.serve.max_batch_size, settings.serve.num_replicas) == (4, 2)
    with pytest.raises(ConfigError, match="max_batch_size"):
        settings_from_args({"settings": {"serve": {"max_batch_size": 0}}})
    with pytest.raises(ConfigError, match="unknown serve app args"):
        settings_from_args({"cfg": "x"})


def test_max_ongoing_requests_is_never_below_one_full_batch() -> None:
    settings = load_settings(serve__max_batch_size=32, serve__max_ongoing_requests=5, serve__num_gpus=1)
    options = deployment_options(settings)
    assert options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": 0}


def test_serve_config_is_a_valid_serve_deploy_config_that_builds_our_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    assert app.import_path == "worker.serve.app:build_app"
    settings = settings_from_args(app.args)  # the args are valid worker settings
    assert settings.serve.max_ongoing_requests >= settings.serve.max_batch_size


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:6379", True),
        ("localhost:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("10.0.0.5:6379", False),
        ("ray-head.ray.svc:6379", False),
    ],
)
def test_a_cluster_on_loopback_keeps_the_driver_on_loopback_too(address: str, loopback: bool) -> None:
    from worker.runners.ray_env import _is_loopback_address

    assert _is_loopback_address(address) is loopback
