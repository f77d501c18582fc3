"""The collector settles once per process after the models load (run in a fresh interpreter: it is process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_first_call_freezes_the_survivors_and_raises_the_young_threshold_and_later_calls_do_nothing() -> (
    None
):
    probe = textwrap.dedent(
        """
        import gc
        from worker.ops.heap import YOUNG_THRESHOLD, settle_after_load

        class Node:
            pass

        kept = [Node() for _ in range(1000)]
        cycle = Node(); cycle.me = cycle; del cycle  # garbage: collected, not frozen
        assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] == 700
        assert settle_after_load() is True
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept), frozen
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.collect() == 0  # nothing left to walk but what came after the freeze
        assert settle_after_load() is False and gc.get_freeze_count() == frozen
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
