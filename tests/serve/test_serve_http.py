"""The Ray Serve HTTP endpoint, deployed from deploy/serve_config.yaml with a real ``serve.run`` on 127.0.0.1.

The app entry of the Serve config is deployed as written, with test-only settings merged into its ``args``
(tiny model, the session's Redis, no GPU so the session's fake GPUs stay free, a small body limit).
"""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.support.contracts import validate_verdict
from worker.dev.tiny_model.synthetic import synthetic_examples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # room for a few hostile (small, highly compressed, huge) PNGs
MAX_EVENTS = 8
JSON = {"Content-Type": "application/json"}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


@pytest.fixture(scope="module")
def moderation_url(
    serve_http: str, services: Any, tiny_model_dir: Path, tiny_text_guard_dir: Path
) -> Iterator[str]:
    from ray import serve

    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    test_settings = {
        # Two named models: text-only events to the tiny text guard "text", image events to the tiny "vision".
        "models": {
            "text": {"path": str(tiny_text_guard_dir), "device": "cpu", "family": "llama-guard-3-1b"},
            "vision": {"path": str(tiny_model_dir), "device": "cpu", "family": "llama-guard-3-vision"},
        },
        "routing": {"text": "text", "image": "vision"},
        "redis": {"url": services.redis_url, "key_prefix": f"mw:serve-test:{uuid.uuid4().hex[:8]}:"},
        "serve": {
            "num_gpus": 0,
            "max_request_bytes": MAX_REQUEST_BYTES,
            "max_events_per_request": MAX_EVENTS,
        },
        "logging": {"level": "WARNING"},
    }
    args = _merge(app.get("args") or {}, {"settings": test_settings})
    module, attr = app["import_path"].split(":")
    build = getattr(importlib.import_module(module), attr)
    serve.run(build(args), name=app["name"], route_prefix=app["route_prefix"], blocking=False)
    try:
        _wait_ready(serve_http)
        yield serve_http
    finally:
        serve.delete(app["name"])


def _events(n: int, *, seed: int, images: bool = False) -> list[dict[str, Any]]:
    pool = [e for e in synthetic_examples(n * 4 + 20, seed=seed, split="heldout") if e.has_image == images][
        :n
    ]
    events = []
    for example in pool:
        event = dict(example.event)
        event["event_id"] = f"http-{uuid.uuid4().hex[:10]}"
        events.append(event)
    return events


def _wait_ready(url: str, timeout_s: float = 300.0) -> None:
    """The replica loads its model in the background: wait until /readyz says ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, text = get(url, "/readyz")
        if status == 200:
            return
        assert status == 503, (status, text)
        time.sleep(0.5)
    raise AssertionError("the replica did not become ready")


async def _post(url: str, body: bytes, headers: dict[str, str] = JSON) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(f"{url}/v1/moderate", data=body, headers=headers) as response,
    ):
        text = await response.text()
        try:
            return response.status, dict(response.headers), orjson.loads(text)
        except orjson.JSONDecodeError:
            return response.status, dict(response.headers), text


def post(url: str, body: bytes, headers: dict[str, str] = JSON) -> tuple[int, dict[str, str], Any]:
    return asyncio.run(_post(url, body, headers))


def get(url: str, path: str) -> tuple[int, str]:
    async def _get() -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(f"{url}{path}") as response,
        ):
            return response.status, await response.text()

    return asyncio.run(_get())


def test_one_event_gets_one_verdict_and_a_repeat_comes_from_the_cache(moderation_url: str) -> None:
    (event,) = _events(1, seed=1)
    status, headers, verdict = post(moderation_url, orjson.dumps(event))
    assert status == 200, verdict
    validate_verdict(verdict)
    assert verdict["event_id"] == event["event_id"] and verdict["cached"] is False
    assert int(headers["x-mw-batch-size"]) >= 1

    again = dict(event, event_id="repeat-" + event["event_id"])
    status, headers, verdict2 = post(moderation_url, orjson.dumps(again))
    assert status == 200
    assert verdict2["cached"] is True and verdict2["decision"] == verdict["decision"]
    assert headers["x-mw-batch-size"] == "0"  # nothing reached the model


def test_a_list_of_events_gets_verdicts_in_the_same_order(moderation_url: str) -> None:
    events = _events(3, seed=2) + _events(1, seed=2, images=True)
    status, _, verdicts = post(moderation_url, orjson.dumps(events))
    assert status == 200, verdicts
    assert [v["event_id"] for v in verdicts] == [e["event_id"] for e in events]
    for verdict in verdicts:
        validate_verdict(verdict)
    # Each event was judged by the model its modality routes to (one request, two models' batches).
    assert [(v["model"]["name"], v["model"]["family"]) for v in verdicts] == [
        ("text", "llama-guard-3-1b"),
        ("text", "llama-guard-3-1b"),
        ("text", "llama-guard-3-1b"),
        ("vision", "llama-guard-3-vision"),
    ]


def test_wrong_content_type_is_415(moderation_url: str) -> None:
    (event,) = _events(1, seed=3)
    status, _, body = post(moderation_url, orjson.dumps(event), {"Content-Type": "text/plain"})
    assert status == 415
    assert body["error"]["reason"] == "unsupported_media_type"


def test_unreadable_json_is_400_naming_the_reason(moderation_url: str) -> None:
    status, _, body = post(moderation_url, b'{"event_id": "x", "messages": [')
    assert status == 400
    assert body["error"]["reason"] == "invalid_json"
    status, _, body = post(moderation_url, b"[{]")
    assert (status, body["error"]["reason"]) == (400, "invalid_json")


def test_too_large_body_or_too_many_events_is_413(moderation_url: str) -> None:
    (event,) = _events(1, seed=4)
    event["messages"][-1]["content"] = "x" * (MAX_REQUEST_BYTES + 10)
    status, _, body = post(moderation_url, orjson.dumps(event))
    assert (status, body["error"]["reason"]) == (413, "record_too_large")
    status, _, body = post(moderation_url, orjson.dumps(_events(1, seed=4) * (MAX_EVENTS + 1)))
    assert (status, body["error"]["reason"]) == (413, "too_many_events")


def test_invalid_events_are_422_naming_the_field_and_reason(moderation_url: str) -> None:
    bad_role = {"event_id": "r1", "conversation_id": "c", "messages": [{"role": "wizard", "content": "hi"}]}
    status, _, body = post(moderation_url, orjson.dumps(bad_role))
    assert status == 422
    assert body["error"]["reason"] == "unknown_role"
    assert "messages[0]" in body["error"]["field"]

    missing = {"conversation_id": "c", "messages": [{"role": "user", "content": "hi"}]}
    good = _events(1, seed=5)[0]
    status, _, body = post(moderation_url, orjson.dumps([good, missing]))
    assert status == 422
    assert body["error"]["reason"] == "missing_field"
    assert body["error"]["index"] == 1 and body["error"]["field"].startswith("[1]")

    unknown_policy = dict(good, policy="no-such-policy")
    status, _, body = post(moderation_url, orjson.dumps(unknown_policy))
    assert (status, body["error"]["reason"]) == (422, "unknown_policy")


def test_health_readiness_and_openapi(moderation_url: str) -> None:
    assert get(moderation_url, "/healthz")[0] == 200
    status, text = get(moderation_url, "/readyz")
    assert status == 200 and orjson.loads(text)["status"] == "ready"
    assert sorted(orjson.loads(text)["models"]) == ["text", "vision"]
    status, text = get(moderation_url, "/openapi.json")
    assert status == 200
    spec = orjson.loads(text)
    assert "/v1/moderate" in spec["paths"]
    assert get(moderation_url, "/docs")[0] == 200


def test_unknown_routes_and_methods_answer_in_the_error_shape(moderation_url: str) -> None:
    status, text = get(moderation_url, "/v1/nothing-here")
    body = orjson.loads(text)
    assert status == 404 and body["error"]["reason"] == "not_found" and "detail" not in body
    status, text = get(moderation_url, "/v1/moderate")
    body = orjson.loads(text)
    assert status == 405 and body["error"]["reason"] == "method_not_allowed" and "detail" not in body
    assert body["error"]["status"] == 405


def test_concurrent_requests_share_model_batches(moderation_url: str) -> None:
    """Many single-event requests at once: the batch-size header and metric show batches above 1.

    Also prints the request rate of this short bounded load (a figure, not an assertion).
    """
    events = _events(96, seed=6)
    bodies = [orjson.dumps(e) for e in events]

    async def load() -> tuple[list[int], list[int], float]:
        connector = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=120)
        ) as session:

            async def one(body: bytes) -> tuple[int, int]:
                async with session.post(f"{moderation_url}/v1/moderate", data=body, headers=JSON) as response:
                    await response.read()
                    return response.status, int(response.headers.get("x-mw-batch-size", "0"))

            started = time.perf_counter()
            results = await asyncio.gather(*(one(b) for b in bodies))
            return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - started

    statuses, batch_sizes, elapsed = asyncio.run(load())
    print(
        f"\nserve: {len(bodies)} single-event requests, 32 concurrent: {len(bodies) / elapsed:.0f} req/s, "
        f"largest batch {max(batch_sizes)}, mean batch {sum(batch_sizes) / len(batch_sizes):.1f}"
    )
    assert statuses == [200] * len(bodies)
    assert max(batch_sizes) > 1
    status, text = get(moderation_url, "/metrics")
    assert status == 200
    from tests.support.metrics import parse_exposition

    samples = parse_exposition(text)
    count = samples['mw_batch_size_count{modality="text",model="text"}']
    total = samples['mw_batch_size_sum{modality="text",model="text"}']
    assert total / count > 1  # the replica's own histogram: more events than forward passes


def _png(size: tuple[int, int]) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")  # solid: ~120 KB for 6000x6000, 108 MB decoded
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_event(url: str) -> dict[str, Any]:
    return {
        "event_id": f"img-{uuid.uuid4().hex[:8]}",
        "conversation_id": "c",
        "created_at": "2026-12-01T00:00:00Z",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }


def test_image_errors_name_the_field_the_size_and_the_limit(moderation_url: str) -> None:
    field = "messages[0].content[1].image_url.url"
    status, _, body = post(
        moderation_url, orjson.dumps(_image_event("data:image/png;base64,iVBORw0KGgoAAAA="))
    )
    assert (status, body["error"]["reason"]) == (422, "image_undecodable"), body
    assert body["error"]["field"] == field and "object at 0x" not in body["error"]["message"]

    status, _, body = post(moderation_url, orjson.dumps(_image_event(_png((7000, 7000)))))
    assert (status, body["error"]["reason"]) == (422, "image_too_many_pixels"), body
    assert body["error"]["field"] == field
    message = body["error"]["message"]
    assert "7000x7000" in message and "limits.max_image_pixels" in message and "40000000" in message


def test_a_request_of_huge_images_is_refused_at_once_and_does_not_delay_a_small_one(
    moderation_url: str,
) -> None:
    """Eight solid 6000x6000 PNGs (1 MB of body, 288 Mpx): refused by serve.max_request_image_pixels from
    their headers alone, while a one-line text request sent right behind is answered."""
    hostile = orjson.dumps([_image_event(_png((6000, 6000)))] * 8)
    small = orjson.dumps(_events(1, seed=11)[0])

    async def both() -> tuple[tuple[int, Any], tuple[int, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def send(body: bytes, delay: float) -> tuple[int, Any]:
                await asyncio.sleep(delay)
                async with session.post(f"{moderation_url}/v1/moderate", data=body, headers=JSON) as response:
                    return response.status, orjson.loads(await response.read())

            return tuple(await asyncio.gather(send(hostile, 0), send(small, 0.05)))  # type: ignore[return-value]

    (h_status, h_body), (s_status, s_body) = asyncio.run(both())
    assert (h_status, h_body["error"]["reason"]) == (413, "too_many_pixels"), h_body
    assert "serve.max_request_image_pixels" in h_body["error"]["message"]
    assert s_status == 200, s_body


# Generous for a shared 2-core machine: each hostile image costs seconds of decoding here; the small request
# needs no decoding at all and must not queue behind them.
SMALL_REQUEST_BOUND_S = 20.0


def test_a_hostile_client_cannot_delay_a_small_request_behind_its_image_decoding(moderation_url: str) -> None:
    """Three concurrent requests of one solid 6000x6000 PNG each (within every limit; each takes seconds to
    decode here), then one text request: the text request is answered before the last hostile one, and
    within SMALL_REQUEST_BOUND_S."""
    hostile = [orjson.dumps(_image_event(_png((6000, 6000)))) for _ in range(3)]
    small = orjson.dumps(_events(1, seed=12)[0])

    async def run() -> tuple[list[float], float, float, int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            started = time.monotonic()

            async def send(body: bytes, delay: float) -> tuple[int, float]:
                await asyncio.sleep(delay)
                async with session.post(f"{moderation_url}/v1/moderate", data=body, headers=JSON) as response:
                    await response.read()
                    return response.status, time.monotonic()

            results = await asyncio.gather(*(send(b, 0) for b in hostile), send(small, 0.3))
            *hostile_done, (small_status, small_done) = results
            assert all(status in (200, 422) for status, _ in hostile_done), hostile_done
            return [t for _, t in hostile_done], small_done, started + 0.3, small_status

    hostile_done, small_done, small_sent, small_status = asyncio.run(run())
    assert small_status == 200
    waited = small_done - small_sent
    print(
        f"\nserve: small request answered in {waited:.2f} s; hostile requests done after "
        f"{max(hostile_done) - small_sent:.2f} s"
    )
    assert small_done < max(hostile_done), "the small request waited for the hostile image decoding"
    assert waited < SMALL_REQUEST_BOUND_S
