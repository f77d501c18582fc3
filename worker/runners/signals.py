"""SIGTERM and SIGINT mean "stop in order" for every entry point (one process, the Ray driver, Serve)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(on_stop: Callable[[], None], *, stage: str = "shutdown") -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT log one line and call ``on_stop``; the previous handlers come back after.

    Installed only on the main thread (Python delivers signals there; elsewhere the caller stops the work).
    Replaces Ray's own SIGTERM handler (installed by ``ray.init``: exit with a traceback) while it lasts.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s; stopping in order", signal.Signals(signum).name, extra={"stage": stage})
        on_stop()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
