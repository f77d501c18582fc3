"""The Grafana dashboard only queries metrics (and labels) that worker/ops/metrics.py exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ops.helpers import DASHBOARD
from tests.support import metrics as metric_reader

PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][\w:]*")


def _panels(node: Any) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


def promql_references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses; Grafana variables count as durations."""
    expr = re.sub(r"\$\{?\w+\}?", "5m", expr)
    labels: set[str] = set()
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matcher))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in grouping.split(",") if g.strip()}
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", stripped)
    names = set()
    for match in _IDENT.finditer(stripped):
        token = match.group()
        follows = stripped[match.end() :].lstrip()[:1]
        if token.lower() in PROMQL_KEYWORDS or follows == "(":
            continue  # a keyword or a function call
        names.add(token)
    return names, labels


def test_the_extractor_finds_metrics_and_labels_in_typical_queries() -> None:
    names, labels = promql_references(
        'histogram_quantile(0.99, sum by (le, stage) (rate(mw_stage_seconds_bucket{stage!="x"}[$__rate_interval])))'
        " / clamp_min(sum(rate(mw_end_to_end_seconds_count[5m])), 1e-9)"
    )
    assert names == {"mw_stage_seconds_bucket", "mw_end_to_end_seconds_count"}
    assert labels == {"le", "stage"}


def test_dashboard_has_queries_and_uses_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "moderation-worker"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    queries = _queries()
    assert len(queries) >= 15
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


# Labels the Ray bridge adds to every series of an actor or replica (worker/ops/ray_export.py).
EXPORTER_LABELS = {"worker"}


@pytest.mark.parametrize(("title", "expr"), _queries())
def test_every_query_names_only_exported_metrics_and_their_labels(title: str, expr: str) -> None:
    exported = {name: labels | EXPORTER_LABELS for name, labels in metric_reader.metric_labels().items()}
    names, labels = promql_references(expr)
    assert names, f"{title}: no metric in {expr!r}"
    unknown = names - set(exported)
    assert not unknown, f"{title}: {sorted(unknown)} not exported by worker/ops/metrics.py"
    known_labels = set().union(*(exported[n] for n in names))
    assert labels <= known_labels, f"{title}: labels {sorted(labels - known_labels)} not on {sorted(names)}"


def test_dashboard_covers_what_operators_watch() -> None:
    used = set().union(*(promql_references(expr)[0] for _, expr in _queries()))
    for needed in (
        "mw_events_consumed_total",  # throughput
        "mw_flagged_events_total",  # flagged events, once per event
        "mw_verdicts_total",  # flagged rate by category
        "mw_end_to_end_seconds_bucket",  # latency percentiles
        "mw_stage_seconds_bucket",
        "mw_batch_size_bucket",  # batch size
        "mw_cache_requests_total",  # cache hit ratio
        "mw_consumer_lag",  # lag
        "mw_dead_letters_total",  # dead letters by reason
        "mw_ray_workers_alive",  # GPU actors up
        "mw_redis_up",
    ):
        assert needed in used, needed
