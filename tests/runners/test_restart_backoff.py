"""A pipeline that keeps failing is restarted with a growing delay, never in a tight loop."""

from worker.runners.ray_fleet import RESTART_BACKOFF_MAX_S, WorkerSlot


def test_restart_delay_doubles_and_is_capped():
    slot = WorkerSlot(index=0, actor=None)
    delays = []
    for failures in range(1, 10):
        slot.consecutive_failures = failures
        delays.append(slot.restart_delay())
    assert delays[:4] == [2.0, 4.0, 8.0, 16.0]
    assert max(delays) == RESTART_BACKOFF_MAX_S
    assert all(b >= a for a, b in zip(delays, delays[1:]))
