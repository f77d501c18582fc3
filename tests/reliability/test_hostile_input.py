"""Hostile input: fuzzed record bytes and JSON shapes never escape as exceptions, and through the real
pipeline every one of them ends as a verdict or a dead letter."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.reliability.accounting import env_int, report, wait_until_answered
from tests.reliability.hostile import records
from tests.stream.streaming import WorkerThread, produce
from worker.config import load_settings
from worker.contracts.decode import decode_event
from worker.contracts.events import ChatEvent
from worker.contracts.rejections import Reason, Rejection

FUZZ_CASES = env_int("MW_FUZZ_CASES", 1500)
PIPELINE_FUZZ_RECORDS = env_int("MW_PIPELINE_FUZZ_RECORDS", 1000)
_SETTINGS = load_settings()


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=records)
def test_decode_never_raises_and_every_rejection_has_a_reason_and_a_sentence(raw: bytes) -> None:
    result = decode_event(raw, _SETTINGS)
    assert isinstance(result, ChatEvent | Rejection)
    if isinstance(result, Rejection):
        assert result.reason in set(Reason)
        assert len(result.message.strip()) > 10, result
    else:
        assert result.turns and result.turns[0].role == "user"


def _draw_records(n: int) -> list[bytes]:
    """``n`` diverse hostile records from Hypothesis's generation phase (deterministic seed)."""
    drawn: list[bytes] = []

    @seed(20261123)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(raw=records)
    def collect(raw: bytes) -> None:
        drawn.append(raw)

    collect()
    return drawn


def test_fuzzed_stream_through_the_real_pipeline_ends_in_verdicts_or_dead_letters(
    make_settings, guard_engine, reliability_figures
) -> None:
    batch = _draw_records(PIPELINE_FUZZ_RECORDS)
    assert len(batch) >= PIPELINE_FUZZ_RECORDS * 0.9
    s = make_settings(redis__enabled=False)
    produce(s, [(None, raw) for raw in batch])
    worker = WorkerThread(s, guard_engine, name="fuzz").start()
    try:
        result = wait_until_answered(s, len(batch), timeout_s=300)
    finally:
        worker.stop(timeout_s=60)
    assert worker.error is None, worker.error
    assert result.lost == [], f"{len(result.lost)} fuzzed records got no verdict and no dead letter"
    assert result.verdicts > 0 and result.dead_letters > 0, result.line()  # both paths exercised
    report(
        reliability_figures,
        f"hostile records through the pipeline: {result.line()} (+{FUZZ_CASES} decode-only fuzz cases)",
    )
