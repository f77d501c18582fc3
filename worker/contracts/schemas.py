"""The JSON Schemas in ``schemas/`` as compiled validators: the one source of truth for the contracts.

Producers and consumers read the schema files; the worker validates against the same files (never a
hand-kept copy). Each schema is a file ``<name>.v<major>.json``; ``validator(name)`` compiles the highest
major version once (jsonschema-rs, draft 2020-12, with ``format`` asserted) and caches it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

import worker

# worker/schemas is a symlink to the repository's schemas/ (the one copy); a wheel carries its files.
SCHEMAS_DIR: Path = (Path(worker.__file__).parent / "schemas").resolve()

CHAT_EVENT = "chat_event"
VERDICT = "verdict"
DEAD_LETTER = "dead_letter"

_VERSIONED_FILE = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<major>[0-9]+)\.json$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_MAX_KEY_CHARS_IN_PATH = 64


@cache
def schema_file(name: str) -> Path:
    """The file of the newest major version of schema ``name`` (e.g. ``schemas/verdict.v1.json``)."""
    found = [
        (int(m["major"]), p)
        for p in SCHEMAS_DIR.glob(f"{name}.v*.json")
        if (m := _VERSIONED_FILE.match(p.name)) and m["name"] == name
    ]
    if not found:
        raise FileNotFoundError(f"no schema named {name!r} in {SCHEMAS_DIR} (expected {name}.v<N>.json)")
    return max(found)[1]


def schema_version(name: str) -> int:
    """The major version of schema ``name``: the ``N`` of its file name ``<name>.vN.json``."""
    match = _VERSIONED_FILE.match(schema_file(name).name)
    assert match is not None  # schema_file only returns matching names
    return int(match["major"])


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema document ``name`` (cached; treat as read-only)."""
    return orjson.loads(schema_file(name).read_bytes())


@cache
def validator(name: str) -> jsonschema_rs.Validator:
    """The compiled, cached jsonschema-rs validator for schema ``name`` (``format`` keywords asserted)."""
    return jsonschema_rs.validator_for(load_schema(name), validate_formats=True)


@cache
def validator_beside(name: str, accepted: str) -> jsonschema_rs.Validator:
    """``validator(name)`` with top-level property ``accepted`` taken as it is (any value): the rest of a document
    whose ``accepted`` part is known to be valid already (the schema has no rule across its properties)."""
    schema = {**load_schema(name)}
    schema["properties"] = {**schema["properties"], accepted: True}
    return jsonschema_rs.validator_for(schema, validate_formats=True)


def field_path(instance_path: Iterable[str | int]) -> str:
    """A JSON instance path as producers read it: ``["messages", 2, "content"]`` -> ``messages[2].content``.

    Keys that are not identifiers are quoted (``metadata["a.b"]``) and long keys are cut, because keys of a
    rejected record are untrusted and end up in logs and dead letters.
    """
    out: list[str] = []
    for part in instance_path:
        if isinstance(part, int):
            out.append(f"[{part}]")
            continue
        key = part if len(part) <= _MAX_KEY_CHARS_IN_PATH else part[:_MAX_KEY_CHARS_IN_PATH] + "..."
        if _IDENTIFIER.match(key):
            out.append(f".{key}" if out else key)
        else:
            out.append("[" + orjson.dumps(key).decode() + "]")
    return "".join(out)


# Major versions, e.g. for the ``schema-version`` header of published records.
event_schema_version: int = schema_version(CHAT_EVENT)
verdict_schema_version: int = schema_version(VERDICT)
dead_letter_schema_version: int = schema_version(DEAD_LETTER)
