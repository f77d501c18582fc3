"""API keys: sources, constant-time comparison, tenant binding, token-bucket budgets (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import AuthSettings, ConfigError, load_settings
from worker.serve.auth import ApiKeys, Caller, Denied, TokenBucket

KEY = "sk-test-0123456789abcdef"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def keys(clock=None, **key_fields) -> ApiKeys:
    fields = {"tenant": "acme", "key": KEY, **key_fields}
    settings = AuthSettings(enabled=True, keys={"acme-app": fields})
    return ApiKeys(settings, ["acme"], **({"clock": clock} if clock else {}))


def test_auth_off_lets_every_request_through_without_a_tenant() -> None:
    assert ApiKeys(AuthSettings()).check(None) == Caller(None, None)


def test_the_right_key_names_its_tenant() -> None:
    assert keys().check(f"Bearer {KEY}") == Caller("acme-app", "acme")
    assert keys().check(f"bearer   {KEY}  ") == Caller("acme-app", "acme")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", f"Basic {KEY}", "Bearer sk-wrong", f"Bearer {KEY}x"]
)
def test_a_missing_or_wrong_key_is_401(header: str | None) -> None:
    denied = keys().check(header)
    assert isinstance(denied, Denied) and denied.status == 401 and denied.reason == "unauthorized"
    assert KEY not in denied.message


def test_keys_come_from_a_file_or_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    assert keys(key=None, key_file=str(secret)).check(f"Bearer {KEY}") == Caller("acme-app", "acme")
    monkeypatch.setenv("MW_TEST_API_KEY", KEY)
    assert keys(key=None, key_env="MW_TEST_API_KEY").check(f"Bearer {KEY}") == Caller("acme-app", "acme")


def test_an_unreadable_key_source_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth.keys.acme-app.key_file"):
        keys(key=None, key_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="auth.keys.acme-app.key_env"):
        keys(key=None, key_env="MW_TEST_NOT_SET_ANYWHERE")
    with pytest.raises(ConfigError, match="at least 16"):
        keys(key="short")


def test_a_key_needs_exactly_one_source_and_a_configured_tenant() -> None:
    with pytest.raises(ConfigError, match="exactly one of key, key_env, key_file"):
        load_settings(None, auth={"enabled": True, "keys": {"k": {"tenant": "acme"}}})
    with pytest.raises(ConfigError, match="auth.keys.acme-app.tenant"):
        ApiKeys(AuthSettings(enabled=True, keys={"acme-app": {"tenant": "acme", "key": KEY}}), ["globex"])
    with pytest.raises(ConfigError, match="at least one entry in auth.keys"):
        ApiKeys(AuthSettings(enabled=True), ["acme"])
    with pytest.raises(ConfigError, match="not among tenants"):
        load_settings(
            None,
            tenants={"globex": {"policy": "default"}},
            auth={"keys": {"k": {"tenant": "acme", "key": KEY}}},
        )


def test_the_key_never_appears_in_the_printed_configuration() -> None:
    settings = load_settings(
        None,
        tenants={"acme": {"policy": "default"}},
        auth={"enabled": True, "keys": {"k": {"tenant": "acme", "key": KEY}}},
    )
    assert KEY not in str(settings.masked()) and KEY not in repr(settings)


def test_an_exhausted_budget_is_429_with_retry_after() -> None:
    clock = FakeClock()
    api = keys(clock, requests_per_second=0.5, burst=2)
    assert isinstance(api.check(f"Bearer {KEY}"), Caller)
    assert isinstance(api.check(f"Bearer {KEY}"), Caller)
    denied = api.check(f"Bearer {KEY}")
    assert isinstance(denied, Denied) and (denied.status, denied.reason, denied.retry_after_s) == (
        429,
        "rate_limited",
        2,
    )
    clock.now += 2.0
    assert isinstance(api.check(f"Bearer {KEY}"), Caller)


def test_token_bucket_refills_at_its_rate_up_to_its_size() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)
    clock.now += 60
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0] and bucket.take() > 0
