"""The synthetic generator is deterministic, labelled by the toy policy, and keeps held-out data apart."""

from __future__ import annotations

import base64
import io
import itertools
from collections import Counter

import pytest
from PIL import Image

from worker.dev.tiny_model.synthetic import (
    GENERATOR_FINGERPRINT,
    GENERATOR_VERSION,
    IMAGE_MARKER_CODE,
    generator_fingerprint,
    synthetic_examples,
)

EXPECTED = {
    "weapon_request": ("unsafe", ("S9",), "prompt"),
    "threat": ("unsafe", ("S1",), "prompt"),
    "image_marker": ("unsafe", (IMAGE_MARKER_CODE,), "prompt"),
    "election_misinfo": ("unsafe", ("S13",), "response"),
    "weapon_steps": ("unsafe", ("S9",), "response"),
    "harmless_build": ("safe", (), "prompt"),
    "venting": ("safe", (), "prompt"),
    "chat_prompt": ("safe", (), "prompt"),
    "image_plain": ("safe", (), "prompt"),
    "voting_fact": ("safe", (), "response"),
    "refusal": ("safe", (), "response"),
    "chat_reply": ("safe", (), "response"),
}


def texts_of(event: dict) -> tuple[str, ...]:
    out = []
    for message in event["messages"]:
        content = message["content"]
        out += [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
    return tuple(out)


def test_same_arguments_give_identical_events() -> None:
    assert synthetic_examples(60, seed=3, split="train") == synthetic_examples(60, seed=3, split="train")
    assert synthetic_examples(60, seed=3, split="train") != synthetic_examples(60, seed=4, split="train")


def test_every_family_is_labelled_by_the_toy_policy() -> None:
    examples = synthetic_examples(500, seed=1, split="train")
    assert set(Counter(e.kind for e in examples)) == set(EXPECTED)
    for example in examples:
        decision, codes, task = EXPECTED[example.kind]
        assert (example.decision, example.codes, example.task) == (decision, codes, task)
        assert example.has_image == example.kind.startswith("image_")


def test_events_have_the_openai_chat_shape() -> None:
    for example in synthetic_examples(200, seed=2, split="heldout"):
        event = example.event
        assert event["event_id"].startswith("syn-heldout-2-") and event["conversation_id"]
        roles = [m["role"] for m in event["messages"]]
        assert roles[0] == "user" and all(a != b for a, b in itertools.pairwise(roles))
        urls = [
            p["image_url"]["url"]
            for m in event["messages"]
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image_url"
        ]
        assert len(urls) == (1 if example.has_image else 0)
        for url in urls:
            assert url.startswith("data:image/png;base64,")
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert image.format == "PNG" and image.mode == "RGB"


def test_set_includes_multi_turn_and_whitespace_variants() -> None:
    examples = synthetic_examples(300, seed=5, split="train")
    assert any(len(e.event["messages"]) >= 3 for e in examples)
    assert any(text != text.strip() for e in examples for text in texts_of(e.event))
    assert any(isinstance(m["content"], list) for e in examples for m in e.event["messages"])


def test_heldout_conversations_never_appear_in_training() -> None:
    train = synthetic_examples(2000, seed=1234, split="train")
    heldout = synthetic_examples(400, seed=99, split="heldout")

    def core(example) -> tuple:
        # The judged exchange (last one or two messages), whitespace-normalized; images by their data URL.
        messages = (
            example.event["messages"][-2:] if example.task == "response" else example.event["messages"][-1:]
        )
        return tuple(
            (m["role"], m["content"].strip())
            if isinstance(m["content"], str)
            else (
                m["role"],
                tuple(sorted(str(p.get("text", p.get("image_url"))).strip() for p in m["content"])),
            )
            for m in messages
        )

    assert not {core(e) for e in heldout} & {core(e) for e in train}


def test_generator_output_matches_its_declared_version() -> None:
    # Cached checkpoints are keyed by GENERATOR_VERSION: changed output under the same version would reuse
    # a checkpoint trained (and tokenized) on different data.
    assert generator_fingerprint() == GENERATOR_FINGERPRINT, (
        f"synthetic examples changed: bump GENERATOR_VERSION (now {GENERATOR_VERSION}) and set "
        f"GENERATOR_FINGERPRINT = {generator_fingerprint()!r}"
    )


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        synthetic_examples(1, seed=0, split="test")
