"""The Helm chart loads, lints and renders with Helm's own engine, and what it renders is valid.

Helm runs in-process through the helm-python-sdk wheel (Helm's Go SDK behind a C ABI): no ``helm`` binary,
no cluster. Every rendered object is validated: Kubernetes' own kinds (and every pod template inside the Ray
objects) against the OpenAPI schemas that ``kubernetes-validate`` bundles, RayCluster and RayService against
KubeRay's CRDs (read from ../shared/deploy-schemas; skipped where absent). Every pod passes the "restricted"
Pod Security Standard (tests/ops/pod_security.py).
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
    REPO,
    deploy_schema,
    kubernetes_to_json_schema,
    settings_field_for_env,
)
from tests.ops.pod_security import restricted_violations
from tools import values_schema
from worker.config import Settings, load_settings

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


def _crd_validator(file_name: str) -> Any:
    # 1 MB of YAML: the C loader reads it in well under a second (the pure-Python one takes several).
    crd = yaml.load(deploy_schema(file_name).read_text(), Loader=yaml.CSafeLoader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema_rs.validator_for(kubernetes_to_json_schema(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rayservice_validator() -> Any:
    return _crd_validator("ray.io_rayservices.yaml")


@pytest.fixture(scope="module")
def raycluster_validator() -> Any:
    return _crd_validator("ray.io_rayclusters.yaml")


def pod_templates(objects: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every pod template the objects create: ``{"<Kind>/<name>[/<group>]": PodTemplateSpec}``."""
    templates = {
        f"Deployment/{d['metadata']['name']}": d["spec"]["template"] for d in objects.get("Deployment", [])
    }
    for kind, path in (("RayCluster", ("spec",)), ("RayService", ("spec", "rayClusterConfig"))):
        for obj in objects.get(kind, []):
            cluster = obj
            for key in path:
                cluster = cluster[key]
            name = f"{kind}/{obj['metadata']['name']}"
            templates[f"{name}/head"] = cluster["headGroupSpec"]["template"]
            for group in cluster["workerGroupSpecs"]:
                templates[f"{name}/{group['groupName']}"] = group["template"]
    return templates


def _one(objects: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (obj,) = objects[kind]
    return obj


def _worker_group(ray_object: dict[str, Any]) -> dict[str, Any]:
    spec = ray_object["spec"]
    (group,) = spec.get("rayClusterConfig", spec)["workerGroupSpecs"]
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
        "values.schema.json is stale: run `python -m tools.values_schema`"
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


# --- rendered objects: schemas -----------------------------------------------------------------------------

KUBERNETES_VERSION = "1.33"
# Prometheus Operator kinds: their CRDs are not among the schemas available offline; their fields are checked
# by test_monitoring_objects_and_dashboard_configmap_are_optional.
NO_SCHEMA_KINDS = {"ServiceMonitor", "PodMonitor"}


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_every_rendered_kubernetes_object_validates_strictly(rendered, which: str) -> None:
    import kubernetes_validate

    errors = []
    for kind, objects in rendered[which].items():
        if kind in ("RayCluster", "RayService") or kind in NO_SCHEMA_KINDS:
            continue
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{kind}/{obj['metadata']['name']}: {err.message}")
    # The Ray objects' pod templates are core PodTemplateSpecs: validate them as Kubernetes does.
    for where, template in pod_templates(rendered[which]).items():
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{where}: {err.message}")
    assert errors == []


def test_kubernetes_validation_catches_a_misspelt_field(rendered) -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(rendered["default"]["Deployment"][0])
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_rendered_ray_objects_validate_against_the_kuberay_crds(
    rendered, rayservice_validator, raycluster_validator, which: str
) -> None:
    errors = []
    for obj, validator in ((_one(rendered[which], "RayService"), rayservice_validator),
                           (_one(rendered[which], "RayCluster"), raycluster_validator)):  # fmt: skip
        errors += [
            f"{obj['kind']} {'/'.join(map(str, e.instance_path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    assert errors == []


def test_crd_validation_catches_a_misspelt_field(
    rendered, rayservice_validator, raycluster_validator
) -> None:
    rayservice = copy.deepcopy(_one(rendered["default"], "RayService"))
    _worker_group(rayservice)["replica"] = 2
    assert not rayservice_validator.is_valid(rayservice)
    raycluster = copy.deepcopy(_one(rendered["default"], "RayCluster"))
    raycluster["spec"]["upgradeStrategy"]["type"] = "NewCluster"  # RayService-only value
    assert not raycluster_validator.is_valid(raycluster)


# --- rendered objects: pod security, secrets, rollouts ---------------------------------------------------------


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_every_pod_passes_the_restricted_pod_security_profile(rendered, which: str) -> None:
    templates = pod_templates(rendered[which])
    assert len(templates) == 5  # driver, stream head + GPU group, Serve head + GPU group
    violations = {where: restricted_violations(t["spec"]) for where, t in templates.items()}
    assert {where: v for where, v in violations.items() if v} == {}


def test_the_pod_security_check_catches_each_restricted_rule(rendered) -> None:
    template = next(iter(pod_templates(rendered["default"]).values()))

    def violations(change: Any) -> list[str]:
        pod = copy.deepcopy(template["spec"])
        change(pod, pod["containers"][0].setdefault("securityContext", {}))
        return restricted_violations(pod)

    assert violations(lambda pod, sc: None) == []
    assert violations(lambda pod, sc: sc.pop("allowPrivilegeEscalation"))
    assert violations(lambda pod, sc: sc["capabilities"].update(drop=["NET_RAW"]))
    assert violations(lambda pod, sc: sc["capabilities"].update(add=["SYS_ADMIN"]))
    assert violations(lambda pod, sc: (sc.pop("runAsNonRoot"), pod["securityContext"].pop("runAsNonRoot")))
    assert violations(
        lambda pod, sc: (sc.pop("seccompProfile"), pod["securityContext"].pop("seccompProfile"))
    )
    assert violations(lambda pod, sc: sc.update(privileged=True))
    assert violations(lambda pod, sc: pod["securityContext"].update(runAsUser=0))
    assert violations(lambda pod, sc: pod.update(hostNetwork=True))
    assert violations(lambda pod, sc: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}))
    assert violations(
        lambda pod, sc: pod["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1})
    )


def test_a_hostpath_weights_volume_fails_the_restricted_profile(chart: helm.Chart) -> None:
    objects = _render(chart, {"modelWeights": {"source": "hostPath"}})
    failing = {w for w, t in pod_templates(objects).items() if restricted_violations(t["spec"])}
    assert failing and all(w.endswith("/gpu") for w in failing)


@pytest.mark.parametrize(
    ("section", "key", "route"),
    [
        ("kafka", "sasl_password", "secrets.kafkaSaslPassword"),
        ("kafka", "ssl_password", "secrets.kafkaSslPassword"),
        ("redis", "password", "secrets.redisPassword"),
        ("model", "hf_token", "secrets.hfToken"),
    ],
)
def test_a_secret_value_under_config_is_rejected(
    chart: helm.Chart, section: str, key: str, route: str
) -> None:
    bad = {"config": {section: {key: "hunter2"}}}
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(bad))
    assert f"/config/{section}/{key}" in str(err.value)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert route in json.dumps(schema)


def test_every_secret_setting_has_a_secret_route_into_every_pod(rendered) -> None:
    # Each SecretStr field of Settings has a chart value, a Secret key and an MW_* variable in every pod.
    env_names = {f"MW_{s.upper()}__{k.upper()}" for s, k in values_schema.secret_fields()}
    assert len(env_names) == 4
    for where, template in pod_templates(rendered["default"]).items():
        (container,) = template["spec"]["containers"]
        present = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert env_names <= present, where


def _checksums(objects: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    return {
        where: {k: v for k, v in t["metadata"]["annotations"].items() if k.startswith("checksum/")}
        for where, t in pod_templates(objects).items()
    }


def test_changing_a_secret_value_changes_every_pod_templates_checksum(chart: helm.Chart) -> None:
    before = _checksums(_render(chart, {"secrets": {"redisPassword": "one"}}))
    after = _checksums(_render(chart, {"secrets": {"redisPassword": "two"}}))
    assert set(before) == set(after) and len(before) == 5
    for where in before:
        assert before[where]["checksum/secret"] != after[where]["checksum/secret"], where
        assert before[where]["checksum/config"] == after[where]["checksum/config"], where


def test_changing_the_config_changes_every_pod_templates_checksum(chart: helm.Chart) -> None:
    before = _checksums(_render(chart, {}))
    after = _checksums(_render(chart, {"config": {"batching": {"max_size": 8}}}))
    for where in before:
        assert before[where]["checksum/config"] != after[where]["checksum/config"], where


def test_the_configmap_is_mounted_as_a_directory_not_via_subpath(rendered) -> None:
    for where, template in pod_templates(rendered["default"]).items():
        (container,) = template["spec"]["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "worker-config"]
        assert "subPath" not in mount, where
        mw_config = next(e["value"] for e in container["env"] if e["name"] == "MW_CONFIG")
        assert Path(mw_config).parent == Path(mount["mountPath"]), where


# --- rendered objects: Ray pods ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_ray_pods_request_what_they_limit_and_the_head_advertises_no_gpu(rendered, which: str) -> None:
    for where, template in pod_templates(rendered[which]).items():
        if where.startswith("Deployment/"):
            continue
        (container,) = template["spec"]["containers"]
        assert container["resources"]["requests"] == container["resources"]["limits"], where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp/ray"]], where
    for kind in ("RayCluster", "RayService"):
        spec = _one(rendered[which], kind)["spec"]
        head = spec.get("rayClusterConfig", spec)["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_ray_requests_that_differ_from_limits_fail_the_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="give only limits"):
        chart.render(
            {"head": {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "2"}}}},
            name=RELEASE,
            namespace=NAMESPACE,
        )


@pytest.mark.parametrize("which", ["default", "gpu"])
def test_gpu_worker_groups_request_their_gpus_and_placement_comes_from_values(rendered, which: str) -> None:
    chart_values = helm.Chart.load(CHART_DIR).merge_values(_values(which))
    for kind, group_values in (
        ("RayCluster", chart_values["gpuWorkers"]),
        ("RayService", {**chart_values["gpuWorkers"], **chart_values["serve"]["gpuWorkers"]}),
    ):
        group = _worker_group(_one(rendered[which], kind))
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        gpus = group_values["gpusPerPod"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert pod["nodeSelector"] == chart_values["gpuWorkers"]["nodeSelector"]
        assert pod["tolerations"] == chart_values["gpuWorkers"]["tolerations"]
        assert (group["replicas"], group["maxReplicas"]) == (
            group_values["replicas"],
            group_values["maxReplicas"],
        )
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["labelSelector"]["matchLabels"] == group["template"]["metadata"]["labels"]


def test_cpu_values_request_no_gpus(rendered) -> None:
    for kind in ("RayCluster", "RayService"):
        pod = _worker_group(_one(rendered["cpu"], kind))["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
        assert "nodeSelector" not in pod and "tolerations" not in pod
        assert pod["containers"][0]["image"].endswith("-cpu")


def test_gpu_capacity_shortfall_fails_the_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="GPU capacity"):
        chart.render({"stream": {"actors": 3}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match="GPU capacity"):
        chart.render({"config": {"serve": {"num_replicas": 2}}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match="GPU capacity"):
        chart.render(
            {"stream": {"autoscaling": {"enabled": True, "maxActors": 4}}}, name=RELEASE, namespace=NAMESPACE
        )


# --- stream and Serve deploy and fail independently ----------------------------------------------------------


def _stream_is_deployed(objects: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The driver Deployment, the RayCluster it connects to, and a config pointing at that cluster's head."""
    raycluster = _one(objects, "RayCluster")
    (deployment,) = objects["Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["run", "--ray"]
    settings = _config_from_configmap(objects, tmp_path)
    assert settings.ray.address == f"ray://{raycluster['metadata']['name']}-head-svc.{NAMESPACE}.svc:10001"


def test_serve_disabled_still_deploys_the_stream(chart: helm.Chart, tmp_path: Path) -> None:
    objects = _render(chart, {"serve": {"enabled": False}})
    assert "RayService" not in objects
    _stream_is_deployed(objects, tmp_path)
    assert len(pod_templates(objects)) == 3


def test_stream_only_values_deploy_the_stream_without_any_serve_object(
    chart: helm.Chart, tmp_path: Path
) -> None:
    objects = _render(chart, {"serve": {"enabled": False}, "config": {"serve": {"num_gpus": 0}}})
    _stream_is_deployed(objects, tmp_path)
    (policy,) = objects["NetworkPolicy"]
    assert all(8000 not in [p["port"] for p in rule.get("ports", [])] for rule in policy["spec"]["ingress"])
    assert [p["metadata"]["name"] for p in objects["PodDisruptionBudget"]] == [
        "mw-moderation-worker-stream-gpu"
    ]


def test_the_stream_never_connects_through_the_rayservice(rendered, tmp_path: Path) -> None:
    # A RayService's head service exists only while its Serve apps are healthy: the stream must use its own
    # RayCluster, whose pods are not the RayService's.
    for which, objects in rendered.items():
        _stream_is_deployed(objects, tmp_path)
        rayservice_name = _one(objects, "RayService")["metadata"]["name"]
        settings = _config_from_configmap(objects, tmp_path)
        assert f"//{rayservice_name}-head-svc" not in settings.ray.address, which


def test_serve_disabled_and_stream_disabled_render_only_the_other(chart: helm.Chart) -> None:
    serve_only = _render(chart, {"stream": {"enabled": False}})
    assert "RayCluster" not in serve_only and "Deployment" not in serve_only
    assert _one(serve_only, "RayService")


# --- rendered objects: the rest ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_serve_config_matches_the_repo_serve_config_shape(rendered, which: str) -> None:
    serve_config = yaml.safe_load(_one(rendered[which], "RayService")["spec"]["serveConfigV2"])
    repo_config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    (app,) = serve_config["applications"]
    (repo_app,) = repo_config["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == repo_app[key], key
    assert app["import_path"] == "worker.serve.app:build_app"
    assert set(app["args"]) == set(repo_app["args"]) == {"settings"}
    # The inline overrides are real Settings sections and values.
    merged = Settings(**app["args"]["settings"])
    assert (
        merged.serve.num_gpus
        == helm.Chart.load(CHART_DIR).merge_values(_values(which))["config"]["serve"]["num_gpus"]
    )


def test_serve_deployment_options_and_upgrade_strategies_come_from_values(chart: helm.Chart) -> None:
    options = {"name": "Moderation", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}
    objects = _render(chart, {"serve": {"deployments": [options], "upgradeStrategy": "None"},
                              "stream": {"upgradeStrategy": "None"}})  # fmt: skip
    rayservice = _one(objects, "RayService")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["deployments"] == [options]
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "None"}
    assert _one(objects, "RayCluster")["spec"]["upgradeStrategy"] == {"type": "None"}


def test_gcs_fault_tolerance_is_an_option_on_both_clusters(chart: helm.Chart) -> None:
    assert "gcsFaultToleranceOptions" not in _one(_render(chart, {}), "RayCluster")["spec"]
    objects = _render(
        chart,
        {
            "gcsFaultTolerance": {
                "enabled": True,
                "redisAddress": "redis:6379",
                "externalStorageNamespace": "mw",
            }
        },
    )
    for spec in (
        _one(objects, "RayCluster")["spec"],
        _one(objects, "RayService")["spec"]["rayClusterConfig"],
    ):
        options = spec["gcsFaultToleranceOptions"]
        assert options["redisAddress"] == "redis:6379"
        assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "gcs-redis-password"
    namespaces = {
        _one(objects, "RayCluster")["spec"]["gcsFaultToleranceOptions"]["externalStorageNamespace"],
        _one(objects, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"][
            "externalStorageNamespace"
        ],
    }
    assert len(namespaces) == 2  # two clusters never share GCS state


def test_autoscaling_enables_the_ray_autoscaler_and_the_drivers_lag_scaling(
    chart: helm.Chart, tmp_path: Path
) -> None:
    objects = _render(
        chart,
        {
            "gpuWorkers": {"maxReplicas": 3},
            "stream": {"autoscaling": {"enabled": True, "minActors": 1, "maxActors": 3, "lagPerActor": 500}},
        },
    )
    spec = _one(objects, "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert (
        restricted_violations(
            {
                "containers": [
                    {"name": "autoscaler", "securityContext": spec["autoscalerOptions"]["securityContext"]}
                ]
            }
        )
        == []
    )
    assert _worker_group(_one(objects, "RayCluster"))["maxReplicas"] == 3
    settings = _config_from_configmap(objects, tmp_path)
    assert (settings.ray.autoscale, settings.ray.min_workers, settings.ray.max_workers) == (True, 1, 3)
    assert settings.ray.lag_per_worker == 500
    assert "enableInTreeAutoscaling" not in _one(objects, "RayService")["spec"]["rayClusterConfig"]


def test_network_policy_keeps_ray_client_dashboard_and_gcs_ports_inside_the_release(rendered) -> None:
    for which, objects in rendered.items():
        (policy,) = objects["NetworkPolicy"]
        ingress = policy["spec"]["ingress"]
        own_pods = [r for r in ingress if "ports" not in r]
        assert own_pods == [
            {"from": [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]}
        ]
        open_ports = {p["port"] for r in ingress if "ports" in r for p in r["ports"]}
        assert open_ports == {8080, 9400, 8000}, which
        assert not open_ports & {10001, 8265, 6379}


def test_every_pod_uses_the_release_service_account_without_an_api_token(rendered) -> None:
    (account,) = rendered["default"]["ServiceAccount"]
    for where, template in pod_templates(rendered["default"]).items():
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], where
        assert template["spec"]["automountServiceAccountToken"] is False, where


def test_disruption_budgets_select_the_gpu_pods_of_each_cluster(rendered) -> None:
    budgets = rendered["default"]["PodDisruptionBudget"]
    assert len(budgets) == 2
    labels = [
        t["metadata"]["labels"] for w, t in pod_templates(rendered["default"]).items() if w.endswith("/gpu")
    ]
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        assert budget["spec"]["maxUnavailable"] == 1
        assert sum(selector.items() <= pod.items() for pod in labels) == 1


@pytest.mark.parametrize("which", list(VALUE_SETS))
def test_configmap_holds_a_config_that_load_settings_accepts(rendered, which: str, tmp_path: Path) -> None:
    settings = _config_from_configmap(rendered[which], tmp_path)
    raycluster_name = _one(rendered[which], "RayCluster")["metadata"]["name"]
    assert settings.ray.enabled
    assert settings.ray.address == f"ray://{raycluster_name}-head-svc.{NAMESPACE}.svc:10001"
    chart_values = helm.Chart.load(CHART_DIR).merge_values(_values(which))
    assert settings.ray.num_workers == chart_values["stream"]["actors"]
    assert settings.model.path.startswith(chart_values["modelWeights"]["mountPath"] + "/")


def test_every_mw_environment_variable_in_the_pods_is_a_settings_key(rendered) -> None:
    for which, objects in rendered.items():
        for where, template in pod_templates(objects).items():
            for container in template["spec"]["containers"]:
                names = [
                    e["name"]
                    for e in container["env"]
                    if e["name"].startswith("MW_") and e["name"] != "MW_CONFIG"
                ]
                assert names, (which, where)
                for name in names:
                    settings_field_for_env(name)


def test_secrets_are_created_from_values_or_taken_from_an_existing_secret(
    chart: helm.Chart, tmp_path: Path
) -> None:
    objects = _render(
        chart, {"secrets": {"redisPassword": "s3cret", "hfToken": "hf_x", "kafkaSslPassword": "keypass"}}
    )
    (secret,) = objects["Secret"]
    assert set(secret["data"]) == {"redis-password", "hf-token", "kafka-ssl-password"}

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
        volumes = _worker_group(_one(objects, "RayCluster"))["template"]["spec"]["volumes"]
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


# --- split pools ----------------------------------------------------------------------------------------------


def test_pools_render_one_stream_driver_each_and_the_pools_config(chart, tmp_path) -> None:
    values = yaml.safe_load((CHART_DIR / "examples" / "values-pools.yaml").read_text())
    chart.validate_schema(chart.merge_values(values))
    objects = _render(chart, values)
    drivers = {d["metadata"]["name"].rsplit("-", 1)[-1]: d for d in objects["Deployment"]}
    assert set(drivers) == {"text", "vision"}, "no co-located driver beside the pools"
    for pool, driver in drivers.items():
        env = {e["name"]: e.get("value") for e in driver["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MW_POOL"] == pool
    settings = _config_from_configmap(objects, tmp_path)
    assert settings.pools["text"].dead_letters and not settings.pools["vision"].dead_letters
    assert settings.pools["text"].num_workers == 2 and settings.pools["vision"].num_workers == 1
    assert list(settings.guard_models()) == ["text-guard", "vision"]
