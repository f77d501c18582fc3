"""``moderation-worker run``: one worker process — logs, signals, ops endpoint, engine, pipeline."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from worker.config import Settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    """Run one stream pipeline until SIGTERM/SIGINT, drain it, and return the exit status (0 = clean)."""
    from worker.engine.engine import GuardEngine
    from worker.engine.loading import ModelLoadError
    from worker.ops import metrics
    from worker.ops.health import OpsServer
    from worker.ops.logs import configure_logging
    from worker.ops.preflight import check_redis
    from worker.stream.kafka_clients import ensure_topics
    from worker.stream.pipeline import StreamPipeline
    from worker.stream.publisher import output_topics

    configure_logging(settings.logging, worker="worker")
    check_redis(settings)  # optional: one warning saying the worker runs uncached, never a stop
    pipeline = StreamPipeline(settings, worker_name="worker")
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; draining", signal.Signals(signum).name, extra={"stage": "stop"})
        stop_requested.set()
        pipeline.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    ops = None
    try:
        if settings.ops.port:
            ops = OpsServer(
                settings.ops.host, settings.ops.port, ready=lambda: pipeline.ready, status=pipeline.status
            )
            ops.start()
        engine = GuardEngine.from_settings(settings)
        metrics.MODEL_LOAD_SECONDS.set(engine.load_seconds)
        pipeline.engine = engine
        ensure_topics(settings, output_topics(settings.topics))
        if stop_requested.is_set():
            return 0
        # The loop runs in its own thread: measured here, torch's CPU kernels ran up to 20x slower on the
        # main thread of a busy machine than on a fresh one; the main thread only waits and takes signals.
        failure: list[BaseException] = []

        def loop() -> None:
            try:
                pipeline.run()
            except BaseException as exc:  # noqa: BLE001 — re-raised on the main thread below
                failure.append(exc)

        thread = threading.Thread(target=loop, name="pipeline", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
        if failure:
            raise failure[0]
    except ModelLoadError as exc:  # a configuration fault, not a bug: one clear line, no traceback
        log.error("cannot load the model: %s", exc, extra={"stage": "load", "reason": "model_load_failed"})
        return 2
    except Exception:
        log.exception("worker failed", extra={"stage": "run"})
        return 1
    finally:
        if ops is not None:
            ops.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
