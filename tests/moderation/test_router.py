"""The routing rule, pools and their consumer groups: pure, from settings."""

from __future__ import annotations

import pytest

from worker.config import ConfigError, Settings, load_settings
from worker.moderation.routing import (
    Router,
    consumer_group_id,
    dead_letter_pool,
    local_models,
    settings_for_pool,
)

FAMILY = {
    "text": "llama-guard-3-1b",
    "big": "llama-guard-3-8b",
    "vision": "llama-guard-3-vision",
    "lg4": "llama-guard-4",
}


def settings_with(*names, **extra):
    return Settings(models={n: {"family": FAMILY[n], "path": f"/models/{n}"} for n in names}, **extra)


def test_a_single_model_config_is_one_model_named_default_judging_everything():
    s = Settings()
    router = Router(s)
    assert list(s.guard_models()) == ["default"]
    assert router.model_for("default", 0) == router.model_for("default", 1) == "default"
    assert local_models(s) == ["default"]
    assert consumer_group_id(s) == s.kafka.group_id


def test_default_rule_sends_text_to_the_text_guard_and_images_to_vision():
    router = Router(settings_with("vision", "text"))
    assert router.model_for("default", 0) == "text"
    assert router.model_for("default", 1) == "vision"
    assert router.model_for("default", 2) is None, "Vision reads one image and no llama-guard-4 is configured"


def test_several_images_go_to_llama_guard_4():
    router = Router(settings_with("text", "vision", "lg4"))
    assert [router.model_for("default", n) for n in (0, 1, 2, 5)] == ["text", "vision", "lg4", "lg4"]


def test_llama_guard_4_alone_judges_text_and_images():
    router = Router(settings_with("lg4"))
    assert router.model_for("default", 0) == router.model_for("default", 1) == "lg4"


def test_a_policy_names_its_own_routing():
    s = settings_with(
        "text",
        "big",
        "vision",
        policies={"default": {}, "strict": {}},
        routing={"policies": {"strict": {"text": "big"}}},
    )
    router = Router(s)
    assert router.model_for("default", 0) == "text"
    assert router.model_for("strict", 0) == "big"
    assert router.model_for("strict", 1) == "vision", "what the policy leaves out follows the default rule"


def test_explicit_routes_override_the_rule_and_text_only_models_cannot_take_images():
    assert (
        Router(settings_with("text", "vision", routing={"text": "vision"})).model_for("default", 0)
        == "vision"
    )
    with pytest.raises(ValueError, match="reads no such images"):
        Router(settings_with("text", "vision", routing={"image": "text"}))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"routing": {"text": "nope"}}, "routing.text names model 'nope'"),
        ({"routing": {"policies": {"ghost": {"text": "text"}}}}, "unknown policies"),
        ({"pools": {"a": {"models": ["nope"]}}}, "pools.a.models names model 'nope'"),
        ({"pools": {"a": {"models": ["text"]}, "b": {"models": ["text"]}}}, "one pool each"),
        (
            {
                "pools": {
                    "a": {"models": ["text"], "dead_letters": True},
                    "b": {"models": ["vision"], "dead_letters": True},
                }
            },
            "exactly one pool",
        ),
        ({"pool": "a"}, "pool 'a' is not among pools"),
        ({"model": {"path": "/x"}}, "either `model`"),
    ],
)
def test_inconsistent_model_routing_and_pool_settings_fail_at_start_naming_the_key(tmp_path, config, message):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"models": {"text": {"family": "llama-guard-3-1b"}, "vision": {}}, **config})
    )
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_pools_hold_their_own_models_in_their_own_consumer_groups():
    s = settings_with("text", "vision", pools={"txt": {"models": ["text"]}, "img": {"models": ["vision"]}})
    assert local_models(settings_for_pool(s, "txt")) == ["text"]
    assert local_models(settings_for_pool(s, "img")) == ["vision"]
    assert consumer_group_id(settings_for_pool(s, "img")) == f"{s.kafka.group_id}.img"
    assert local_models(s) == ["text", "vision"], "no pool named: co-located"


def test_the_text_pool_owns_unrouted_dead_letters_unless_another_pool_is_named():
    pools = {"img": {"models": ["vision"]}, "txt": {"models": ["text"]}}
    assert dead_letter_pool(settings_with("text", "vision", pools=pools)) == "txt"
    pools["img"]["dead_letters"] = True
    assert dead_letter_pool(settings_with("text", "vision", pools=pools)) == "img"


def test_unrouted_models_are_not_loaded_by_a_co_located_worker():
    s = settings_with("text", "big", "vision")
    assert local_models(s) == ["text", "vision"], "no route names the 8B guard"
