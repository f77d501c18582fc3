"""Reading metrics back in tests: a scrape parsed into ``{'name{label="v"}': value}``, and the catalogue of
every sample name and label the worker can expose (to check dashboards and alerts against it)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from worker.ops.metrics import DRIVER_REGISTRY, NAMESPACE, REGISTRY, exposition


def sample_key(name: str, labels: Mapping[str, str] | None = None) -> str:
    """The key ``parse_exposition`` uses for a sample: ``name{a="1",b="2"}`` with labels sorted, or ``name``."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{labels[k]}"' for k in sorted(labels))
    return f"{name}{{{inner}}}"


def parse_exposition(text: str) -> dict[str, float]:
    """Parse a Prometheus text scrape into ``{'name{label="v",...}': value}`` (keys built by ``sample_key``).

    Histogram samples keep their ``_bucket``/``_sum``/``_count`` names; counters keep ``_total``;
    ``_created`` samples are dropped (timestamps, not values a test compares).
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values[sample_key(sample.name, sample.labels)] = sample.value
    return values


def scrape(url: str, *, timeout: float = 5.0, prefix: str = "mw_") -> dict[str, float]:
    """GET a ``/metrics`` URL (e.g. ``OpsServer.url + "/metrics"``) and parse it; samples starting with ``prefix``.

    For tests that watch counters move while events flow::

        before = scrape(ops.url + "/metrics")
        ...  # produce events, wait for verdicts
        after = scrape(ops.url + "/metrics")
        key = sample_key("mw_events_consumed_total", {"outcome": "verdict"})
        assert after[key] - before[key] == expected
    """
    import urllib.request  # only tests and tools scrape; keep the import off the worker's start path

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return {k: v for k, v in parse_exposition(text).items() if k.startswith(prefix)}


def scrape_values(prefix: str = "mw_") -> dict[str, float]:
    """Parsed samples of ``REGISTRY`` whose name starts with ``prefix`` (in-process equivalent of a scrape)."""
    return {k: v for k, v in parse_exposition(exposition().decode()).items() if k.startswith(prefix)}


def metric_names() -> set[str]:
    """Every sample name the worker or the Ray driver can expose under ``mw_`` (``_total``, ``_bucket``, ...).

    Built from the metric families, so labelled metrics without children yet (lag) are included too.
    """
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *DRIVER_REGISTRY.collect()]:
        if family.name.startswith(f"{NAMESPACE}_"):
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def metric_labels() -> dict[str, frozenset[str]]:
    """Label names of every exposed ``mw_*`` sample name (``_bucket`` samples also carry ``le``)."""
    from prometheus_client.metrics import MetricWrapperBase

    labels: dict[str, frozenset[str]] = {}
    from worker.ops import metrics

    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            (family,) = obj.describe()
            # prometheus_client keeps a parent's label names only in this attribute.
            names = frozenset(obj._labelnames)
            if family.type == "counter":
                labels[f"{family.name}_total"] = names
            elif family.type == "histogram":
                labels[f"{family.name}_bucket"] = names | {"le"}
                labels[f"{family.name}_sum"] = labels[f"{family.name}_count"] = names
            else:
                labels[family.name] = names
    return labels
