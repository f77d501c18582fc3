"""``moderation-worker run``: one worker process — logs, signals, ops endpoint, engine, pipeline."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from worker.config import Settings
from worker.runners.signals import stop_on_signals

if TYPE_CHECKING:
    from worker.stream.pipeline import StreamPipeline

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> int:
    """Run one stream pipeline until SIGTERM/SIGINT, drain it, and return the exit status (0 = clean)."""
    from worker.ops.logs import configure_logging
    from worker.ops.preflight import check_redis
    from worker.stream.pipeline import StreamPipeline

    configure_logging(settings.logging, worker="worker")
    check_redis(settings)  # optional: one warning saying the worker runs uncached, never a stop
    pipeline = StreamPipeline(settings, worker_name="worker")
    stop_requested = threading.Event()

    def on_stop() -> None:
        stop_requested.set()
        pipeline.request_stop()

    with stop_on_signals(on_stop, stage="stop"):
        return _serve_pipeline(settings, pipeline, stop_requested)


def _serve_pipeline(settings: Settings, pipeline: StreamPipeline, stop_requested: threading.Event) -> int:
    """Ops endpoint, models, output topics, then the pipeline's loop on its own thread; the exit status."""
    from worker.engine.loading import ModelLoadError
    from worker.ops.health import OpsServer
    from worker.stream.kafka_clients import ensure_topics
    from worker.stream.publisher import output_topics

    ops = None
    try:
        if settings.ops.port:
            ops = OpsServer(
                settings.ops.host, settings.ops.port, ready=lambda: pipeline.ready, status=pipeline.status
            )
            ops.start()
        pipeline.load_models()  # before the loop starts: a load failure is one clear line (exit 2)
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
    return 0
