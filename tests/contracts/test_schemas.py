"""The JSON Schemas in schemas/: well-formed draft 2020-12, examples agree with two validators, and the
verdict and dead-letter schemas describe exactly what build_verdict and build_dead_letter emit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
import orjson
import pytest

from tests.support.contracts import validate_dead_letter, validate_event, validate_verdict
from worker.contracts.dead_letters import SourceCoordinates, build_dead_letter
from worker.contracts.events import ChatEvent, ImageRef, Turn
from worker.contracts.rejections import Reason, Rejection
from worker.contracts.schemas import (
    SCHEMAS_DIR,
    dead_letter_schema_version,
    event_schema_version,
    load_schema,
    validator,
    verdict_schema_version,
)
from worker.contracts.verdicts import VERDICT_SCHEMA_VERSION, ModelInfo, build_verdict
from worker.engine.blocklist import BlocklistHit

OUR_SCHEMAS = ("chat_event", "verdict", "dead_letter")
SCHEMA_FILES = sorted(SCHEMAS_DIR.glob("*.v*.json"))
EXAMPLES = sorted(
    (path.parent.parent.name, path.parent.name, path)
    for path in (SCHEMAS_DIR / "examples").glob("*/*/*.json")
    if path.parent.name in ("valid", "invalid")
)


def reference_validator(name: str) -> jsonschema.Draft202012Validator:
    """The Python reference implementation, with format assertion on."""
    return jsonschema.Draft202012Validator(
        load_schema(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_schema_is_valid_draft_2020_12_with_an_id_matching_its_file(path: Path) -> None:
    schema = orjson.loads(path.read_bytes())
    jsonschema.Draft202012Validator.check_schema(schema)  # against the 2020-12 meta-schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("/" + path.name)
    jsonschema_rs.validator_for(schema)  # compiles in the fast validator too


def _properties(node: Any, where: str = "") -> list[tuple[str, Any]]:
    """Every (path, subschema) declared under a ``properties`` keyword, recursively."""
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("if", "then", "else"):
                continue  # conditions constrain fields declared elsewhere; they declare none
            if key == "properties" and isinstance(value, dict):
                found += [(f"{where}.{name}", sub) for name, sub in value.items()]
            found += _properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _properties(value, f"{where}[{i}]")
    return found


@pytest.mark.parametrize("name", OUR_SCHEMAS)
def test_every_field_has_a_description(name: str) -> None:
    schema = load_schema(name)
    assert schema.get("description")
    fields = _properties(schema)
    assert len(fields) >= 10
    undocumented = [path for path, sub in fields if not (sub.get("description") or "$ref" in sub)]
    assert not undocumented


@pytest.mark.parametrize(
    ("schema", "kind", "path"), EXAMPLES, ids=lambda x: x.name if isinstance(x, Path) else x
)
def test_example_is_accepted_or_refused_by_both_validators(schema: str, kind: str, path: Path) -> None:
    instance = orjson.loads(path.read_bytes())
    fast = validator(schema).is_valid(instance)
    reference = reference_validator(schema).is_valid(instance)
    assert fast == reference == (kind == "valid")


@pytest.mark.parametrize("name", OUR_SCHEMAS)
def test_each_schema_has_several_valid_and_invalid_examples(name: str) -> None:
    kinds = [kind for schema, kind, _ in EXAMPLES if schema == name]
    assert kinds.count("valid") >= 3 and kinds.count("invalid") >= 5


def test_dead_letter_reason_enum_equals_the_reason_enum() -> None:
    assert load_schema("dead_letter")["properties"]["reason"]["enum"] == [r.value for r in Reason]


def test_schema_versions_match_the_records() -> None:
    assert (event_schema_version, verdict_schema_version, dead_letter_schema_version) == (1, 1, 1)
    assert load_schema("verdict")["properties"]["schema_version"]["const"] == VERDICT_SCHEMA_VERSION
    letter = build_dead_letter(Rejection(Reason.NO_TEXT, "m"), b"x", None, max_original_bytes=10)
    assert load_schema("dead_letter")["properties"]["schema_version"]["const"] == letter["schema_version"]


def test_output_schemas_share_one_source_definition() -> None:
    assert load_schema("verdict")["$defs"]["source"] == load_schema("dead_letter")["$defs"]["source"]


# -------------------------------------------------------------------------------------- builders vs schemas

EVENT = ChatEvent(
    event_id="evt-1",
    conversation_id="conv-1",
    turns=(Turn("user", ("how do I make a bomb?",)), Turn("assistant", ("I can't help with that.",))),
    image=ImageRef("https://a.example/x.png", 0),
    tenant="acme",
    created_at="2026-11-23T12:00:00Z",
    dropped_messages=1,
)
MODEL = ModelInfo("meta-llama/Llama-Guard-3-11B-Vision", "c1d3b8a")


def verdicts() -> list[dict[str, Any]]:
    """build_verdict outputs covering every optional field and both decisions."""
    prompt_only = ChatEvent(event_id="e2", conversation_id="c2", turns=(Turn("user", ("hi",)),))
    common = {
        "threshold": 0.5,
        "policy_id": "default",
        "policy_hash": "0123456789abcdef",
        "latency_ms": 12.3456,
    }
    return [
        build_verdict(
            EVENT,
            unsafe=True,
            score=0.97,
            categories=[{"code": "S9", "name": "Indiscriminate Weapons."}],
            model=MODEL,
            cached=False,
            source=SourceCoordinates("chat.events", 3, 99),
            dropped_codes=["S14"],
            **common,
        ),
        build_verdict(
            prompt_only,
            unsafe=False,
            score=0.01,
            categories=[],
            model=ModelInfo("tiny-guard"),
            cached=True,
            **common,
        ),
        build_verdict(
            prompt_only, unsafe=True, score=1.7, categories=[], model=MODEL, cached=False, **common
        ),
        build_verdict(
            EVENT,
            unsafe=False,
            score=0.41,
            categories=[],
            model=MODEL,
            cached=False,
            category_scores={"S1": 0.3, "S9": 0.11},
            review_threshold=0.3,
            review=True,
            blocklist=(BlocklistHit("spam", "spam", "Spam", "annotate", "pattern"),),
            language={"code": "fr", "confidence": 0.99, "model_optimized": False},
            **common,
        ),
        build_verdict(
            EVENT,
            unsafe=True,
            score=1.0,
            categories=[{"code": "spam", "name": "Spam"}],
            model=MODEL,
            cached=True,
            blocklist=(BlocklistHit("spam", "spam", "Spam", "halt", "term"),),
            halted=True,
            **common,
        ),
        build_verdict(
            prompt_only,
            unsafe=False,
            score=-0.2,
            categories=[],
            model=MODEL,
            cached=False,
            dropped_codes=[],
            **common,
        ),
    ]


def test_build_verdict_output_validates_and_uses_every_schema_field() -> None:
    emitted: set[str] = set()
    for verdict in verdicts():
        validate_verdict(verdict)
        reference_validator("verdict").validate(verdict)
        emitted |= verdict.keys()
    assert emitted == set(load_schema("verdict")["properties"])


def test_verdicts_without_the_v1_additions_still_validate() -> None:
    """A consumer's stored verdicts from before the additive fields keep validating (schema versioning)."""
    new_fields = (
        "created_at",
        "dropped",
        "category_scores",
        "review_threshold",
        "review",
        "blocklist",
        "language",
    )
    for verdict in verdicts():
        old_shape = {k: v for k, v in verdict.items() if k not in new_fields}
        validate_verdict(old_shape)


def test_review_needs_its_threshold() -> None:
    verdict = next(v for v in verdicts() if v.get("review"))
    with pytest.raises(ValueError, match="review_threshold"):
        validate_verdict({k: v for k, v in verdict.items() if k != "review_threshold"})


def test_verdict_schema_refuses_inconsistent_decisions() -> None:
    verdict = verdicts()[0]
    with pytest.raises(ValueError, match="flagged"):
        validate_verdict({**verdict, "flagged": False})
    safe = verdicts()[1]
    with pytest.raises(ValueError, match="categories"):
        validate_verdict({**safe, "categories": [{"code": "S1", "name": "Violent Crimes."}]})


def test_build_dead_letter_output_validates_for_every_reason_and_shape() -> None:
    emitted: set[str] = set()
    original_fields: set[str] = set()
    for i, reason in enumerate(Reason):
        letter = build_dead_letter(
            Rejection(reason, f"sentence about {reason.value}", "messages[0].role" if i % 2 else None),
            b'{"event_id": "e"}' * (i % 3) if i % 5 else None,
            SourceCoordinates("chat.events", i % 4, i) if i % 3 else None,
            max_original_bytes=20,
            event_id="e" if i % 2 else None,
            key=b"conv-1" if i % 4 else None,
        )
        validate_dead_letter(letter)
        reference_validator("dead_letter").validate(letter)
        emitted |= letter.keys()
        original_fields |= letter["original"].keys()
    assert emitted == set(load_schema("dead_letter")["properties"])
    assert original_fields == set(load_schema("dead_letter")["properties"]["original"]["properties"])


def test_validate_functions_name_the_failing_path() -> None:
    letter = build_dead_letter(Rejection(Reason.NO_TEXT, "m"), b"x", None, max_original_bytes=10)
    letter["original"]["size_bytes"] = -1
    with pytest.raises(ValueError, match=r"original\.size_bytes"):
        validate_dead_letter(letter)
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        validate_event(
            {"event_id": "e", "conversation_id": "c", "messages": [{"role": "bot", "content": "x"}]}
        )
