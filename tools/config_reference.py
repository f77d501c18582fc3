"""Generate docs/config-reference.md from the Settings model (one source of truth for every setting)."""

from __future__ import annotations

import functools
import json
import operator
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from worker.config import ENV_PREFIX, Settings

HEADER = """# Configuration reference

Generated from `worker/config.py` by `python -m tools.config_reference` (a test fails when it is stale).
Every key can be set in the YAML file (`--config FILE` or `$MW_CONFIG`) or by an environment variable
`MW_<SECTION>__<KEY>` (mappings as JSON; lists as JSON or comma-separated, e.g.
`MW_KAFKA__BOOTSTRAP_SERVERS=kafka-1:9092,kafka-2:9092`). Environment variables win over the file. Unknown keys
(also a misspelt section in a variable name) and bad values stop the worker at start with one line naming the
key, exit status 2. `moderation-worker config` prints the effective configuration with secrets masked.
"""


def _default(value: Any) -> str:
    """The default as JSON (models inside lists and mappings too, never a Python repr)."""
    text = json.dumps(to_jsonable_python(value, fallback=str))
    return f"`{text}`"


def _desc(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _strip_annotated(annotation: Any) -> Any:
    """``Annotated[T, validators…]`` → ``T``, also inside unions and generics (validators are not types)."""
    if get_origin(annotation) is Annotated:
        return _strip_annotated(get_args(annotation)[0])
    args = get_args(annotation)
    if args and get_origin(annotation) in (Union, UnionType):
        return functools.reduce(operator.or_, (_strip_annotated(a) for a in args))
    return annotation


def _type(annotation: Any) -> str:
    annotation = _strip_annotated(annotation)
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("pydantic.types.", "").replace("|", "\\|")


def render() -> str:
    """The whole reference as Markdown."""
    lines = [HEADER]
    top = Settings.model_fields
    scalars = [
        (n, f)
        for n, f in top.items()
        if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))
    ]
    for name, field in top.items():
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            continue
        lines.append(f"\n## `{name}`\n\n{(ann.__doc__ or '').strip()}\n")
        lines.append("| key | type | default | env | description |")
        lines.append("| --- | --- | --- | --- | --- |")
        for key, f in ann.model_fields.items():
            env = f"{ENV_PREFIX}{name.upper()}__{key.upper()}"
            lines.append(
                f"| `{name}.{key}` | {_type(f.annotation)} | {_default(f.default)} | `{env}` | {_desc(f.description)} |"
            )
    lines.append("\n## Top-level keys\n")
    lines.append("| key | type | default | env | description |")
    lines.append("| --- | --- | --- | --- | --- |")
    for name, f in scalars:
        desc = _desc(
            {
                "default_policy": "policy id used when an event names none",
                "policies": "policies by id; each has `categories`, `names`, `threshold` (see the `policies.<id>` table)",
            }.get(name, f.description)
        )
        lines.append(
            f"| `{name}` | {_type(f.annotation)} | {_default(f.default)} | `{ENV_PREFIX}{name.upper()}` | {desc} |"
        )
    from worker.config import PolicySettings

    lines.append("\n## `policies.<id>`\n\n" + (PolicySettings.__doc__ or "").strip() + "\n")
    lines.append("| key | type | default | description |")
    lines.append("| --- | --- | --- | --- |")
    for key, f in PolicySettings.model_fields.items():
        lines.append(f"| `{key}` | {_type(f.annotation)} | {_default(f.default)} | {_desc(f.description)} |")
    return "\n".join(lines) + "\n"


REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

if __name__ == "__main__":
    REFERENCE_PATH.write_text(render())
    print(f"wrote {REFERENCE_PATH}")
