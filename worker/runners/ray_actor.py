"""GuardWorker: one stream pipeline per GPU, as a plain class that Ray wraps into an actor.

The class runs ``StreamPipeline`` (its own Kafka consumer in the shared group, its own engine) in a
thread, so the actor keeps answering ``ready()`` / ``status()`` / ``stop()`` while the pipeline works.
Events never cross the Ray boundary: the actor pulls them from Kafka itself; Ray only places it on a
GPU and restarts it when it dies (its consumer then rejoins the group and Kafka rebalances).

``remote_guard_worker(settings)`` builds the Ray actor class lazily, with resources and restart
policy from ``settings.ray``, so this module imports without Ray and the class is unit-testable alone.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from worker.config import Settings
from worker.runners.ray_env import settings_from_payload
from worker.stream.status import PipelineStatus

log = logging.getLogger(__name__)


def inside_ray_actor() -> bool:
    """True in a Ray actor process (not in a driver, even one with Ray initialised, nor without Ray)."""
    ray = sys.modules.get("ray")  # never import it here: that would fix its environment too early
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def assigned_gpu_ids() -> list[str]:
    """GPU ids Ray assigned to this actor (``ray.get_gpu_ids()``), else those in ``CUDA_VISIBLE_DEVICES``."""
    if inside_ray_actor():
        return [str(g) for g in sys.modules["ray"].get_gpu_ids()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [g for g in visible.split(",") if g] if visible else []


def worker_device(gpu_ids: list[str], cuda_available: bool) -> str:
    """The engine's device: ``cuda:0`` when Ray gave us a GPU that torch can see, else ``cpu``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the assigned GPU, so inside the actor that GPU is always
    ``cuda:0``. Fake GPUs (``ray.init(num_gpus=N)`` on a CPU box) give ids but no CUDA: CPU then.
    """
    return "cuda:0" if gpu_ids and cuda_available else "cpu"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One actor's answer to the driver: its identity, its pipeline's status, and how it stopped.

    ``pipeline`` is None when the pipeline could not report (``status_error`` says why) or when the actor did
    not answer at all (``unanswered``). ``as_dict()`` is the flat JSON shape the driver logs.
    """

    worker_index: int
    worker: str | None = None
    pool: str | None = None
    incarnation: str | None = None
    pid: int | None = None
    started_at: float | None = None
    gpu_ids: tuple[str, ...] = ()
    device: str | None = None
    ready: bool = False
    running: bool = False
    failed: str | None = None  # why the pipeline thread died (None while it runs)
    stopped: bool = False
    ops_port: int | None = None
    lag: int = 0  # this actor's partitions' mw_consumer_lag
    pipeline: PipelineStatus | None = None
    status_error: str | None = None
    drained: bool | None = None  # set by stop(): whether the pipeline drained within the deadline

    @classmethod
    def unanswered(cls, worker_index: int) -> WorkerStatus:
        """What the driver records for an actor that did not answer its stop in time."""
        return cls(worker_index, drained=False)

    @property
    def model_loaded(self) -> bool:
        return self.pipeline is not None and self.pipeline.model_loaded

    @property
    def in_flight(self) -> int:
        return self.pipeline.in_flight if self.pipeline is not None else 0

    @property
    def assigned(self) -> tuple[str, ...]:
        return self.pipeline.assigned if self.pipeline is not None else ()

    @property
    def counters(self) -> dict[str, int]:
        return self.pipeline.counters if self.pipeline is not None else {}

    def not_ready_reason(self) -> str:
        """Why the actor is not ready (its pipeline's reason, or that it failed or cannot report)."""
        if self.failed:
            return "pipeline_failed"
        return self.pipeline.not_ready_reason() if self.pipeline is not None else "not_ready"

    def as_dict(self) -> dict[str, Any]:
        """The flat JSON shape: the pipeline's status, then the actor's identity over it."""
        body: dict[str, Any] = (
            self.pipeline.as_dict() if self.pipeline is not None else {"status_error": self.status_error}
        )
        body.update(
            worker=self.worker,
            worker_index=self.worker_index,
            pool=self.pool,
            incarnation=self.incarnation,
            pid=self.pid,
            started_at=self.started_at,
            gpu_ids=list(self.gpu_ids),
            device=self.device,
            ready=self.ready,
            running=self.running,
            failed=self.failed,
            stopped=self.stopped,
            ops_port=self.ops_port,
            lag=self.lag,
        )
        if self.drained is not None:
            body["drained"] = self.drained
        return body


class GuardWorker:
    """Runs one ``StreamPipeline`` in a background thread; the methods are what the Ray driver calls.

    ``settings`` is the driver's resolved settings (``settings_payload(settings)`` or a ``Settings``);
    the process's own ``MW_*`` environment does not override it. ``worker_index`` names the worker in
    logs and status. Each instance has an ``incarnation`` id: a new one after every (re)start, which
    is how the driver notices that Ray restarted the actor.
    """

    def __init__(self, settings: dict[str, Any] | Settings, worker_index: int = 0) -> None:
        self.settings = settings_from_payload(settings).model_copy(deep=True)
        self.worker_index = worker_index
        pool = self.settings.pool
        self.name = f"guard-worker-{pool}-{worker_index}" if pool else f"guard-worker-{worker_index}"
        if inside_ray_actor():  # the actor process is ours to configure; a host process configures itself
            from worker.ops.logs import configure_logging

            configure_logging(self.settings.logging, worker=self.name)
        self.incarnation = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.gpu_ids = assigned_gpu_ids()
        # Every model this worker holds goes to its GPU (co-located models share it).
        for model in {id(m): m for m in (self.settings.model, *self.settings.models.values())}.values():
            if model.device == "auto":
                model.device = worker_device(self.gpu_ids, _cuda_available())
                if self.gpu_ids and model.device == "cpu":
                    # Fake GPUs in tests; on a real GPU node this means a CPU-only torch wheel.
                    log.warning(
                        "GPU %s assigned but torch sees no CUDA; running on CPU", ",".join(self.gpu_ids)
                    )
        self._failure: str | None = None
        self._stopped = False
        from worker.stream.pipeline import StreamPipeline

        self.pipeline = StreamPipeline(self.settings, worker_name=self.name)
        if inside_ray_actor():
            # Ray's per-node metrics export port is what Prometheus scrapes; a per-actor port is not.
            from worker.ops.ray_export import export_to_ray

            export_to_ray(self.name)
        self._ops = self._start_ops_server()
        self._thread = threading.Thread(target=self._run_pipeline, name=f"{self.name}-pipeline", daemon=True)
        self._thread.start()
        log.info(
            "guard worker started",
            extra={
                "stage": "ray_worker",
                "worker": self.name,
                "incarnation": self.incarnation,
                "gpu_ids": ",".join(self.gpu_ids),
                "device": self.settings.model.device,
            },
        )

    def _start_ops_server(self) -> Any:
        """Per-actor /metrics, /healthz, /readyz on an ephemeral port (local debugging; Prometheus reads Ray's)."""
        if self.settings.ops.port == 0:
            return None
        from worker.ops.health import OpsServer

        try:
            return OpsServer(
                self.settings.ops.host, 0, ready=self.ready, live=self._live, status=self.pipeline.status
            ).start()
        except OSError as exc:  # metrics are optional; the stream must not die for them
            log.warning("ops endpoint not started: %s", type(exc).__name__, extra={"worker": self.name})
            return None

    def _run_pipeline(self) -> None:
        try:
            self.pipeline.run()
        except BaseException as exc:  # recorded for status(); the driver restarts a failed worker
            self._failure = f"{type(exc).__name__}: {exc}"
            log.exception("pipeline failed", extra={"stage": "ray_worker", "worker": self.name})

    def _live(self) -> bool:
        return self._failure is None

    def ready(self) -> bool:
        """True when the model is loaded and partitions are assigned (the pipeline's own readiness)."""
        return self._failure is None and bool(self.pipeline.ready)

    def status(self) -> WorkerStatus:
        """The pipeline's status (model loaded, partitions, counters, in flight) plus the actor's identity."""
        pipeline: PipelineStatus | None = None
        error = None
        try:
            pipeline = self.pipeline.status()
        except Exception as exc:  # noqa: BLE001 (status must answer even when the pipeline is in a bad state)
            error = type(exc).__name__
        return WorkerStatus(
            worker_index=self.worker_index,
            worker=self.name,
            pool=self.settings.pool,
            incarnation=self.incarnation,
            pid=os.getpid(),
            started_at=self.started_at,
            gpu_ids=tuple(self.gpu_ids),
            device=self.settings.model.device,
            ready=self.ready(),
            running=self._thread.is_alive(),
            failed=self._failure,
            stopped=self._stopped,
            ops_port=self._ops.port if self._ops is not None else None,
            lag=_own_lag(),
            pipeline=pipeline,
            status_error=error,
        )

    def stop(self, deadline_s: float | None = None) -> WorkerStatus:
        """Drain and stop the pipeline within ``deadline_s`` (default ``shutdown.drain_timeout_s``).

        The pipeline finishes in-flight batches, publishes, commits and closes its consumer, so the
        partitions move to the remaining workers without re-processing. A worker still starting (loading
        its model, connecting) has not joined the consumer group: it never will, and its stop is immediate
        and drained. Returns the final status.
        """
        deadline_s = self.settings.shutdown.drain_timeout_s if deadline_s is None else deadline_s
        if self.pipeline.request_stop():
            self._thread.join(timeout=max(0.0, deadline_s))
            drained = not self._thread.is_alive()
            if not drained:
                log.warning("pipeline did not stop within %.1fs", deadline_s, extra={"worker": self.name})
        else:
            # Still starting (loading the model, connecting): it never joined the consumer group, so it
            # holds no partition and no event. Its start-up ends on its own; nobody waits for it.
            drained = True
            log.info(
                "stopped before it joined the consumer group: nothing to drain", extra={"worker": self.name}
            )
        if self._ops is not None:
            self._ops.stop()
            self._ops = None
        from worker.ops.ray_export import stop_export

        stop_export()
        self._stopped = drained
        return replace(self.status(), drained=drained)


def _own_lag() -> int:
    """Sum of this process's ``mw_consumer_lag`` (one actor per process: its assigned partitions' lag)."""
    from worker.ops.metrics import CONSUMER_LAG

    return int(sum(s.value for family in CONSUMER_LAG.collect() for s in family.samples))


def remote_guard_worker(settings: Settings) -> Any:
    """The Ray actor class for ``GuardWorker`` with resources and restart policy from ``settings.ray``.

    ``num_cpus`` defaults to 0: a GPU actor otherwise holds a CPU for life, and on a small node the
    actors then starve every other task. ``max_concurrency`` lets ``status()`` answer while ``stop()``
    drains. ``max_task_retries=0``: a status call during a restart fails fast and the driver polls again.
    """
    import ray

    pool = settings.pools.get(settings.pool) if settings.pool is not None else None
    # A pool's actors land on the nodes that advertise its resource (the Helm chart: its own worker group).
    resources = {pool.ray_resource: 1} if pool is not None and pool.ray_resource else None
    return ray.remote(
        resources=resources,
        num_gpus=settings.ray.num_gpus_per_worker,
        num_cpus=settings.ray.num_cpus_per_worker,
        max_restarts=settings.ray.max_restarts,
        max_task_retries=0,
        max_concurrency=4,
    )(GuardWorker)
