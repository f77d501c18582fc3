"""Output records: a verdict or a dead letter as the topics, key, value and headers the publisher sends.

A verdict goes to the verdicts topic (unless ``topics.publish_all_verdicts`` is off), an unsafe one also to
the flagged topic, one in a policy's human-review band (``review: true``, decision still safe) to the review
topic instead; a dead letter goes to the DLQ. Records are keyed by ``conversation_id`` (a conversation keeps
its order within a partition; a dead letter keeps the original record's key), carry headers (event_id,
schema, policy, model; a dead letter's reason) and are orjson-encoded.

Encoding is plain Python with no Kafka client: the loop thread encodes what it answers itself, and the
intake processes (``worker.stream.intake_pool``) encode and publish the cache hits they answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from worker.config import TopicSettings
from worker.contracts.dead_letters import utc_now_rfc3339

if TYPE_CHECKING:
    from worker.contracts.dead_letters import SourceCoordinates
    from worker.contracts.events import ChatEvent
    from worker.contracts.verdicts import VerdictTemplate
    from worker.moderation.moderator import Answer, Keyed, Moderator

VERDICT_SCHEMA = b"verdict.v1"
DEAD_LETTER_SCHEMA = b"dead_letter.v1"

Header = tuple[str, bytes]
FIXED_MAX = 1024  # verdict templates whose topics and headers an encoder keeps (cleared when full)


class OutputRecord(NamedTuple):
    """What one answer publishes: the same key, value and headers on each of ``topics`` (none: nothing to send).

    A named tuple: built per published answer, and cheaper to build than a slotted dataclass.
    """

    topics: tuple[str, ...]
    key: bytes | None
    value: bytes
    headers: list[Header]
    event_id: str | None


class VerdictFacts(NamedTuple):
    """What the stream counts about a verdict it publishes (metrics and counters), without re-reading it."""

    decision: str
    codes: tuple[str, ...]
    cached: bool
    model: str
    created_at: str | None


def verdict_topics(verdict: dict[str, Any], topics: TopicSettings) -> tuple[str, ...]:
    """Where ``verdict`` goes (see the module docstring)."""
    destinations: tuple[str, ...] = (topics.verdicts,) if topics.publish_all_verdicts else ()
    if verdict["flagged"]:
        return (*destinations, topics.flagged)
    if verdict.get("review"):
        return (*destinations, topics.review)
    return destinations


class Encoder:
    """Encodes verdicts and dead letters as output records (header values cached: they repeat per policy)."""

    def __init__(self, topics: TopicSettings) -> None:
        self._topics = topics
        self._header_bytes: dict[tuple[str, str, str | None], bytes] = {}
        # Per verdict template: (the template, its topics, its policy and model header values).
        self._fixed: dict[int, tuple[VerdictTemplate, tuple[str, ...], bytes, bytes]] = {}

    def _header(self, template: str, name: str, version: str | None) -> bytes:
        """``template`` filled with ``name`` and ``version``, encoded once per distinct value."""
        key = (template, name, version)
        value = self._header_bytes.get(key)
        if value is None:
            value = self._header_bytes[key] = template.format(name, version).encode()
        return value

    def _policy_and_model(self, verdict: dict[str, Any]) -> tuple[bytes, bytes]:
        """The ``policy`` and ``model`` header values of ``verdict`` (or of a template's record)."""
        policy, model = verdict["policy"], verdict["model"]
        return (
            self._header("{}:{}", policy["id"], policy["hash"]),
            self._header("{}@{}", model["id"], model["revision"] or ""),
        )

    def verdict(self, verdict: dict[str, Any]) -> OutputRecord:
        """The output record of ``verdict`` (``schemas/verdict.v1.json``)."""
        event_id = verdict["event_id"]
        return OutputRecord(
            verdict_topics(verdict, self._topics),
            verdict["conversation_id"].encode(),
            orjson.dumps(verdict),
            _verdict_headers(event_id, *self._policy_and_model(verdict)),
            event_id,
        )

    def templated(
        self,
        template: VerdictTemplate,
        event: ChatEvent,
        *,
        latency_ms: float,
        decided_at: bytes,
        source: SourceCoordinates | None,
    ) -> OutputRecord:
        """The output record of ``template`` rendered for ``event``: what ``verdict`` gives for the same verdict.

        ``decided_at`` is the encoded decision time (``orjson.dumps(utc_now_rfc3339())``): a caller that
        renders many verdicts at once encodes it once.
        """
        fixed = self._fixed.get(id(template))
        if fixed is None or fixed[0] is not template:
            if len(self._fixed) >= FIXED_MAX:
                self._fixed.clear()
            fixed = self._fixed[id(template)] = (
                template,
                verdict_topics(template.record, self._topics),
                *self._policy_and_model(template.record),
            )
        event_id = event.event_id
        return OutputRecord(
            fixed[1],
            event.conversation_id.encode(),
            template.render(event, latency_ms, decided_at, source),
            _verdict_headers(event_id, fixed[2], fixed[3]),
            event_id,
        )

    def dead_letter(self, dead_letter: dict[str, Any], key: bytes | None) -> OutputRecord:
        """The output record of ``dead_letter`` (``schemas/dead_letter.v1.json``), keyed like the original."""
        headers: list[Header] = [("schema", DEAD_LETTER_SCHEMA), ("reason", dead_letter["reason"].encode())]
        event_id = dead_letter.get("event_id")
        if event_id is not None:
            headers.insert(0, ("event_id", event_id.encode()))
        return OutputRecord((self._topics.dlq,), key, orjson.dumps(dead_letter), headers, event_id)


def _verdict_headers(event_id: str, policy: bytes, model: bytes) -> list[Header]:
    return [("event_id", event_id.encode()), ("schema", VERDICT_SCHEMA), ("policy", policy), ("model", model)]


def answer_output(
    moderator: Moderator,
    encoder: Encoder,
    keyed: Keyed,
    answer: Answer,
    *,
    latency_ms: float,
    source: SourceCoordinates | None,
    decided_at: bytes | None = None,
) -> tuple[OutputRecord, VerdictFacts, bool]:
    """The output record of ``keyed``'s verdict, what is counted about it, and whether it is in the review band.

    A cache hit is rendered from its compiled verdict (``Moderator.verdict_template``; ``decided_at``: the
    encoded decision time, for a caller that renders many at once); any other answer is built and encoded.
    Counts nothing: the caller counts the verdict, its blocklist hits and the review band (``count_verdict``).
    """
    model = keyed.routed.model
    template = moderator.verdict_template(keyed, answer, source=source is not None)
    if template is not None:
        event = keyed.routed.event
        output = encoder.templated(
            template,
            event,
            latency_ms=latency_ms,
            decided_at=decided_at if decided_at is not None else orjson.dumps(utc_now_rfc3339()),
            source=source,
        )
        facts = VerdictFacts(template.decision, template.codes, template.cached, model, event.created_at)
        return output, facts, template.review
    verdict = moderator.verdict(keyed, answer, latency_ms=latency_ms, source=source, count=False)
    return encoder.verdict(verdict), verdict_facts(verdict, model), bool(verdict.get("review"))


def verdict_facts(verdict: dict[str, Any], model: str) -> VerdictFacts:
    """The counted facts of ``verdict``, judged by the configured model ``model``."""
    return VerdictFacts(
        verdict["decision"],
        tuple(c["code"] for c in verdict["categories"]),
        verdict["cached"],
        model,
        verdict.get("created_at"),
    )
