"""The moderation flow's steps on fake engines and a dict cache: route, key, answers, classify, verdict.

Fast logic tests (no server, no model). The same steps run against Kafka, Redis and the tiny checkpoints in
tests/stream, tests/serve and tests/reliability.
"""

from __future__ import annotations

import base64
import io
import itertools

import hypothesis
import orjson
import pytest
from hypothesis import strategies as st
from PIL import Image

from tests.support.contracts import validate_verdict
from tests.support.fake_engine import DictCache, FakeEngine, fake_registry
from worker.config import Settings
from worker.contracts import verdicts
from worker.contracts.dead_letters import SourceCoordinates
from worker.contracts.decode import decode_event
from worker.contracts.rejections import Reason, Rejection
from worker.engine.types import EngineError, ErrorKind, GuardResult
from worker.moderation.moderator import ELSEWHERE, Answer, Keyed, Moderator, Routed, engine_error_rejection
from worker.stream.records import Encoder


def png_data_url(color: tuple[int, int, int] = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def event(text: str, *, image: str | None = None, policy: str | None = None, i: int = 0) -> dict:
    content: object = text
    if image is not None:
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
    record = {
        "event_id": f"e-{i}",
        "conversation_id": "c-1",
        "messages": [{"role": "user", "content": content}],
    }
    if policy is not None:
        record["policy"] = policy
    return record


def decoded(settings: Settings, record: dict):
    result = decode_event(orjson.dumps(record), settings)
    assert not isinstance(result, Rejection), result
    return result


@pytest.fixture
def settings() -> Settings:
    return Settings(
        policies={
            "default": {},
            "strict": {
                "threshold": 0.3,
                "blocklists": {"slurs": {"terms": ["forbiddenword"], "category": "S10"}},
            },
        }
    )


@pytest.fixture
def moderator(settings: Settings) -> Moderator:
    return Moderator(fake_registry(settings), settings)


def keyed_of(moderator: Moderator, settings: Settings, record: dict) -> Keyed:
    routed = moderator.route(decoded(settings, record))
    assert isinstance(routed, Routed), routed
    keyed = moderator.load_images(routed)
    assert isinstance(keyed, Keyed), keyed
    return keyed


def test_route_picks_policy_and_model(settings, moderator) -> None:
    routed = moderator.route(decoded(settings, event("hello", policy="strict")))
    assert isinstance(routed, Routed) and routed.policy.id == "strict" and routed.model == "default"
    assert not routed.halts and not moderator.route(decoded(settings, event("hello"))).hits


def test_route_applies_tenant_boundaries_first(settings) -> None:
    settings = Settings.model_validate({**settings.model_dump(), "tenants": {"acme": {"policy": "strict"}}})
    moderator = Moderator(fake_registry(settings), settings)
    own = moderator.route(decoded(settings, {**event("hi"), "tenant": "acme"}))
    assert isinstance(own, Routed) and own.policy.id == "strict", "the tenant's own policy"
    stranger = moderator.route(decoded(settings, {**event("hi"), "tenant": "globex"}))
    assert isinstance(stranger, Rejection) and stranger.reason is Reason.UNKNOWN_TENANT
    other = moderator.route(decoded(settings, {**event("hi", policy="default"), "tenant": "acme"}))
    assert isinstance(other, Rejection) and other.reason is Reason.POLICY_NOT_ALLOWED


def test_remembered_routes_still_match_each_events_blocklists_and_rejections(settings) -> None:
    settings = Settings.model_validate({**settings.model_dump(), "tenants": {"acme": {"policy": "strict"}}})
    moderator = Moderator(fake_registry(settings), settings)
    for _ in range(2):  # the second round is answered from the remembered choices
        clean = moderator.route(decoded(settings, {**event("hi"), "tenant": "acme"}))
        listed = moderator.route(decoded(settings, {**event("a forbiddenword"), "tenant": "acme"}))
        stranger = moderator.route(decoded(settings, {**event("hi"), "tenant": "globex"}))
        assert isinstance(clean, Routed) and clean.policy.id == "strict" and not clean.hits
        assert isinstance(listed, Routed) and listed.policy.id == "strict" and listed.halts
        assert isinstance(stranger, Rejection) and stranger.reason is Reason.UNKNOWN_TENANT
        assert clean.event.event_id == "e-0" and listed.event is not clean.event


def test_route_sends_events_of_another_pools_model_elsewhere() -> None:
    settings = Settings(
        models={"text": {"family": "llama-guard-3-1b", "path": "/t"}, "vision": {"path": "/v"}},
        pools={"txt": {"models": ["text"]}, "img": {"models": ["vision"]}},
        pool="txt",
    )
    moderator = Moderator(
        fake_registry(settings, text=FakeEngine(settings, family="llama-guard-3-1b")), settings
    )
    assert isinstance(moderator.route(decoded(settings, event("hi"))), Routed)
    assert moderator.route(decoded(settings, event("hi", image=png_data_url()))) is ELSEWHERE


def test_text_only_models_reject_image_events_with_a_reason() -> None:
    settings = Settings(models={"text": {"family": "llama-guard-3-1b", "path": "/t"}})
    moderator = Moderator(fake_registry(settings), settings)
    rejected = moderator.route(decoded(settings, event("look", image=png_data_url())))
    assert isinstance(rejected, Rejection) and rejected.reason is Reason.TOO_MANY_IMAGES


def test_the_cache_key_follows_text_image_bytes_and_policy(settings, moderator) -> None:
    a = keyed_of(moderator, settings, event("hello", image=png_data_url()))
    same = keyed_of(moderator, settings, event("hello", image=png_data_url(), i=9))
    other_image = keyed_of(moderator, settings, event("hello", image=png_data_url((0, 0, 255))))
    other_policy = keyed_of(moderator, settings, event("hello", image=png_data_url(), policy="strict"))
    assert a.key == same.key, "event ids are not content"
    assert len({a.key, other_image.key, other_policy.key}) == 3
    assert (
        a.modality == "image" and a.images and keyed_of(moderator, settings, event("hi")).modality == "text"
    )


def test_answers_hit_the_cache_halt_on_blocklists_and_leave_misses_to_the_model(settings, moderator) -> None:
    cache = DictCache()
    hit = keyed_of(moderator, settings, event("seen before"))
    cache.entries[hit.key] = {"unsafe": False, "score": 0.1, "codes": [], "dropped": []}
    broken = keyed_of(moderator, settings, event("odd entry"))
    cache.entries[broken.key] = {"unsafe": "?"}  # missing fields: a miss, overwritten later
    halting = keyed_of(moderator, settings, event("a forbiddenword here", policy="strict"))
    miss = keyed_of(moderator, settings, event("new text"))

    answers = moderator.answers(cache, [hit, broken, halting, miss])

    assert answers[0] == Answer(GuardResult(score=0.1, unsafe=False, codes=()), cached=True)
    assert answers[1] is None and answers[3] is None
    assert answers[2] is not None and answers[2].result.halted and not answers[2].cached
    assert cache.entries[halting.key]["halted"] is True, "a halting decision is cached like any verdict"
    assert cache.reads == 1, "one read for the whole list"


def test_a_wave_of_repeats_shares_one_answer_and_its_verdicts_equal_ones_built_afresh(
    settings, moderator
) -> None:
    def optional_fields(i: int) -> dict[str, str]:  # four shapes, each event's values its own
        fields = {"created_at": f"2026-12-01T10:00:0{i}Z", "tenant": f"tenant-{i}"}
        return {k: v for n, (k, v) in enumerate(fields.items()) if i % 4 in ((1, 3), (2, 3))[n]}

    records = [{**event("seen before", i=i), **optional_fields(i)} for i in range(8)]
    wave = [keyed_of(moderator, settings, r) for r in records]
    assert len({k.key for k in wave}) == 1
    cache = DictCache()
    cache.entries[wave[0].key] = {
        "unsafe": True,
        "score": 0.9,
        "codes": ["S1"],
        "dropped": [],
        "category_scores": {"S1": 0.9},
    }
    answers = moderator.answers(cache, wave)
    assert all(a is answers[0] for a in answers), "one answer per entry read"
    for with_source in (False, True):

        def source(offset: int) -> SourceCoordinates | None:  # each event its own offset
            return SourceCoordinates("chat.events", 1, offset) if with_source else None

        for i, j in itertools.permutations(range(len(wave)), 2):
            verdicts._TEMPLATES.clear()
            first = moderator.verdict(wave[i], answers[0], latency_ms=1.0, source=source(i))
            templated = moderator.verdict(wave[j], answers[0], latency_ms=2.5, source=source(j))
            verdicts._TEMPLATES.clear()
            afresh = moderator.verdict(wave[j], answers[0], latency_ms=2.5, source=source(j))
            if i % 4 == j % 4:
                assert templated["categories"] is first["categories"], "built from the first one's template"
            assert first["event_id"] == f"e-{i}", "the first verdict is left as it was"
            validate_verdict(templated)
            del templated["decided_at"], afresh["decided_at"]
            assert list(templated.items()) == list(afresh.items()), "same keys, same order, same values"


ENTRIES = {  # cache entries of each shape a verdict can take
    "safe": {"unsafe": False, "score": 0.02, "codes": [], "dropped": []},
    "unsafe, scores, dropped codes": {
        "unsafe": True,
        "score": 0.97,
        "codes": ["S1", "S10"],
        "dropped": ["S14"],
        "category_scores": {"S1": 0.7, "S10": 0.2},
    },
    "review band, language": {
        "unsafe": False,
        "score": 0.4,
        "codes": [],
        "dropped": [],
        "language": {"code": "fr", "confidence": 0.93, "model_optimized": False},
    },
    "halted": {"unsafe": True, "score": 1.0, "codes": ["S10"], "dropped": [], "halted": True},
}


@pytest.mark.parametrize("entry", ENTRIES, ids=list(ENTRIES))
def test_a_cache_hits_verdict_rendered_from_its_template_is_byte_for_byte_the_encoded_verdict(entry) -> None:
    settings = Settings(policies={"default": {"threshold": 0.5, "review_threshold": 0.3}})
    moderator = Moderator(fake_registry(settings), settings)
    encoder = Encoder(settings.topics)
    odd = 'quote " back\\slash \u2028 é 🙂 \x01'
    shapes = []
    for i in range(16):  # every combination of the optional fields, with awkward values
        record = event("seen before" if i % 2 else "seen before, twice", i=i)
        record["event_id"] = f"{odd} #{i}"
        record["conversation_id"] = f"c-{odd}-{i}"
        if i & 2:
            record["created_at"] = "2026-12-01T10:00:00.123+01:00"
        if i & 4:
            record["tenant"] = f"tenant {odd}"
        if i & 8:  # a dropped system message, a merged turn, and the assistant's reply judged
            record["messages"] = [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "one"},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "three"},
            ]
        shapes.append(keyed_of(moderator, settings, record))
    cache = DictCache()
    for keyed in shapes:
        cache.entries[keyed.key] = ENTRIES[entry]
    answers = moderator.answers(cache, shapes)
    assert all(a is not None and a.cached for a in answers)
    decided = "2026-12-01T09:00:00.007Z"
    for n, (keyed, answer) in enumerate(zip(shapes, answers, strict=True)):
        for source in (None, SourceCoordinates("chat.events", 3, 10**12 + n)):
            template = moderator.verdict_template(keyed, answer, source=source is not None)
            assert template is not None
            latency = 1.0 / 3 + n
            output = encoder.templated(
                template,
                keyed.routed.event,
                latency_ms=latency,
                decided_at=orjson.dumps(decided),
                source=source,
            )
            verdict = moderator.verdict(keyed, answer, latency_ms=latency, source=source, count=False)
            verdict["decided_at"] = decided
            expected = encoder.verdict(verdict)
            assert output == expected, "topics, key, value and headers: byte for byte"
            validate_verdict(orjson.loads(output.value))
            assert template.review == bool(verdict.get("review"))
            assert (template.decision, template.codes) == (
                verdict["decision"],
                tuple(c["code"] for c in verdict["categories"]),
            )


def test_verdicts_with_blocklist_hits_or_fresh_results_are_not_templated(settings, moderator) -> None:
    blocked = keyed_of(moderator, settings, event("a forbiddenword here", policy="strict"))
    plain = keyed_of(moderator, settings, event("hello"))
    result = GuardResult(score=0.1, unsafe=False, codes=())
    assert moderator.verdict_template(blocked, Answer(result, cached=True), source=True) is None
    assert moderator.verdict_template(plain, Answer(result, cached=False), source=True) is None
    assert moderator.verdict_template(plain, Answer(result, cached=True), source=True) is not None


def test_equal_cache_entries_share_one_answer_across_reads(settings, moderator) -> None:
    keyed = keyed_of(moderator, settings, event("seen before"))
    cache = DictCache()
    cache.entries[keyed.key] = {"unsafe": False, "score": 0.1, "codes": [], "dropped": []}
    first = moderator.answers(cache, [keyed])[0]
    assert moderator.answers(cache, [keyed])[0] is first, "the same entry: the same answer"
    cache.entries[keyed.key] = {"unsafe": True, "score": 0.9, "codes": ["S1"], "dropped": []}
    changed = moderator.answers(cache, [keyed])[0]
    assert changed is not None and changed.result.unsafe, "a new entry is read afresh"


def test_classify_isolates_a_poison_item_and_answers_the_rest(settings) -> None:
    engine = FakeEngine(settings)
    moderator = Moderator(fake_registry(settings, default=engine), settings)
    texts = ["fine", "kill them", "POISON here", "also fine"]
    ready = [moderator.ready(keyed_of(moderator, settings, event(t, i=i))) for i, t in enumerate(texts)]
    splits = []

    results = moderator.classify("default", ready, on_split=lambda n, exc: splits.append(n))

    assert [type(r) for r in results] == [GuardResult, GuardResult, EngineError, GuardResult]
    assert results[1].unsafe and results[1].codes == ("S1",) and not results[0].unsafe
    assert results[2].kind is ErrorKind.MODEL and results[2].is_fault
    assert splits == [4], "split once, at the top"
    assert engine.forward_passes[0] == 4 and 1 in engine.forward_passes
    assert all(r.language is not None for r in results if isinstance(r, GuardResult)), "language attached"


def test_an_out_of_memory_batch_becomes_smaller_batches(settings) -> None:
    engine = FakeEngine(settings)
    moderator = Moderator(fake_registry(settings, default=engine), settings)
    ready = [
        moderator.ready(keyed_of(moderator, settings, event(t, i=i))) for i, t in enumerate(["OOM a", "b"])
    ]
    results = moderator.classify("default", ready)
    assert all(isinstance(r, GuardResult) for r in results), "alone, each item fits"
    assert engine.forward_passes == [2, 1, 1]


def test_a_batch_whose_preparation_raised_is_isolated_too(settings) -> None:
    moderator = Moderator(fake_registry(settings), settings)
    ready = [moderator.ready(keyed_of(moderator, settings, event(t, i=i))) for i, t in enumerate(["a", "b"])]
    results = moderator.classify("default", ready, prepare_error=ValueError("tokenizer broke"))
    assert all(isinstance(r, GuardResult) for r in results), "prepared again half by half"


def test_an_unparsable_answer_is_an_engine_error_rejection_quoting_the_output(settings, moderator) -> None:
    ready = [moderator.ready(keyed_of(moderator, settings, event("GARBLED")))]
    (result,) = moderator.classify("default", ready)
    assert isinstance(result, EngineError) and result.kind is ErrorKind.MALFORMED and not result.is_fault
    rejection = engine_error_rejection(result)
    assert rejection.reason is Reason.ENGINE_ERROR and "maybe?" in rejection.message


def test_the_probe_tells_a_broken_engine_from_a_working_one(settings) -> None:
    engine = FakeEngine(settings)
    moderator = Moderator(fake_registry(settings, default=engine), settings)
    assert moderator.probe("default")
    engine.broken = True
    assert not moderator.probe("default")


def test_an_undecodable_image_is_a_rejection_naming_its_field(settings, moderator) -> None:
    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()
    keyed = keyed_of(moderator, settings, event("look", image=broken))
    rejected = moderator.decode_images(keyed)
    assert isinstance(rejected, Rejection) and rejected.reason.value.startswith("image")
    assert rejected.field and "image_url" in rejected.field


def test_verdicts_validate_against_the_schema_and_say_where_the_answer_came_from(settings, moderator) -> None:
    cache = DictCache()
    keyed = keyed_of(moderator, settings, event("kill them", image=png_data_url()))
    (result,) = moderator.classify("default", [moderator.ready(keyed, moderator.decode_images(keyed))])
    moderator.store(cache, [(keyed, result)])
    fresh = moderator.verdict(keyed, Answer(result, cached=False), latency_ms=3.0)
    (again,) = moderator.answers(cache, [keyed])
    cached = moderator.verdict(keyed, again, latency_ms=1.0)
    for verdict in (fresh, cached):
        validate_verdict(verdict)
        assert verdict["decision"] == "unsafe" and [c["code"] for c in verdict["categories"]] == ["S1"]
    assert (fresh["cached"], cached["cached"]) == (False, True)


@hypothesis.given(
    st.one_of(
        st.floats(min_value=0.0, max_value=1e17, allow_nan=False),
        st.integers(min_value=0, max_value=10**9).map(lambda n: n / 2000),  # exact ties at the third decimal
        st.sampled_from([0.0, -0.0, 0.0005, 0.0015, 2.675, 1e15, 1e16 - 1, 123456789.0125]),
    )
)
def test_latency_is_written_as_orjson_writes_it_rounded(latency_ms) -> None:
    assert verdicts.latency_bytes(latency_ms) == orjson.dumps(round(float(latency_ms), 3))
