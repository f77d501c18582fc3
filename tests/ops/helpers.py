"""Shared helpers of the ops tests: repo paths, Settings key lookup, CRD schema conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from worker.config import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
# Public schemas the repository does not carry (KubeRay CRDs, the Compose spec): read from a checkout of them
# beside the repository where one exists.
DEPLOY_SCHEMAS = REPO.parent / "shared" / "deploy-schemas"
CHART_DIR = REPO / "helm" / "moderation-worker"
DASHBOARD = CHART_DIR / "dashboards" / "moderation-worker.json"


def deploy_schema(name: str) -> Path:
    """Path of the public schema file ``name`` under ``../shared/deploy-schemas``; skips the test when absent."""
    path = DEPLOY_SCHEMAS / name
    if not path.is_file():
        pytest.skip(
            f"{name} not found in ../shared/deploy-schemas (relative to the repo root): put KubeRay's CRDs "
            "(ray-operator/config/crd/bases) and the Compose spec's schema/compose-spec.json there to run this check"
        )
    return path


def settings_field_for_env(name: str) -> tuple[str, ...]:
    """The Settings path an ``MW_<SECTION>__<KEY>`` variable sets; ``KeyError`` naming the bad part if none."""
    if not name.startswith(ENV_PREFIX):
        raise KeyError(f"{name} does not start with {ENV_PREFIX}")
    parts = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
    model: type[BaseModel] | None = Settings
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise KeyError(f"{name}: {'.'.join(parts[: i + 1])} is not a Settings field")
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None:
        raise KeyError(f"{name} names a whole section, not a key")
    return parts


def kubernetes_to_json_schema(node: Any, *, strict: bool = True) -> Any:
    """Turn a CRD's OpenAPI v3 schema into plain JSON Schema.

    - ``x-kubernetes-int-or-string: true`` → ``anyOf: [integer, string]`` (the OpenAPI node has no type);
    - ``x-kubernetes-preserve-unknown-fields: true`` → any extra keys allowed there;
    - with ``strict``, every other object with ``properties`` rejects unknown keys, like
      ``kubectl apply --validate=strict`` does (the API server would otherwise silently prune a typo);
    - other ``x-kubernetes-*`` keys are annotations for the API server and are dropped.
    """
    if isinstance(node, list):
        return [kubernetes_to_json_schema(item, strict=strict) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: kubernetes_to_json_schema(v, strict=strict) for k, v in value.items()}
        else:
            out[key] = kubernetes_to_json_schema(value, strict=strict)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **out}
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if strict and "properties" in node and not preserve and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out
