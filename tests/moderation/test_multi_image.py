"""Events with several images: the decoder keeps them all when a route has a several-image model
(Llama Guard 4) and the router sends them there; without one, Vision's reject / keep_last rule stays.

Decoder + router + request building only; tests/moderation/test_stream_routing.py runs the tiny Llama Guard 4 end to end.
"""

from __future__ import annotations

import base64
import hashlib

import pytest

from tests.contracts.malformed_events import PNG_1PX, image, raw, user
from worker.config import Settings
from worker.contracts.decode import decode_event, event_to_dict, reads_several_images
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Reason, Rejection
from worker.moderation.routing import Router, guard_request, images_hash, settings_for_pool

FAMILY = {"text": "llama-guard-3-1b", "vision": "llama-guard-3-vision", "lg4": "llama-guard-4"}
DATA_URL = f"data:image/png;base64,{PNG_1PX}"


def settings_with(*names: str, **extra: object) -> Settings:
    return Settings(models={n: {"family": FAMILY[n], "path": f"/models/{n}"} for n in names}, **extra)


def three_image_record(**fields: object) -> bytes:
    return raw(
        **fields,
        messages=[
            user("look", image("https://a.example/1.png")),
            {"role": "assistant", "content": "ok"},
            user("and these", image("https://a.example/2.png"), image(DATA_URL)),
        ],
    )


def decoded(record: bytes, settings: Settings) -> ChatEvent:
    result = decode_event(record, settings)
    assert isinstance(result, ChatEvent), result
    return result


def test_with_a_llama_guard_4_route_every_image_is_kept_and_the_event_goes_to_it():
    settings = settings_with("text", "vision", "lg4")
    ev = decoded(three_image_record(), settings)
    assert [(ref.url, ref.turn_index) for ref in ev.images] == [
        ("https://a.example/1.png", 0),
        ("https://a.example/2.png", 2),
        (DATA_URL, 2),
    ]
    assert [ref.field_path for ref in ev.images] == [
        "messages[0].content[1].image_url.url",
        "messages[2].content[1].image_url.url",
        "messages[2].content[2].image_url.url",
    ]
    assert ev.images[2].data == base64.b64decode(PNG_1PX)
    assert ev.image == ev.images[-1] and ev.dropped_images == 0
    assert ev.image_count == 3
    assert Router(settings).model_for("default", ev.image_count) == "lg4"
    assert [i["url"] for i in event_to_dict(ev)["images"]][:2] == [
        "https://a.example/1.png",
        "https://a.example/2.png",
    ]


def test_one_image_still_goes_to_vision_and_text_to_the_text_guard_beside_llama_guard_4():
    settings = settings_with("text", "vision", "lg4")
    router = Router(settings)
    one = decoded(raw(messages=[user("look", image(DATA_URL))]), settings)
    text = decoded(raw(), settings)
    assert (one.image_count, router.model_for("default", one.image_count)) == (1, "vision")
    assert (text.image_count, router.model_for("default", text.image_count)) == (0, "text")


@pytest.mark.parametrize("limit", [1, 2])
def test_more_images_than_llama_guard_4_reads_are_rejected_naming_the_first_extra_one(limit):
    settings = settings_with("vision", "lg4", limits={"max_images_llama_guard_4": limit})
    result = decode_event(three_image_record(), settings)
    assert isinstance(result, Rejection) and result.reason == Reason.TOO_MANY_IMAGES
    assert "limits.max_images_llama_guard_4" in result.message
    extra = ["messages[2].content[1].image_url.url", "messages[2].content[2].image_url.url"][limit - 1]
    assert result.field == extra


def test_without_llama_guard_4_vision_keeps_reject_and_keep_last():
    settings = settings_with("text", "vision")
    assert not reads_several_images(settings, None)
    rejected = decode_event(three_image_record(), settings)
    assert isinstance(rejected, Rejection) and rejected.reason == Reason.TOO_MANY_IMAGES
    assert rejected.field == "messages[2].content[1].image_url.url"
    assert "limits.multiple_images" in rejected.message

    keep_last = settings_with("text", "vision", limits={"multiple_images": "keep_last"})
    ev = decoded(three_image_record(), keep_last)
    assert ev.images == (ev.image,) and ev.image.url == DATA_URL and ev.dropped_images == 2
    assert Router(keep_last).model_for("default", ev.image_count) == "vision"


def test_a_single_model_config_keeps_todays_behaviour():
    assert not reads_several_images(Settings(), None)
    result = decode_event(three_image_record(), Settings())
    assert isinstance(result, Rejection) and result.reason == Reason.TOO_MANY_IMAGES


def test_every_pool_decodes_a_several_image_event_the_same_way():
    """Split pools: each pool decides from the whole routing config, so the pool without LG4 skips the event
    (routed elsewhere) instead of dead-lettering it as a second image."""
    settings = settings_with(
        "text", "vision", "lg4", pools={"small": {"models": ["text", "vision"]}, "big": {"models": ["lg4"]}}
    )
    events = [decoded(three_image_record(), settings_for_pool(settings, pool)) for pool in ("small", "big")]
    assert events[0] == events[1] and events[0].image_count == 3


def test_an_unknown_policy_is_still_rejected_as_such_with_several_images():
    settings = settings_with("vision", "lg4")
    result = decode_event(three_image_record(policy="nope"), settings)
    assert isinstance(result, Rejection) and result.reason == Reason.UNKNOWN_POLICY


def test_several_images_travel_to_the_engine_request_with_their_turns():
    settings = settings_with("vision", "lg4")
    ev = decoded(three_image_record(), settings)
    policy = object()
    pictures = ("img-a", "img-b", "img-c")  # stand-ins for decoded PIL images: only carried, never read here
    request = guard_request(ev, policy, pictures)  # type: ignore[arg-type]
    assert request.images == pictures and request.image_turns == (0, 2, 2) and request.image is None
    assert request.all_images == pictures and request.turns == ev.turns

    one = decoded(raw(messages=[user("look", image(DATA_URL))]), settings)
    single = guard_request(one, policy, ("img",))  # type: ignore[arg-type]
    assert single.image == "img" and single.images == ()
    assert guard_request(decoded(raw(), settings), policy, ()).all_images == ()  # type: ignore[arg-type]


def test_the_cache_key_image_part_covers_every_image_and_its_turn():
    settings = settings_with("vision", "lg4")
    ev = decoded(three_image_record(), settings)
    datas = (b"a", b"b", b"c")
    assert images_hash(ev, datas) != images_hash(ev, (b"a", b"c", b"b")), "order counts"
    moved = decoded(
        raw(
            messages=[
                user(
                    "look",
                    image("https://a.example/1.png"),
                    image("https://a.example/2.png"),
                    image(DATA_URL),
                )
            ]
        ),
        settings,
    )
    assert images_hash(moved, datas) != images_hash(ev, datas), "so does which turn carried each image"
    one = decoded(raw(messages=[user("look", image(DATA_URL))]), settings)
    assert images_hash(one, (b"x",)) == hashlib.sha256(b"x").hexdigest(), "one-image keys are unchanged"
    assert images_hash(decoded(raw(), settings), ()) is None
