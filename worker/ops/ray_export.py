"""Mirror the worker's Prometheus registry into Ray's metrics system (for GuardWorker actors under Ray).

Why a bridge: under Ray a pipeline runs inside an actor process with no stable port of its own, and a
node may host several actors (one per GPU). Ray already runs one metrics agent per node that Prometheus
scrapes (``--metrics-export-port``, 8080 on KubeRay pods). So each actor keeps using ``REGISTRY`` exactly
as ``moderation-worker run`` does, and a ``RayMetricsBridge`` thread copies it into ``ray.util.metrics``
every few seconds:

- counters: the increase since the last copy → ``Counter.inc`` (Ray exports ``<name>_total``); a series
  seen for the first time is sent even at 0, so pre-initialised series are exported from the start;
- gauges: the current value → ``Gauge.set``;
- histograms: per-bucket count increases → ``Histogram.observe`` of the bucket's midpoint, once per new
  observation, with the same bucket boundaries. Bucket counts (so ``histogram_quantile``) and ``_count``
  are exact; ``_sum`` is approximated by midpoints.

Ray's exporter prefixes every name with ``ray_`` and adds labels (``WorkerId``, ``NodeAddress``,
``SessionName``, ...). The Helm chart's PodMonitor renames ``ray_mw_(.*)`` back to ``mw_$1``
(``metricRelabelings``), so one Grafana dashboard serves both ``run`` and ``run --ray``.

``export_to_ray(worker)`` is what the GuardWorker actors and the Serve replicas call: one bridge per process,
started only inside a Ray worker process, tagged with the worker's name (``guard-worker-0``,
``serve-<replica>``) so every actor's series stays distinct on the node's export port.

The alternative (documented in docs/deployment.md) is an ``OpsServer`` per actor on its own port; it
needs per-actor scrape targets and is not what the chart does.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from worker.ops.metrics import NAMESPACE, REGISTRY

logger = logging.getLogger(__name__)

LabelKey = tuple[tuple[str, str], ...]


class MetricSink(Protocol):
    """Where mirrored values go; ``RaySink`` in production, a recorder in unit tests."""

    def inc(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Add ``value`` (> 0) to counter ``name``."""

    def set(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Set gauge ``name`` to ``value``."""

    def observe(
        self,
        name: str,
        doc: str,
        boundaries: list[float],
        labels: Mapping[str, str],
        value: float,
        count: int,
    ) -> None:
        """Observe ``value`` ``count`` times in histogram ``name`` with ``boundaries``."""


class RaySink:
    """Creates ``ray.util.metrics`` objects on first use and records into them (call inside a Ray worker)."""

    def __init__(self, constant_tags: Mapping[str, str] | None = None) -> None:
        self.constant_tags = dict(constant_tags or {})
        self._metrics: dict[str, Any] = {}

    def _metric(self, kind: str, name: str, doc: str, labels: Mapping[str, str], **kwargs: Any) -> Any:
        from ray.util import metrics as ray_metrics  # lazy: the plain `run` path must not import ray

        metric = self._metrics.get(name)
        if metric is None:
            tag_keys = tuple(sorted({*labels, *self.constant_tags}))
            cls = {
                "counter": ray_metrics.Counter,
                "gauge": ray_metrics.Gauge,
                "histogram": ray_metrics.Histogram,
            }
            metric = cls[kind](name, description=doc, tag_keys=tag_keys, **kwargs)
            if self.constant_tags:
                metric.set_default_tags(self.constant_tags)
            self._metrics[name] = metric
        return metric

    def inc(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Increment a Ray Counter (exported by Ray as ``ray_<name>_total``); 0 creates the series at 0."""
        metric = self._metric("counter", name, doc, labels)
        if value > 0:
            metric.inc(value, tags=dict(labels))
        else:
            # Counter.inc refuses 0, but a pre-initialised series must be exported from the start (rate()
            # and dashboard panels need it before the first increment): record 0 below the public check.
            metric._record(0.0, tags=dict(labels))

    def set(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        """Set a Ray Gauge."""
        self._metric("gauge", name, doc, labels).set(value, tags=dict(labels))

    def observe(
        self,
        name: str,
        doc: str,
        boundaries: list[float],
        labels: Mapping[str, str],
        value: float,
        count: int,
    ) -> None:
        """Observe into a Ray Histogram with our bucket boundaries."""
        metric = self._metric("histogram", name, doc, labels, boundaries=boundaries)
        tags = dict(labels)
        for _ in range(count):
            metric.observe(value, tags=tags)


def _label_key(labels: Mapping[str, str], drop: str | None = None) -> LabelKey:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


class RayMetricsBridge:
    """Copies ``registry``'s ``mw_*`` metrics into ``sink`` (default: Ray) every ``interval_s`` seconds.

    ``start()`` runs the copy in a daemon thread, ``stop()`` makes one last copy and ends it;
    ``mirror_once()`` copies now (tests, or a caller with its own loop). ``constant_tags`` (e.g.
    ``{"worker": "gpu-0"}``) are added to every Ray metric.
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        interval_s: float = 5.0,
        sink: MetricSink | None = None,
        constant_tags: Mapping[str, str] | None = None,
        prefix: str = f"{NAMESPACE}_",
    ) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.sink: MetricSink = sink if sink is not None else RaySink(constant_tags)
        self.prefix = prefix
        self._counters: dict[tuple[str, LabelKey], float] = {}
        self._buckets: dict[tuple[str, LabelKey], list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def mirror_once(self) -> None:
        """Copy every ``mw_*`` family once (thread-safe; never raises for a single bad family)."""
        with self._lock:
            for family in self.registry.collect():
                if not family.name.startswith(self.prefix):
                    continue
                try:
                    if family.type == "counter":
                        self._mirror_counter(family)
                    elif family.type == "gauge":
                        for sample in family.samples:
                            self.sink.set(family.name, family.documentation, sample.labels, sample.value)
                    elif family.type == "histogram":
                        self._mirror_histogram(family)
                except Exception:  # one failing family must not stop the others being exported
                    logger.exception("mirroring a metric into Ray failed", extra={"metric": family.name})

    def _mirror_counter(self, family: Any) -> None:
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # _created
            key = (family.name, _label_key(sample.labels))
            first = key not in self._counters
            delta = sample.value - self._counters.get(key, 0.0)
            self._counters[key] = sample.value
            if delta > 0 or first:  # first sight: send even 0, so the series exists from the start
                self.sink.inc(family.name, family.documentation, sample.labels, max(delta, 0.0))

    def _mirror_histogram(self, family: Any) -> None:
        # Cumulative bucket counts per label set, in exposition order (ascending ``le``).
        series: dict[LabelKey, list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                series.setdefault(_label_key(sample.labels, drop="le"), []).append(
                    (float(sample.labels["le"]), sample.value)
                )
        for labels, buckets in series.items():
            buckets.sort()
            bounds = [le for le, _ in buckets if math.isfinite(le)]
            cumulative = [count for _, count in buckets]
            per_bucket = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
            key = (family.name, labels)
            previous = self._buckets.get(key, [0.0] * len(per_bucket))
            self._buckets[key] = per_bucket
            for index, (now, before) in enumerate(zip(per_bucket, previous, strict=True)):
                new = round(now - before)
                if new > 0:
                    self.sink.observe(
                        family.name, family.documentation, bounds, dict(labels), _midpoint(bounds, index), new
                    )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.mirror_once()

    def start(self) -> RayMetricsBridge:
        """Copy now, then every ``interval_s`` in a daemon thread; returns ``self``."""
        if self._thread is None:
            self.mirror_once()
            self._thread = threading.Thread(target=self._loop, name="ray-metrics-bridge", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after one final copy (so the last increments are exported)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        self.mirror_once()


def _midpoint(bounds: list[float], index: int) -> float:
    """A value that falls inside bucket ``index`` under both ``le`` (≤) and ``[lo, hi)`` bucket rules."""
    if index >= len(bounds):  # the +Inf bucket
        return bounds[-1] * 2 if bounds else 1.0
    low = bounds[index - 1] if index > 0 else 0.0
    return (low + bounds[index]) / 2


_process_bridge: RayMetricsBridge | None = None
_process_bridge_lock = threading.Lock()


def export_to_ray(worker: str, *, interval_s: float = 5.0) -> RayMetricsBridge | None:
    """Start this process's bridge into Ray's metrics, tagged ``worker=<worker>``; None outside a Ray actor.

    Idempotent per process (an actor restarted by Ray is a new process and starts its own). Never raises:
    metrics must not stop the stream or the endpoint.
    """
    global _process_bridge
    ray = sys.modules.get("ray")  # never import Ray here: the plain `run` path must not load it
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None  # not an actor (a driver's registry holds no pipeline's numbers)
    with _process_bridge_lock:
        if _process_bridge is None:
            try:
                _process_bridge = RayMetricsBridge(
                    constant_tags={"worker": worker}, interval_s=interval_s
                ).start()
            except Exception:
                logger.exception("exporting metrics to Ray failed", extra={"worker": worker})
                return None
        return _process_bridge


def stop_export() -> None:
    """Stop this process's bridge after a final copy (a drained actor's last increments reach Ray)."""
    global _process_bridge
    with _process_bridge_lock:
        if _process_bridge is not None:
            _process_bridge.stop()
            _process_bridge = None
