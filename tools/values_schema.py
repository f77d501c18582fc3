"""Generate the Helm chart's ``values.schema.json``; its ``config`` part comes from ``worker.config.Settings``.

One source of truth: the worker's configuration keys, types and bounds are defined once, in
``worker/config.py``. The chart's ``config`` value becomes the worker's YAML file, so its schema is
``Settings.model_json_schema()`` (unknown keys rejected, like at start-up) — ``helm install`` then fails
on a misspelt key instead of a crash-looping pod. The chart's own values are described here.

Secrets never go through ``config`` (it becomes a ConfigMap): every ``SecretStr`` field of ``Settings`` is
replaced by a schema that rejects any value and names the ``secrets.*`` value to use instead.

Regenerate after changing either: ``python -m tools.values_schema`` (a test checks it is current).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, SecretStr

from worker.config import Settings

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "moderation-worker"
SCHEMA_PATH = CHART_DIR / "values.schema.json"

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}
_QUANTITY = {
    "anyOf": [{"type": "string", "pattern": r"^[0-9.]+([eE][0-9]+|[numkMGTPE]i?)?$"}, {"type": "number"}]
}
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
    },
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}


def _strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _placement() -> dict[str, Any]:
    return {
        "nodeSelector": {"type": "object", "additionalProperties": _STR},
        "tolerations": {"type": "array", "items": _OBJ},
        "affinity": _OBJ,
    }


# Secret config keys → the chart value that carries them (into a Secret, then an MW_* variable).
SECRET_ROUTES: dict[tuple[str, str], str] = {
    ("kafka", "sasl_password"): "secrets.kafkaSaslPassword",
    ("kafka", "ssl_password"): "secrets.kafkaSslPassword",
    ("redis", "password"): "secrets.redisPassword",
    ("model", "hf_token"): "secrets.hfToken",
}


def secret_fields() -> list[tuple[str, str]]:
    """``(section, key)`` of every ``SecretStr`` field of ``Settings`` (the keys ``config`` must not hold)."""
    found = []
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            continue
        for key, sub in model.model_fields.items():
            if SecretStr in get_args(sub.annotation) or sub.annotation is SecretStr:
                found.append((section, key))
    return found


def _gpu_group() -> dict[str, Any]:
    return {
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "gpusPerPod": {"type": "integer", "minimum": 0, "maximum": 16},
        "gpuResourceName": {"type": "string", "minLength": 1},
        "rayStartParams": _START_PARAMS,
        "resources": _RESOURCES,
        "shmSize": _QUANTITY,
        "topologySpread": _strict(
            {
                "enabled": _BOOL,
                "topologyKey": {"type": "string", "minLength": 1},
                "maxSkew": {"type": "integer", "minimum": 1},
                "whenUnsatisfiable": {"enum": ["DoNotSchedule", "ScheduleAnyway"]},
            }
        ),
        **_placement(),
    }


def settings_schema() -> dict[str, Any]:
    """``Settings``' JSON Schema with its ``$defs`` hoisted (the caller puts them at the document root).

    Secret fields accept no value at all (``"not": {}``); a secret field without a chart route is a bug.
    """
    schema = Settings.model_json_schema()
    schema.pop("title", None)
    defs = schema.get("$defs", {})
    for section, key in secret_fields():
        route = SECRET_ROUTES.get((section, key))
        if route is None:
            raise KeyError(f"config.{section}.{key} is a secret without a route in SECRET_ROUTES")
        ref = schema["properties"][section]
        def_name = ref.get("$ref", "").rsplit("/", 1)[-1] or ref["allOf"][0]["$ref"].rsplit("/", 1)[-1]
        defs[def_name]["properties"][key] = {
            "not": {},
            "description": f"secret: not allowed in config (a ConfigMap); set {route} or secrets.existingSecret",
        }
    return schema


def values_schema() -> dict[str, Any]:
    """The whole ``values.schema.json`` document (JSON Schema 2020-12)."""
    config = settings_schema()
    defs = config.pop("$defs", {})
    config["description"] = "The worker's config file (worker/config.py Settings); unknown keys are rejected."
    # The chart fills in ray.address / ray.num_workers, so every key stays optional; no `required` here.
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "moderation-worker Helm values",
        **_strict(
            {
                "nameOverride": _STR,
                "fullnameOverride": _STR,
                "global": _OBJ,
                "image": _strict(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": _STR,
                        "variant": {"enum": ["cpu", "cuda"]},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    },
                    ["repository"],
                ),
                "imagePullSecrets": {"type": "array", "items": _OBJ},
                "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+$"},
                "config": config,
                "secrets": _strict(
                    {
                        "existingSecret": _STR,
                        "kafkaSaslPassword": _STR,
                        "kafkaSslPassword": _STR,
                        "redisPassword": _STR,
                        "hfToken": _STR,
                        "gcsRedisPassword": _STR,
                    }
                ),
                "apiKeys": _strict(
                    {
                        "existingSecret": _STR,
                        "keys": {
                            "type": "object",
                            "description": "API key name -> key (or empty with existingSecret): MODERATION_API_KEY_<NAME>",
                            "propertyNames": {"pattern": "^[a-z0-9][a-z0-9-]*$"},
                            "additionalProperties": _STR,
                        },
                    }
                ),
                "kafkaTls": _strict(
                    {
                        "enabled": _BOOL,
                        "mutual": _BOOL,
                        "existingSecret": _STR,
                        "ca": _STR,
                        "cert": _STR,
                        "key": _STR,
                    }
                ),
                "modelWeights": _strict(
                    {
                        "mountPath": {"type": "string", "pattern": "^/"},
                        "source": {"enum": ["pvc", "hostPath", "none"]},
                        "pvc": _strict(
                            {
                                "existingClaim": _STR,
                                "size": _QUANTITY,
                                "storageClassName": _STR,
                                "accessModes": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "enum": [
                                            "ReadWriteOnce",
                                            "ReadOnlyMany",
                                            "ReadWriteMany",
                                            "ReadWriteOncePod",
                                        ]
                                    },
                                },
                            }
                        ),
                        "hostPath": _strict(
                            {
                                "path": {"type": "string", "pattern": "^/"},
                                "type": {"enum": ["", "Directory", "DirectoryOrCreate"]},
                            }
                        ),
                    },
                    ["mountPath", "source"],
                ),
                "head": _strict({"rayStartParams": _START_PARAMS, "resources": _RESOURCES, **_placement()}),
                "gpuWorkers": _strict(_gpu_group(), ["replicas", "gpusPerPod"]),
                "serve": _strict(
                    {
                        "enabled": _BOOL,
                        "applicationName": {"type": "string", "minLength": 1},
                        "routePrefix": {"type": "string", "pattern": "^/"},
                        "args": _OBJ,
                        "deployments": {
                            "type": "array",
                            "items": {"type": "object", "required": ["name"], "properties": {"name": _STR}},
                        },
                        "upgradeStrategy": {
                            "enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]
                        },
                        "gpuWorkers": _strict(_gpu_group()),
                    }
                ),
                "stream": _strict(
                    {
                        "enabled": _BOOL,
                        "actors": {"type": "integer", "minimum": 1},
                        "autoscaling": _strict(
                            {
                                "enabled": _BOOL,
                                "minActors": {"type": "integer", "minimum": 1},
                                "maxActors": {"type": "integer", "minimum": 1},
                                "lagPerActor": {"type": "integer", "minimum": 1},
                                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                            }
                        ),
                        "upgradeStrategy": {"enum": ["None", "Recreate"]},
                        "resources": _RESOURCES,
                        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 1},
                        "podAnnotations": {"type": "object", "additionalProperties": _STR},
                        **_placement(),
                    }
                ),
                "pools": {
                    "description": "split pools: one stream driver (its own consumer group and actors) per pool",
                    "type": "array",
                    "items": _strict(
                        {
                            "name": {
                                "type": "string",
                                "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                "maxLength": 30,
                            },
                            "models": {"type": "array", "items": _STR, "minItems": 1},
                            "deadLetters": _BOOL,
                            "actors": {"type": "integer", "minimum": 1},
                            "gpusPerActor": {"type": "number", "minimum": 0},
                        },
                        required=["name", "models", "actors"],
                    ),
                },
                "extraEnv": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "gcsFaultTolerance": _strict(
                    {"enabled": _BOOL, "redisAddress": _STR, "externalStorageNamespace": _STR}
                ),
                "serviceAccount": _strict(
                    {
                        "create": _BOOL,
                        "name": _STR,
                        "annotations": {"type": "object", "additionalProperties": _STR},
                        "automountServiceAccountToken": _BOOL,
                    }
                ),
                "podSecurityContext": _OBJ,
                "containerSecurityContext": _OBJ,
                "rayTmp": _strict({"sizeLimit": _QUANTITY}),
                "podDisruptionBudget": _strict(
                    {"enabled": _BOOL, "maxUnavailable": {"anyOf": [{"type": "integer", "minimum": 0}, _STR]}}
                ),
                "networkPolicy": _strict(
                    {
                        "enabled": _BOOL,
                        "metricsFrom": {"type": "array", "items": _OBJ},
                        "serveFrom": {"type": "array", "items": _OBJ},
                    }
                ),
                "metrics": _strict(
                    {
                        "serviceMonitor": _strict(
                            {
                                "enabled": _BOOL,
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "labels": {"type": "object", "additionalProperties": _STR},
                            }
                        )
                    }
                ),
                "grafanaDashboard": _strict(
                    {
                        "enabled": _BOOL,
                        "labels": {"type": "object", "additionalProperties": _STR},
                        "annotations": {"type": "object", "additionalProperties": _STR},
                    }
                ),
            }
        ),
        "$defs": defs,
    }


def render() -> str:
    """The schema document as the file holds it (indented JSON, trailing newline)."""
    return json.dumps(values_schema(), indent=2) + "\n"


def main() -> int:
    """Write ``values.schema.json`` next to the chart's ``values.yaml``."""
    SCHEMA_PATH.write_text(render())
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
