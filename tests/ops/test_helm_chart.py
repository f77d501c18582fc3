"""The Helm chart loads, lints and renders with Helm's own engine, and what it renders is valid.

Helm runs in-process through the helm-python-sdk wheel (Helm's Go SDK behind a C ABI): no ``helm`` binary,
no cluster. The rendered RayService is validated against KubeRay's CRD schema from tests/ops/deploy-schemas (vendored).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema_rs
import pytest
import yaml

from tests.ops.helpers import (
    CHART_DIR,
    DASHBOARD,
    DEPLOY_SCHEMAS,
    REPO,
    kubernetes_to_json_schema,
    settings_field_for_env,
)
from worker.config import Settings, load_settings
from worker.ops import values_schema

pytestmark = pytest.mark.timeout(120)

RELEASE, NAMESPACE = "mw", "moderation"
VALUE_SETS = {
    "default": None,
    "cpu": CHART_DIR / "ci" / "values-cpu.yaml",
    "gpu": CHART_DIR / "examples" / "values-gpu.yaml",
}


def _values(which: str) -> dict[str, Any] | None:
    path = VALUE_SETS[which]
    return None if path is None else yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def _render(chart: helm.Chart, values: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """Render and parse: ``{kind: [objects]}`` (NOTES.txt left out)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: dict[str, list[dict[str, Any]]] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.setdefault(doc["kind"], []).append(doc)
    return objects


@pytest.fixture(scope="module")
def rendered(chart: helm.Chart) -> dict[str, dict[str, list[dict[str, Any]]]]:
    return {which: _render(chart, _values(which)) for which in VALUE_SETS}


@pytest.fixture(scope="module")
def rayservice_validator() -> Any:
    # 1 MB of YAML: the C loader reads it in well under a second (the pure-Python one takes several).
    crd = yaml.load((DEPLOY_SCHEMAS / "ray.io_rayservices.yaml").read_text(), Loader=yaml.CSafeLoader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema_rs.validator_for(kubernetes_to_json_schema(v1["schema"]["openAPIV3Schema"]))


def _one(objects: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (obj,) = objects[kind]
    return obj


def _worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def _config_from_configmap(objects: dict[str, list[dict[str, Any]]], tmp_path: Path) -> Settings:
    (configmap,) = [c for c in objects["ConfigMap"] if c["metadata"]["name"].endswith("-config")]
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    return load_settings(path)


# --- load and lint ------------------------------------------------------------------------------------------


def test_chart_loads_with_metadata_schema_and_dashboard(chart: helm.Chart) -> None:
    assert (chart.name, chart.metadata["apiVersion"]) == ("moderation-worker", "v2")
    assert "KubeRay" in chart.metadata["annotations"]["moderation-worker/requires"]
    assert not chart.dependencies, "KubeRay operator is a prerequisite, not a vendored subchart"
    assert chart.schema is not None
    assert "dashboards/moderation-worker.json" in {f["name"] for f in chart.files}


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_chart_lints_clean_in_strict_mode(which: str) -> None:
    report = helm.lint(CHART_DIR, _values(which), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- values.schema.json -------------------------------------------------------------------------------------


def test_values_schema_file_is_generated_from_the_current_settings() -> None:
    assert (CHART_DIR / "values.schema.json").read_text() == values_schema.render(), (
        "values.schema.json is stale: run `python -m worker.ops.values_schema`"
    )


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_shipped_values_files_pass_the_schema(chart: helm.Chart, which: str) -> None:
    chart.validate_schema(chart.merge_values(_values(which)))


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"gpuWorkers": {"gpusPerPod": -1}}, "/gpuWorkers/gpusPerPod"),
        ({"image": {"variant": "rocm"}}, "/image/variant"),
        ({"modelWeights": {"source": "nfs"}}, "/modelWeights/source"),
        ({"stream": {"actors": 0}}, "/stream/actors"),
        ({"rayVersion": "latest"}, "/rayVersion"),
        ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "/metrics/serviceMonitor/interval"),
        (
            {"gpuWorkers": {"resources": {"limits": {"memory": "lots"}}}},
            "/gpuWorkers/resources/limits/memory",
        ),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
        # The worker's own config keys and bounds, from worker/config.py:
        ({"config": {"kafka": {"bootstrap_server": "x:9092"}}}, "bootstrap_server"),
        ({"config": {"batching": {"max_size": 0}}}, "/config/batching/max_size"),
        ({"config": {"logging": {"format": "xml"}}}, "/config/logging/format"),
        ({"config": {"kafka": {"security_protocol": "TLS"}}}, "/config/kafka/security_protocol"),
    ],
)
def test_values_schema_rejects_bad_values(chart: helm.Chart, bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(bad))
    assert where in str(err.value)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)


# --- rendered objects ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_rendered_rayservice_validates_against_the_kuberay_crd(
    rendered, rayservice_validator, which: str
) -> None:
    rayservice = _one(rendered[which], "RayService")
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in rayservice_validator.iter_errors(rayservice)
    ]
    assert errors == []


def test_crd_validation_catches_a_misspelt_field(rendered, rayservice_validator) -> None:
    rayservice = copy.deepcopy(_one(rendered["default"], "RayService"))
    _worker_group(rayservice)["replica"] = 2
    assert not rayservice_validator.is_valid(rayservice)


@pytest.mark.parametrize("which", ["default", "gpu"])
def test_gpu_worker_group_requests_equal_limits_and_placement_comes_from_values(rendered, which: str) -> None:
    chart_values = helm.Chart.load(CHART_DIR).merge_values(_values(which))
    group = _worker_group(_one(rendered[which], "RayService"))
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    gpus = chart_values["gpuWorkers"]["gpusPerPod"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert pod["nodeSelector"] == chart_values["gpuWorkers"]["nodeSelector"]
    assert pod["tolerations"] == chart_values["gpuWorkers"]["tolerations"]
    assert group["replicas"] == chart_values["gpuWorkers"]["replicas"]
    head = _one(rendered[which], "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
        "spec"
    ]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"].get("limits", {})


def test_cpu_values_request_no_gpus(rendered) -> None:
    pod = _worker_group(_one(rendered["cpu"], "RayService"))["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["containers"][0]["image"].endswith("-cpu")


def test_gpu_capacity_shortfall_fails_the_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="GPU capacity"):
        chart.render({"stream": {"actors": 3}}, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_serve_config_matches_the_repo_serve_config_shape(rendered, which: str) -> None:
    serve_config = yaml.safe_load(_one(rendered[which], "RayService")["spec"]["serveConfigV2"])
    repo_config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    (app,) = serve_config["applications"]
    (repo_app,) = repo_config["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == repo_app[key], key
    assert app["import_path"] == "worker.runtime.serve_app:build_app"
    assert set(app["args"]) == set(repo_app["args"]) == {"settings"}
    # The inline overrides are real Settings sections and values.
    merged = Settings(**app["args"]["settings"])
    assert (
        merged.serve.num_gpus
        == helm.Chart.load(CHART_DIR).merge_values(_values(which))["config"]["serve"]["num_gpus"]
    )


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_configmap_holds_a_config_that_load_settings_accepts(rendered, which: str, tmp_path: Path) -> None:
    settings = _config_from_configmap(rendered[which], tmp_path)
    rayservice_name = _one(rendered[which], "RayService")["metadata"]["name"]
    assert settings.ray.enabled
    assert settings.ray.address == f"ray://{rayservice_name}-head-svc.{NAMESPACE}.svc:10001"
    chart_values = helm.Chart.load(CHART_DIR).merge_values(_values(which))
    assert settings.ray.num_workers == chart_values["stream"]["actors"]
    assert settings.model.path.startswith(chart_values["modelWeights"]["mountPath"] + "/")


def test_every_mw_environment_variable_in_the_pods_is_a_settings_key(rendered) -> None:
    for which, objects in rendered.items():
        pods = [d["spec"]["template"]["spec"] for d in objects["Deployment"]]
        rayservice = _one(objects, "RayService")["spec"]["rayClusterConfig"]
        pods += [
            rayservice["headGroupSpec"]["template"]["spec"],
            _worker_group({"spec": {"rayClusterConfig": rayservice}})["template"]["spec"],
        ]
        for pod in pods:
            for container in pod["containers"]:
                names = [
                    e["name"]
                    for e in container["env"]
                    if e["name"].startswith("MW_") and e["name"] != "MW_CONFIG"
                ]
                assert names, which
                for name in names:
                    settings_field_for_env(name)


def test_secrets_are_created_from_values_or_taken_from_an_existing_secret(
    chart: helm.Chart, tmp_path: Path
) -> None:
    objects = _render(chart, {"secrets": {"redisPassword": "s3cret", "hfToken": "hf_x"}})
    (secret,) = objects["Secret"]
    assert set(secret["data"]) == {"redis-password", "hf-token"}

    objects = _render(chart, {"secrets": {"existingSecret": "team-secrets"}})
    assert "Secret" not in objects
    env = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in env
        if e["name"].startswith("MW_") and "valueFrom" in e
    }
    assert refs == {"team-secrets"}


def test_api_keys_come_from_a_secret_and_auth_is_on_by_default(chart: helm.Chart, tmp_path: Path) -> None:
    objects = _render(chart, {"apiKeys": {"keys": {"default": "k" * 32, "batch-jobs": "b" * 32}}})
    (secret,) = [s for s in objects["Secret"] if s["metadata"]["name"].endswith("-api-keys")]
    assert set(secret["data"]) == {"default", "batch-jobs"}
    env = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    ref = by_name["MODERATION_API_KEY_BATCH_JOBS"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] == "batch-jobs"
    config = yaml.safe_load(objects["ConfigMap"][0]["data"]["config.yaml"])
    assert config["auth"]["enabled"] is True
    assert config["auth"]["keys"]["default"]["key_env"] == "MODERATION_API_KEY_DEFAULT"
    assert "k" * 32 not in str(objects["ConfigMap"])

    objects = _render(chart, {"apiKeys": {"existingSecret": "team-api-keys"}})
    assert not [s for s in objects.get("Secret", []) if s["metadata"]["name"].endswith("-api-keys")]
    env = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    ref = {e["name"]: e for e in env}["MODERATION_API_KEY_DEFAULT"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "team-api-keys"


def test_kafka_mutual_tls_mounts_the_files_the_config_points_to(chart: helm.Chart, tmp_path: Path) -> None:
    objects = _render(
        chart,
        {
            "config": {"kafka": {"security_protocol": "SSL"}},
            "kafkaTls": {"enabled": True, "mutual": True, "ca": "CA", "cert": "CERT", "key": "KEY"},
        },
    )
    settings = _config_from_configmap(objects, tmp_path)
    tls_secret = next(s for s in objects["Secret"] if s["metadata"]["name"].endswith("-kafka-tls"))
    assert set(tls_secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    pod = objects["Deployment"][0]["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-tls"]
    for path in (settings.kafka.ssl_cafile, settings.kafka.ssl_certfile, settings.kafka.ssl_keyfile):
        assert path is not None and Path(path).parent == Path(mount["mountPath"])


def test_weights_volume_follows_the_source_value(chart: helm.Chart) -> None:
    def weights(values: dict[str, Any]) -> dict[str, Any] | None:
        objects = _render(chart, values)
        volumes = _worker_group(_one(objects, "RayService"))["template"]["spec"]["volumes"]
        return next((v for v in volumes if v["name"] == "model-weights"), None)

    assert weights({})["persistentVolumeClaim"]["claimName"] == "mw-moderation-worker-weights"
    assert (
        weights({"modelWeights": {"pvc": {"existingClaim": "llama"}}})["persistentVolumeClaim"]["claimName"]
        == "llama"
    )
    assert weights({"modelWeights": {"source": "hostPath"}})["hostPath"]["path"] == "/mnt/models"
    assert weights({"modelWeights": {"source": "none"}}) is None


def test_stream_driver_runs_the_ray_driver_with_probes_on_the_ops_port(rendered) -> None:
    (deployment,) = rendered["default"]["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"][:2] == ["run", "--ray"]
    (port,) = container["ports"]
    assert port["containerPort"] == 9400
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 30  # > shutdown.drain_timeout_s


def test_monitoring_objects_and_dashboard_configmap_are_optional(rendered) -> None:
    assert "ServiceMonitor" not in rendered["default"] and "PodMonitor" not in rendered["default"]
    gpu = rendered["gpu"]
    assert _one(gpu, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    relabel = _one(gpu, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["metricRelabelings"][0]
    assert relabel["regex"] == "ray_(mw_.+)" and relabel["replacement"] == "$1"
    (dashboard_cm,) = [c for c in gpu["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard_cm["data"]["moderation-worker.json"]) == json.loads(DASHBOARD.read_text())
