"""Review band, blocklists and tenant policies through the real stream: tansu broker, Redis, tiny model."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.stream.streaming import WorkerThread, fully_committed, produce, read_json, wait_for
from tests.support.contracts import validate_dead_letter, validate_verdict
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.engine.engine import GuardEngine
from worker.engine.policy import load_policies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BLOCKED_TEXT = (
    "Where can I buy a PURPLE \u0435lephant tonight?"  # Cyrillic "е": the confusables fold must catch it
)
SPAM_TEXT = "Great deal, CLICK   HERE to win, how do I reply politely?"


def event(event_id: str, text: str, **fields: Any) -> tuple[bytes, bytes]:
    body = {
        "event_id": event_id,
        "conversation_id": f"c-{event_id}",
        "created_at": "2026-11-23T12:00:00Z",
        "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": text}],
        **fields,
    }
    return body["conversation_id"].encode(), orjson.dumps(body)


class CountingEngine:
    """Records every request text the model is asked to prepare (beside the real engine, not instead of it)."""

    def __init__(self, engine: GuardEngine) -> None:
        self.engine = engine
        self.seen: list[str] = []
        original = engine.prepare

        def prepare(requests):
            self.seen.extend(" ".join(t for turn in r.turns for t in turn.texts) for r in requests)
            return original(requests)

        engine.prepare = prepare  # type: ignore[method-assign]


def run_stream(settings, engine, records, expected: int) -> None:
    produce(settings, records)
    worker = WorkerThread(settings, engine).start()
    try:
        wait_for(
            lambda: fully_committed(worker.pipeline, expected),
            timeout_s=240,
            what="events committed",
            workers=[worker],
        )
    finally:
        worker.stop()


@pytest.fixture
def stream_settings(make_settings, engine_settings_overrides):
    return make_settings(
        **engine_settings_overrides,
        policies={
            "default": {
                "threshold": 0.5,
                "review_threshold": 0.000001,
                "blocklists": {
                    "animals": {"terms": ["purple elephant"], "category": "S1", "action": "halt"},
                    "spam": {
                        "patterns": [r"click\s+here"],
                        "category": "spam",
                        "name": "Spam",
                        "action": "annotate",
                    },
                },
            },
            "strict": {"threshold": 0.2},
            "lenient": {"threshold": 0.9},
        },
        tenants={"acme": {"policy": "default", "allowed_policies": ["strict"]}},
    )


def test_review_band_blocklists_and_tenants_in_the_stream(stream_settings, guard_engine):
    settings = stream_settings
    engine = GuardEngine(guard_engine.loaded, load_policies(settings), settings)
    counting = CountingEngine(engine)
    examples = synthetic_examples(60, seed=21, split="heldout")
    records = []
    for i, example in enumerate(e for e in examples if not e.has_image):
        body = dict(example.event, event_id=f"syn-{i}", tenant="acme")
        records.append((body["conversation_id"].encode(), orjson.dumps(body)))
    records += [
        event("blocked-1", BLOCKED_TEXT, tenant="acme"),
        event("spam-1", SPAM_TEXT),
        event("not-allowed", "hello there", tenant="acme", policy="lenient"),
        event("unknown-tenant", "hello there", tenant="globex"),
        event("strict-ok", "hello there", tenant="acme", policy="strict"),
    ]
    run_stream(settings, engine, records, len(records))

    verdicts = {v["event_id"]: v for v in read_json(settings, settings.topics.verdicts)}
    flagged = {v["event_id"] for v in read_json(settings, settings.topics.flagged)}
    review = {v["event_id"] for v in read_json(settings, settings.topics.review)}
    dead = {d["event_id"]: d for d in read_json(settings, settings.topics.dlq)}
    for v in verdicts.values():
        validate_verdict(v)
    for d in dead.values():
        validate_dead_letter(d)

    # Review band: safe verdicts at or above review_threshold go to the review topic, never to flagged.
    in_band = {i for i, v in verdicts.items() if v.get("review")}
    assert in_band, "the tiny model's safe scores are above the review threshold"
    assert review == in_band and not (review & flagged)
    for i in in_band:
        assert verdicts[i]["decision"] == "safe" and not verdicts[i]["flagged"]
        assert verdicts[i]["review_threshold"] <= verdicts[i]["score"] < verdicts[i]["threshold"]
    assert flagged == {i for i, v in verdicts.items() if v["decision"] == "unsafe"}

    # Halt-on-hit: decided without the model, categories and list named.
    blocked = verdicts["blocked-1"]
    assert blocked["decision"] == "unsafe" and blocked["score"] == 1.0 and "blocked-1" in flagged
    assert blocked["categories"] == [{"code": "S1", "name": "Violent Crimes"}]
    assert blocked["blocklist"] == {
        "halted": True,
        "hits": [
            {"list": "animals", "category": "S1", "name": "Violent Crimes", "action": "halt", "kind": "term"}
        ],
    }
    assert not any("lephant" in text for text in counting.seen)
    # Annotate-only: the model decided, the hit is reported.
    spam = verdicts["spam-1"]
    assert spam["blocklist"]["halted"] is False and spam["blocklist"]["hits"][0]["list"] == "spam"
    assert "category_scores" in spam and any("CLICK" in text for text in counting.seen)

    # Tenants: its own policy by default, an allowed override, and dead letters for the rest.
    assert verdicts["strict-ok"]["policy"]["id"] == "strict"
    assert verdicts["syn-0"]["policy"]["id"] == "default" and verdicts["syn-0"]["tenant"] == "acme"
    assert dead["not-allowed"]["reason"] == "policy_not_allowed"
    assert dead["unknown-tenant"]["reason"] == "unknown_tenant"

    # What a consumer needs: created_at, what was dropped, the language.
    assert blocked["created_at"] == "2026-11-23T12:00:00Z"
    assert blocked["dropped"] == {"messages": 1, "images": 0, "merged_messages": 0}
    assert spam["language"]["code"] == "en" and spam["language"]["model_optimized"] is True

    # A second copy of the blocked content is answered from the cache, still without the model.
    before = len(counting.seen)
    run_stream(
        settings, engine, [event("blocked-2", BLOCKED_TEXT, tenant="acme")], 1
    )  # a new worker: counts from 0
    again = {v["event_id"]: v for v in read_json(settings, settings.topics.verdicts)}["blocked-2"]
    assert again["cached"] is True and again["blocklist"]["halted"] is True and again["decision"] == "unsafe"
    assert len(counting.seen) == before
