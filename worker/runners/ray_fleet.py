"""The Ray driver: start one GuardWorker actor per GPU, supervise them, drain them on SIGTERM.

``run_on_ray(settings)`` is ``moderation-worker run --ray``. ``WorkerFleet`` is the reusable part:
start the actors, poll their status (with timeouts, never a blocking ``ray.get``), notice restarts
(a new ``incarnation`` id) and failed pipelines (restarted through Ray), and stop them gracefully.

Autoscaling on lag (``ray.autoscale``): every ``ray.autoscale_interval_s`` the driver sums the actors'
``mw_consumer_lag`` and in-flight events (each reports its own in ``status()``) and ``LagScaler`` plans the actor
count: out at once to ``ceil(lag / lag_per_worker)``, in one actor at a time once the lag has called for
fewer for ``scale_in_after_s``; always within ``[min_workers, max_workers]`` and never beyond the events
topic's partitions (an actor without a partition only holds a GPU). Scaling in drains the actor like
SIGTERM does (in-flight batches published and committed, consumer closed) before it is killed, so its
partitions move without a burst of duplicates. New actors wait for a GPU; on KubeRay the Ray autoscaler
adds a GPU pod for them and removes the pod an actor left once it is idle.

Deployment shapes (``worker.moderation.routing``): co-located — one group of actors, each holding every routed model;
split pools (``pools`` configured) — one group of actors per pool, each group sized and given GPUs on its
own (``pools.<name>.num_workers`` / ``num_gpus_per_worker``) and consuming in its pool's consumer group, so
the pools scale independently. ``pool: <name>`` limits a driver to one pool (one driver per pool).

Only control calls cross the Ray boundary (status, ready, stop: a few per second in all); events
flow from Kafka into each actor's own consumer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.config import Settings
from worker.runners.ray_actor import remote_guard_worker
from worker.runners.ray_env import init_ray, settings_payload
from worker.runners.signals import stop_on_signals

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 2.0  # supervision period of run_on_ray
STATUS_TIMEOUT_S = 10.0  # one status round; an actor loading its model still answers (threaded actor)
STOP_MARGIN_S = 10.0  # on top of the drain deadline, for the actor call itself
RESTART_BACKOFF_BASE_S = 2.0  # a pipeline that keeps failing is restarted after 2, 4, 8 ... s
RESTART_BACKOFF_MAX_S = 120.0  # never a tight crash loop (e.g. a bad model path)


@dataclass
class WorkerSlot:
    """What the driver knows about one actor: its handle and its last answer."""

    index: int
    actor: Any
    pool: str | None = None
    incarnation: str | None = None
    restarts_seen: int = 0
    ready: bool = False
    reachable: bool = False
    status: dict[str, Any] = field(default_factory=dict)
    consecutive_failures: int = 0
    next_restart_at: float = 0.0  # monotonic time before which a failed pipeline is left alone

    def restart_delay(self) -> float:
        """Backoff before the next restart of a pipeline that failed ``consecutive_failures`` times."""
        exponent = max(0, self.consecutive_failures - 1)
        return min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_BASE_S * 2**exponent)


def planned_worker_count(settings: Settings, cluster_gpus: float) -> tuple[int, float]:
    """How many workers to start and the GPUs each gets.

    ``ray.num_workers`` when set; else one per ``ray.num_gpus_per_worker`` of the cluster's GPUs;
    with no GPU at all, one CPU worker (``num_gpus_per_worker`` 0) so the stream still runs.
    """
    per_worker = settings.ray.num_gpus_per_worker
    if cluster_gpus <= 0:
        return settings.ray.num_workers or 1, 0.0
    if settings.ray.num_workers is not None:
        return settings.ray.num_workers, per_worker
    if per_worker <= 0:
        return 1, 0.0
    return max(1, int(cluster_gpus // per_worker)), per_worker


@dataclass
class LagScaler:
    """Plans the actor count from the consumer group's lag (pure: no Ray, no Kafka; see the module docstring)."""

    min_workers: int
    max_workers: int
    lag_per_worker: int
    scale_in_after_s: float
    _low_since: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LagScaler:
        """The scaler ``ray.autoscale`` describes."""
        ray_settings = settings.ray
        return cls(
            ray_settings.min_workers,
            ray_settings.max_workers,
            ray_settings.lag_per_worker,
            ray_settings.scale_in_after_s,
        )

    def bounds(self, partitions: int) -> tuple[int, int]:
        """(fewest, most) actors: ``[min_workers, max_workers]`` capped at ``partitions`` (when known, > 0)."""
        upper = min(self.max_workers, partitions) if partitions > 0 else self.max_workers
        upper = max(1, upper)
        return min(self.min_workers, upper), upper

    def plan(self, current: int, lag: int, partitions: int, now: float) -> int:
        """The actor count to run now, given ``current`` actors, the group's ``lag`` and the topic's partitions."""
        lower, upper = self.bounds(partitions)
        wanted = min(max(math.ceil(max(0, lag) / self.lag_per_worker), lower), upper)
        if current > upper:  # partitions or max_workers shrank: idle actors go at once
            self._low_since = None
            return upper
        if wanted >= current:
            self._low_since = None
            return wanted
        if self._low_since is None:
            self._low_since = now
        if now - self._low_since >= self.scale_in_after_s:
            self._low_since = now  # the next step in needs another quiet period
            return current - 1
        return current


def topic_partitions(settings: Settings) -> int:
    """Partitions of ``topics.events`` (0 when the topic or its metadata is not there yet)."""
    from worker.stream.kafka_clients import make_consumer

    consumer = make_consumer(settings, enable_auto_commit=False)
    try:
        return len(consumer.partitions_for_topic(settings.topics.events) or ())
    finally:
        consumer.close(autocommit=False)


class WorkerFleet:
    """The GuardWorker actors of one driver. Call ``start()``, then ``poll()`` periodically, then ``stop()``.

    With ``ray.autoscale``, call ``autoscale()`` as well (``run_on_ray`` does, every
    ``ray.autoscale_interval_s``); ``scale_to(n)`` adds actors or drains the newest ones.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.model_copy(deep=True)
        self.slots: list[WorkerSlot] = []
        self._all_ready_logged = False
        self._actor_class: Any = None
        self._payload: dict[str, Any] = {}
        self._next_index = 0
        self.scaler = LagScaler.from_settings(self.settings) if self.settings.ray.autoscale else None
        self.drained: list[dict[str, Any]] = []  # final statuses of actors removed by scaling in

    def start(self) -> None:
        """Create the actors (Ray places them on GPUs; their pipelines start loading at once).

        One group of actors, or one group per pool when pools are configured (see the module docstring).
        """
        import ray

        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        groups = self.groups()
        if groups[0][0] is not None:
            self._start_pools(groups, cluster_gpus)
            return
        count, gpus_each = planned_worker_count(self.settings, cluster_gpus)
        if self.scaler is not None:
            lower, upper = self.scaler.bounds(0)
            count = min(max(count, lower), upper)
        self.settings.ray.num_gpus_per_worker = gpus_each
        actor_class = remote_guard_worker(self.settings)
        payload = settings_payload(self.settings)
        self._actor_class, self._payload = actor_class, payload
        log.info(
            "starting %d guard workers (%.2f GPU each, cluster GPUs %.0f)",
            count,
            gpus_each,
            cluster_gpus,
            extra={"stage": "ray_driver"},
        )
        if count * gpus_each > cluster_gpus:
            log.warning(
                "%d workers x %.2f GPU exceed the cluster's %.0f GPUs: some wait until GPUs join",
                count,
                gpus_each,
                cluster_gpus,
                extra={"stage": "ray_driver"},
            )
        self.slots = [WorkerSlot(i, actor_class.remote(payload, i)) for i in range(count)]
        self._next_index = count
        self._publish_metrics()

    def _start_pools(self, groups: list[tuple[str | None, Settings]], cluster_gpus: float) -> None:
        """Split pools: one group of actors per pool, each sized and given GPUs by its pool's settings."""
        if self.scaler is not None:
            log.warning(
                "ray.autoscale applies to co-located workers; pools keep their sizes",
                extra={"stage": "ray_driver"},
            )
            self.scaler = None
        self.slots = []
        for pool, group_settings in groups:
            count, gpus_each = planned_worker_count(group_settings, cluster_gpus)
            group_settings.ray.num_gpus_per_worker = gpus_each
            actor_class = remote_guard_worker(group_settings)
            payload = settings_payload(group_settings)
            log.info(
                "starting %d guard workers of pool %s (%.2f GPU each, cluster GPUs %.0f)",
                count,
                pool,
                gpus_each,
                cluster_gpus,
                extra={"stage": "ray_driver", "pool": pool},
            )
            first = len(self.slots)
            self.slots.extend(
                WorkerSlot(first + i, actor_class.remote(payload, first + i), pool) for i in range(count)
            )
        self._next_index = len(self.slots)
        self._publish_metrics()

    def groups(self) -> list[tuple[str | None, Settings]]:
        """(pool, settings) of every actor group: one per pool (or the driver's one pool), else one."""
        from worker.moderation.routing import settings_for_pool

        if not self.settings.pools:
            return [(None, self.settings)]
        names = [self.settings.pool] if self.settings.pool is not None else list(self.settings.pools)
        groups = []
        for name in names:
            pool = self.settings.pools[name]
            group = settings_for_pool(self.settings, name)
            if pool.num_workers is not None:
                group.ray.num_workers = pool.num_workers
            if pool.num_gpus_per_worker is not None:
                group.ray.num_gpus_per_worker = pool.num_gpus_per_worker
            groups.append((name, group))
        return groups

    def group_lag(self) -> int:
        """Records the group has not finished, as the actors last reported them: their partitions'
        ``mw_consumer_lag`` plus their in-flight events (fetched, not yet committed). Lag alone drops to 0
        as soon as a backlog is fetched into memory, long before it is moderated."""
        return sum(
            int(slot.status.get("lag") or 0) + int(slot.status.get("in_flight") or 0)
            for slot in self.slots
            if slot.reachable
        )

    def scale_to(self, count: int, drain_deadline_s: float | None = None) -> None:
        """Run ``count`` actors: start new ones, or drain the newest ones (gracefully, like ``stop``) and end them."""
        import ray

        count = max(1, count)
        while len(self.slots) < count:
            index = self._next_index
            self._next_index += 1
            self.slots.append(WorkerSlot(index, self._actor_class.remote(self._payload, index)))
            self._all_ready_logged = False
            log.info("scaling out: started guard worker %d", index, extra={"stage": "ray_driver"})
        if len(self.slots) > count:
            leaving, self.slots = self.slots[count:], self.slots[:count]
            deadline_s = (
                self.settings.shutdown.drain_timeout_s if drain_deadline_s is None else drain_deadline_s
            )
            refs = {slot.actor.stop.remote(deadline_s): slot for slot in leaving}
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=deadline_s + STOP_MARGIN_S)
            for ref, slot in refs.items():
                final: dict[str, Any] = {"worker_index": slot.index, "drained": False}
                if ref in done:
                    try:
                        final = ray.get(ref, timeout=1.0)
                    except (ray.exceptions.RayError, TimeoutError) as exc:
                        log.warning(
                            "guard worker %d failed while draining: %s", slot.index, type(exc).__name__
                        )
                ray.kill(slot.actor, no_restart=True)
                self.drained.append(final)
                log.info(
                    "scaling in: guard worker %d drained=%s",
                    slot.index,
                    final.get("drained"),
                    extra={"stage": "ray_driver"},
                )
        self._publish_metrics()

    def autoscale(self, now: float | None = None, partitions: int | None = None) -> int:
        """One autoscaling step from the actors' last reported lag; returns the actor count now running."""
        if self.scaler is None:
            return len(self.slots)
        from worker.ops import metrics

        lag = self.group_lag()
        metrics.GROUP_LAG.set(lag)
        partitions = topic_partitions(self.settings) if partitions is None else partitions
        now = time.monotonic() if now is None else now
        wanted = self.scaler.plan(len(self.slots), lag, partitions, now)
        if wanted != len(self.slots):
            log.info(
                "autoscaling %d -> %d guard workers (group lag %d, %d partitions)",
                len(self.slots),
                wanted,
                lag,
                partitions,
                extra={"stage": "ray_driver", "reason": "autoscale"},
            )
            self.scale_to(wanted)
        return len(self.slots)

    @property
    def restarts_seen(self) -> int:
        """Actor restarts the driver noticed (a worker answering with a new incarnation)."""
        return sum(s.restarts_seen for s in self.slots)

    def all_ready(self) -> bool:
        """True when every worker answered its last poll as ready."""
        return bool(self.slots) and all(s.ready for s in self.slots)

    def alive_count(self) -> int:
        """Workers that answered their last poll."""
        return sum(s.reachable for s in self.slots)

    def poll(self, timeout_s: float = STATUS_TIMEOUT_S) -> list[dict[str, Any]]:
        """Ask every worker for its status at once (bounded by ``timeout_s``); log changes; heal failures.

        Returns the statuses that arrived. A worker that does not answer is marked unreachable (Ray is
        restarting it, or it is busy starting); one whose pipeline failed is killed with restart allowed.
        """
        import ray

        refs = {slot.actor.status.remote(): slot for slot in self.slots}
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            ray.cancel(ref)
        answered = []
        for ref, slot in refs.items():
            if ref not in done:
                self._mark_unreachable(slot, f"no answer within {timeout_s:.1f}s")
                continue
            try:
                status = ray.get(ref, timeout=1.0)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                self._mark_unreachable(slot, type(exc).__name__)
                continue
            self._record(slot, status)
            answered.append(status)
        self._publish_metrics()
        if self.all_ready() and not self._all_ready_logged:
            log.info("all %d guard workers ready", len(self.slots), extra={"stage": "ray_driver"})
            self._all_ready_logged = True
        return answered

    def _mark_unreachable(self, slot: WorkerSlot, why: str) -> None:
        if slot.reachable:
            log.warning("guard worker %d unreachable: %s", slot.index, why, extra={"stage": "ray_driver"})
        slot.reachable = False
        slot.ready = False
        self._all_ready_logged = False

    def _record(self, slot: WorkerSlot, status: dict[str, Any]) -> None:
        incarnation = status.get("incarnation")
        if slot.incarnation is not None and incarnation != slot.incarnation:
            slot.restarts_seen += 1
            self._all_ready_logged = False
            log.warning(
                "guard worker %d restarted (incarnation %s -> %s)",
                slot.index,
                slot.incarnation,
                incarnation,
                extra={"stage": "ray_driver", "reason": "actor_restarted"},
            )
        if not slot.reachable:
            log.info(
                "guard worker %d reachable: gpu_ids=%s device=%s pid=%s",
                slot.index,
                status.get("gpu_ids"),
                status.get("device"),
                status.get("pid"),
                extra={"stage": "ray_driver"},
            )
        ready = bool(status.get("ready"))
        if ready != slot.ready:
            log.info(
                "guard worker %d %s: model_loaded=%s partitions=%s",
                slot.index,
                "ready" if ready else "not ready",
                status.get("model_loaded"),
                _partitions_of(status),
                extra={"stage": "ray_driver"},
            )
        slot.incarnation, slot.reachable, slot.ready, slot.status = incarnation, True, ready, status
        if ready:
            slot.consecutive_failures = 0
        if status.get("failed") and not status.get("stopped"):
            # The pipeline thread died but the process lives: restart the whole actor through Ray
            # (max_restarts), which gives the worker a fresh consumer, engine and incarnation — after a
            # backoff that grows with consecutive failures, so a permanent fault is not a crash loop.
            now = time.monotonic()
            if now < slot.next_restart_at:
                return
            import ray

            slot.consecutive_failures += 1
            delay = slot.restart_delay()
            slot.next_restart_at = now + delay
            log.error(
                "guard worker %d pipeline failed (%s); restarting the actor (failure %d; next restart no sooner "
                "than %.0fs)",
                slot.index,
                status.get("failed"),
                slot.consecutive_failures,
                delay,
                extra={"stage": "ray_driver", "reason": "pipeline_failed"},
            )
            ray.kill(slot.actor, no_restart=False)
            slot.reachable = slot.ready = False

    def _publish_metrics(self) -> None:
        from worker.ops import metrics

        metrics.RAY_WORKERS_ALIVE.set(self.alive_count())
        metrics.RAY_WORKERS_DESIRED.set(len(self.slots))

    def wait_ready(self, timeout_s: float, poll_interval_s: float = 0.5) -> bool:
        """Poll until every worker is ready (model loaded, partitions assigned) or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(timeout_s=min(STATUS_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
            if self.all_ready():
                return True
            time.sleep(poll_interval_s)
        return False

    def stop(self, deadline_s: float | None = None) -> list[dict[str, Any]]:
        """Drain every worker in parallel within ``deadline_s`` (default ``shutdown.drain_timeout_s``), then end them.

        Returns the final statuses that arrived in time (each with ``drained``).
        """
        import ray

        deadline_s = self.settings.shutdown.drain_timeout_s if deadline_s is None else deadline_s
        log.info(
            "stopping %d guard workers (deadline %.1fs)",
            len(self.slots),
            deadline_s,
            extra={"stage": "ray_driver"},
        )
        refs = [slot.actor.stop.remote(deadline_s) for slot in self.slots]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=deadline_s + STOP_MARGIN_S)
        finals: list[dict[str, Any]] = []
        for ref in done:
            try:
                finals.append(ray.get(ref, timeout=1.0))
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.warning("a guard worker failed while stopping: %s", type(exc).__name__)
        for final in finals:
            log.info(
                "guard worker %s stopped (drained=%s)",
                final.get("worker_index"),
                final.get("drained"),
                extra={"stage": "ray_driver"},
            )
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        self.slots = []
        self._publish_metrics()
        return finals


def _partitions_of(status: dict[str, Any]) -> Any:
    for key in ("assigned_partitions", "assigned", "partitions"):
        if key in status:
            return status[key]
    return None


def run_on_ray(settings: Settings) -> int:
    """``moderation-worker run --ray``: run the stream as GuardWorker actors until SIGTERM/SIGINT; exit 0.

    Joins ``ray.address`` / ``$RAY_ADDRESS`` or starts a local instance on 127.0.0.1; starts one
    worker per GPU (``ray.num_workers`` overrides); logs readiness and restarts; on a signal, drains
    every actor within ``shutdown.drain_timeout_s``. The driver's own ``/metrics`` and ``/readyz``
    (ready = all workers ready) are on ``ops.host:ops.port`` unless the port is 0.
    """
    from worker.ops.logs import configure_logging

    configure_logging(settings.logging, worker="ray-driver")
    started_local = init_ray(settings)
    # After ray.init: Ray's core installs its own SIGTERM handler (log and die), ours must replace it.
    stop_requested = threading.Event()
    fleet = WorkerFleet(settings)
    ops = None
    with stop_on_signals(stop_requested.set), _shutdown_ray_after(started_local):
        try:
            fleet.start()
            ops = _start_driver_ops(settings, fleet)
            next_scale = time.monotonic() + settings.ray.autoscale_interval_s
            while not stop_requested.is_set():
                fleet.poll()
                if fleet.scaler is not None and time.monotonic() >= next_scale:
                    try:
                        fleet.autoscale()
                    except Exception:  # a failed plan (e.g. broker metadata timeout) must not stop the stream
                        log.exception("autoscaling step failed", extra={"stage": "ray_driver"})
                    next_scale = time.monotonic() + settings.ray.autoscale_interval_s
                stop_requested.wait(POLL_INTERVAL_S)
            log.info("stop requested; draining guard workers", extra={"stage": "shutdown"})
        finally:
            if fleet.slots:
                fleet.stop()
            if ops is not None:
                ops.stop()
    return 0


def _start_driver_ops(settings: Settings, fleet: WorkerFleet) -> Any:
    if settings.ops.port == 0:
        return None
    from worker.ops.health import OpsServer

    def summary() -> dict[str, Any]:
        return {
            "workers": len(fleet.slots),
            "ready": sum(s.ready for s in fleet.slots),
            "restarts_seen": fleet.restarts_seen,
        }

    from worker.ops.metrics import DRIVER_REGISTRY

    return OpsServer(
        settings.ops.host,
        settings.ops.port,
        ready=fleet.all_ready,
        status=summary,
        registry=DRIVER_REGISTRY,
    ).start()


@contextmanager
def _shutdown_ray_after(started_local: bool) -> Iterator[None]:
    """Shut down the Ray instance this process started (a joined cluster is left running)."""
    try:
        yield
    finally:
        if started_local:
            import ray

            ray.shutdown()


# --- the demo's entry points ----------------------------------------------------------------------


def start_local_workers(
    settings: Settings, *, poll_interval_s: float = POLL_INTERVAL_S
) -> Callable[[], None]:
    """Start GuardWorker actors (joining or starting Ray like ``run_on_ray``) and supervise them in a thread.

    Returns ``stop()``: drains the actors within ``shutdown.drain_timeout_s`` and shuts down a local
    Ray instance this call started. Does not wait for readiness (the caller watches its outputs).
    """
    started_local = init_ray(settings)
    fleet = WorkerFleet(settings)
    fleet.start()
    stop_requested = threading.Event()

    def supervise() -> None:
        while not stop_requested.wait(poll_interval_s):
            try:
                fleet.poll()
            except Exception:  # supervision must outlive a failed round; the next one retries
                log.exception("supervision round failed", extra={"stage": "ray_driver"})

    supervisor = threading.Thread(target=supervise, name="ray-supervisor", daemon=True)
    supervisor.start()

    def stop() -> None:
        stop_requested.set()
        supervisor.join(timeout=STATUS_TIMEOUT_S + poll_interval_s)
        try:
            fleet.stop()
        finally:
            if started_local:
                import ray

                ray.shutdown()

    return stop
