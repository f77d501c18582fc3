"""The official ``openai`` client against a real Serve app on 127.0.0.1, with API keys on.

The client's ``base_url`` is the local endpoint only (and the session's network guard fails any connect
outside 127.0.0.0/8), so nothing reaches the internet.
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import urllib3
import yaml

from tests.serve.test_serve_http import _wait_ready
from tests.support.contracts import validate_verdict
from worker.dev.tiny_model.synthetic import synthetic_examples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ROUTE = "/hosted"
ACME_KEY = "sk-acme-" + uuid.uuid4().hex
GLOBEX_KEY = "sk-globex-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def hosted_url(serve_http: str, services: Any, tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    """The Serve app of deploy/serve_config.yaml with auth on, two tenants and a blocklist, at /hosted."""
    from ray import serve

    secret = tmp_path_factory.mktemp("secret") / "acme-key"
    secret.write_text(ACME_KEY + "\n")  # as a Secret mounted as a file
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    settings = {
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "redis": {"url": services.redis_url, "key_prefix": f"mw:openai-test:{uuid.uuid4().hex[:8]}:"},
        "serve": {"num_gpus": 0, "openai_categories": {"spam": ["illicit"]}},
        "logging": {"level": "WARNING"},
        "policies": {
            "default": {
                "blocklists": {"spam": {"terms": ["cheap pills"], "category": "spam", "name": "Spam"}}
            },
            "strict": {"threshold": 0.2},
        },
        "tenants": {
            "acme": {"policy": "default", "allowed_policies": ["strict"]},
            "globex": {"policy": "strict"},
        },
        "auth": {
            "enabled": True,
            "keys": {
                "acme-app": {"tenant": "acme", "key_file": str(secret)},
                "globex-app": {
                    "tenant": "globex",
                    "key": GLOBEX_KEY,
                    "requests_per_second": 0.01,
                    "burst": 2,
                },
            },
        },
    }
    args = {
        **(app.get("args") or {}),
        "settings": {**(app.get("args") or {}).get("settings", {}), **settings},
    }
    args["settings"]["serve"] = {**(app["args"]["settings"].get("serve") or {}), **settings["serve"]}
    module, attr = app["import_path"].split(":")
    build = getattr(importlib.import_module(module), attr)
    serve.run(build(args), name="hosted", route_prefix=ROUTE, blocking=False)
    try:
        _wait_ready(serve_http + ROUTE)  # the replica loads its model in the background
        yield serve_http + ROUTE
    finally:
        serve.delete("hosted")


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_text_inputs_get_typed_openai_results(hosted_url: str) -> None:
    threat = next(
        e for e in synthetic_examples(60, seed=4, split="heldout") if e.codes == ("S1",) and not e.has_image
    )
    content = threat.event["messages"][-1]["content"]
    text = (
        content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
    )
    response = client(hosted_url, ACME_KEY).moderations.create(
        model="omni-moderation-latest", input=[text, "What a lovely day for a walk."]
    )
    assert isinstance(response, openai.types.ModerationCreateResponse)
    assert response.id.startswith("modr-") and response.model
    unsafe, safe = response.results
    assert isinstance(unsafe, openai.types.Moderation)
    assert unsafe.flagged is True and unsafe.categories.violence is True and unsafe.categories.illicit_violent
    assert unsafe.category_scores.violence > 0.5 > safe.category_scores.violence
    assert safe.flagged is False and safe.categories.hate is False
    assert unsafe.category_applied_input_types.violence == ["text"]
    # The S-codes are there under their own keys, and the worker's verdict rides along.
    extra = unsafe.model_extra or {}
    assert unsafe.categories.model_extra["S1"] is True
    validate_verdict(extra["verdict"])
    assert extra["verdict"]["tenant"] == "acme" and extra["verdict"]["policy"]["id"] == "default"


def test_text_and_image_parts_are_one_input(hosted_url: str) -> None:
    example = next(
        e
        for e in synthetic_examples(80, seed=6, split="heldout")
        if e.has_image and len(e.event["messages"]) == 1
    )
    parts = example.event["messages"][0]["content"]
    response = client(hosted_url, ACME_KEY).moderations.create(input=parts, model="omni-moderation-latest")
    (result,) = response.results
    assert result.category_applied_input_types.sexual == ["text", "image"]
    assert result.flagged is (example.decision == "unsafe")


def test_a_blocklist_hit_maps_its_custom_category(hosted_url: str) -> None:
    response = client(hosted_url, ACME_KEY).moderations.create(input="Buy CHEAP PILLS here")
    (result,) = response.results
    assert result.flagged and result.categories.illicit and result.category_scores.illicit == 1.0
    assert result.categories.model_extra["spam"] is True
    assert (result.model_extra or {})["verdict"]["blocklist"]["halted"] is True


def test_a_wrong_key_is_401_through_the_client_s_own_error(hosted_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(hosted_url, "sk-wrong-" + uuid.uuid4().hex).moderations.create(input="hello")
    assert caught.value.status_code == 401
    assert caught.value.body["reason"] == "unauthorized"  # the project's error shape, under "error"


def test_a_key_may_use_only_its_tenant_s_policies(hosted_url: str) -> None:
    acme = client(hosted_url, ACME_KEY)
    allowed = acme.moderations.create(input="hello", extra_body={"policy": "strict"})
    assert (allowed.results[0].model_extra or {})["verdict"]["policy"]["id"] == "strict"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(hosted_url, GLOBEX_KEY).moderations.create(input="hello", extra_body={"policy": "default"})
    assert caught.value.status_code == 403 and caught.value.body["reason"] == "policy_not_allowed"


def test_v1_moderate_takes_the_same_keys_and_budgets(hosted_url: str) -> None:
    http = urllib3.PoolManager()
    event = {"event_id": "e1", "conversation_id": "c1", "messages": [{"role": "user", "content": "hi"}]}

    def post(key: str | None, body: dict) -> urllib3.BaseHTTPResponse:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        return http.request("POST", f"{hosted_url}/v1/moderate", body=orjson.dumps(body), headers=headers)

    assert post(None, event).status == 401
    ok = post(ACME_KEY, event)
    assert ok.status == 200 and orjson.loads(ok.data)["tenant"] == "acme"
    other = post(ACME_KEY, {**event, "tenant": "globex"})
    assert other.status == 403 and orjson.loads(other.data)["error"]["reason"] == "forbidden"
    # globex has a budget of 2 requests (one was spent above by the policy test, if it ran first).
    statuses = [post(GLOBEX_KEY, event) for _ in range(3)]
    limited = [r for r in statuses if r.status == 429]
    assert limited, [r.status for r in statuses]
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert orjson.loads(limited[0].data)["error"]["reason"] == "rate_limited"
    with pytest.raises(openai.RateLimitError):
        client(hosted_url, GLOBEX_KEY).moderations.create(input="hello")
