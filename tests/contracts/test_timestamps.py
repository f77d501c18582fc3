"""``utc_now_rfc3339``: the cached-per-second formatting writes exactly what ``datetime.isoformat`` writes."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from worker.contracts.dead_letters import utc_now_rfc3339


def reference(now_ns: int) -> str:
    seconds, nanos = divmod(now_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(st.integers(min_value=0, max_value=4_102_444_799_999_999_999))
def test_any_instant_is_formatted_like_isoformat_with_milliseconds_truncated(now_ns: int) -> None:
    assert utc_now_rfc3339(now_ns) == reference(now_ns)


def test_instants_within_one_second_share_the_cached_prefix_and_differ_in_milliseconds() -> None:
    base = 1_796_134_400 * 1_000_000_000
    assert utc_now_rfc3339(base) == "2026-12-01T14:13:20.000Z"
    assert utc_now_rfc3339(base + 999_999_999) == "2026-12-01T14:13:20.999Z"
    assert utc_now_rfc3339(base + 1_000_000_000) == "2026-12-01T14:13:21.000Z"
    assert utc_now_rfc3339(base + 5_000_000) == "2026-12-01T14:13:20.005Z"  # back to an earlier second


def test_now_is_a_parseable_utc_timestamp() -> None:
    parsed = datetime.fromisoformat(utc_now_rfc3339())
    assert parsed.tzinfo is not None and abs((datetime.now(UTC) - parsed).total_seconds()) < 5
