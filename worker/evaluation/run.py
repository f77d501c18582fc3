"""``moderation-worker eval``: run the worker's engine and policy over labelled data and report.

Prints Table 1 (per task: precision, recall, F1, FPR, support) and Table 2 (per-category F1) in the model
card's layout — and, when several models are configured, Table 1 per model (each item judged by the model
the router picks for it, as in the stream) — writes ``report.json`` (``schemas/eval_report.v1.json``), ``pr_curve.png`` and
``category_f1.png``, and recommends a threshold for a target false-positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from worker.config import Settings
from worker.contracts.rejections import RejectedError
from worker.engine.policy import Policy
from worker.engine.types import EngineError, GuardRequest
from worker.evaluation.dataset import BadLine, LabelledEvent, read_labelled
from worker.evaluation.metrics import (
    Scored,
    category_confusion,
    decision_confusion,
    recommend_threshold,
    threshold_sweep,
)
from worker.evaluation.plots import plot_category_f1, plot_pr_curve

REPORT_SCHEMA_VERSION = 1
TASKS = ("prompt", "response", "all")


def _request(item: LabelledEvent, policy: Policy, settings: Settings) -> GuardRequest:
    from worker.images.load import decode_image, image_bytes
    from worker.moderation.routing import guard_request

    images = tuple(decode_image(image_bytes(ref, settings), settings.limits) for ref in item.event.images)
    return guard_request(item.event, policy, images)


def evaluate(
    items: Sequence[LabelledEvent],
    engine: Any,
    policy: Policy,
    settings: Settings,
    *,
    console: Console | None = None,
) -> tuple[list[Scored], list[dict[str, Any]], list[dict[str, Any]]]:
    """Classify ``items`` in batches; returns (scored items, per-item rows, per-item failures)."""
    from worker.engine.registry import ModelRegistry

    models = ModelRegistry.of(engine, settings)
    scored: list[Scored] = []
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    batch_size = settings.batching.max_size
    with Progress(console=console, transient=True, disable=console is None) as progress:
        task_id = progress.add_task("classifying", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            by_model: dict[str, tuple[list[GuardRequest], list[LabelledEvent]]] = {}
            for item in chunk:
                model = models.model_for(policy, item.event.image_count)
                if model is None or not models.holds(model):
                    failures.append(
                        {"line": item.line, "reason": "no_model", "message": "no model judges this item"}
                    )
                    continue
                try:
                    request = _request(item, models.engine(model).policy_for(policy.id), settings)
                except RejectedError as exc:
                    failures.append(
                        {
                            "line": item.line,
                            "reason": exc.rejection.reason.value,
                            "message": exc.rejection.message,
                        }
                    )
                    continue
                requests, kept = by_model.setdefault(model, ([], []))
                requests.append(request)
                kept.append(item)
            answered = [
                (model, item, result)
                for model, (requests, kept) in by_model.items()
                for item, result in zip(kept, models.engine(model).classify(requests), strict=True)
            ]
            for model, item, result in sorted(answered, key=lambda a: a[1].line):
                if isinstance(result, EngineError):
                    failures.append({"line": item.line, "reason": "engine_error", "message": str(result)})
                    continue
                s = Scored(
                    task=item.event.task.value,
                    expected_unsafe=item.expected_unsafe,
                    expected_codes=item.expected_codes,
                    score=float(result.score),
                    predicted_unsafe=bool(result.unsafe),
                    predicted_codes=frozenset(result.codes),
                    model=model,
                )
                scored.append(s)
                rows.append(
                    {
                        "line": item.line,
                        "event_id": item.event.event_id,
                        "task": s.task,
                        "expected": {"unsafe": s.expected_unsafe, "categories": sorted(s.expected_codes)},
                        "predicted": {"unsafe": s.predicted_unsafe, "categories": sorted(s.predicted_codes)},
                        "score": s.score,
                        "model": model,
                    }
                )
            progress.advance(task_id, len(chunk))
    return scored, rows, failures


def _by_task(scored: Sequence[Scored]) -> dict[str, list[Scored]]:
    groups: dict[str, list[Scored]] = {t: [] for t in TASKS}
    for s in scored:
        groups[s.task].append(s)
        groups["all"].append(s)
    return groups


def build_report(scored: Sequence[Scored], policy: Policy, target_fpr: float) -> dict[str, Any]:
    """Tables, sweep and recommendation as plain data (the items, model and data parts are added by the caller)."""
    groups = _by_task(scored)
    table1 = {t: decision_confusion(g).as_dict() for t, g in groups.items()}
    table2 = {
        t: {c.code: {"name": c.name, **category_confusion(g, c.code).as_dict()} for c in policy.categories}
        for t, g in groups.items()
    }
    sweep = {t: [_point(p) for p in threshold_sweep(g)] for t, g in groups.items()}
    recommendation = {}
    for t, g in groups.items():
        point = recommend_threshold(g, target_fpr)
        recommendation[t] = None if point is None else _point(point)
    return {
        "table1": table1,
        "table2": table2,
        "threshold_sweep": sweep,
        "recommendation": {"target_fpr": target_fpr, "by_task": recommendation},
    }


def _point(p: Any) -> dict[str, float]:
    return {"threshold": p.threshold, "precision": p.precision, "recall": p.recall, "f1": p.f1, "fpr": p.fpr}


def table1_by_model(scored: Sequence[Scored]) -> dict[str, dict[str, Any]]:
    """Table 1 of the items each model judged, by model name."""
    names = sorted({s.model for s in scored if s.model is not None})
    return {
        name: {
            t: decision_confusion(g).as_dict()
            for t, g in _by_task([s for s in scored if s.model == name]).items()
        }
        for name in names
    }


def _print_table1(table1: dict[str, Any], title: str, console: Console) -> None:
    t1 = Table(title=title)
    for col in ("Task", "Precision", "Recall", "F1", "FPR", "Support", "Items"):
        t1.add_column(col, justify="left" if col == "Task" else "right")
    names = {"prompt": "Prompt Classification", "response": "Response Classification", "all": "All"}
    for task in TASKS:
        m = table1[task]
        if m["total"] == 0:
            continue
        t1.add_row(
            names[task],
            _rate(m["precision"]),
            _rate(m["recall"]),
            _rate(m["f1"]),
            _rate(m["fpr"]),
            str(m["support"]),
            str(m["total"]),
        )
    console.print(t1)


def print_tables(report: dict[str, Any], console: Console) -> None:
    """Table 1 (overall, then per model when several judged) and Table 2 in the model card's layout."""
    _print_table1(report["table1"], "Table 1: performance per task (positive class: unsafe)", console)
    per_model = report.get("table1_by_model") or {}
    if len(per_model) > 1:
        for name, table1 in per_model.items():
            family = report["models"][name].get("family", "")
            _print_table1(table1, f"Table 1, model {name} ({family}): the items routed to it", console)
    t2 = Table(title="Table 2: per-category F1 (all tasks; one-vs-rest per category)")
    for col in ("Category", "F1", "Precision", "Recall", "Support"):
        t2.add_column(col, justify="left" if col == "Category" else "right")
    for code, m in report["table2"]["all"].items():
        if m["support"] == 0 and m["tp"] + m["fp"] == 0:
            continue
        t2.add_row(
            f"{code} {m['name']}",
            _rate(m["f1"]),
            _rate(m["precision"]),
            _rate(m["recall"]),
            str(m["support"]),
        )
    console.print(t2)
    rec = report["recommendation"]["by_task"]["all"]
    if rec is not None:
        console.print(
            f"Recommended threshold for FPR <= {report['recommendation']['target_fpr']:.3f}: "
            f"{rec['threshold']:.4f} (precision {_rate(rec['precision'])}, recall {_rate(rec['recall'])}, "
            f"FPR {_rate(rec['fpr'])})"
        )
    else:
        console.print(
            f"No threshold keeps FPR <= {report['recommendation']['target_fpr']:.3f} while flagging anything"
        )


def _rate(value: float | None) -> str:
    """A rate for the tables; "n/a" where it is undefined (e.g. no examples)."""
    return "n/a" if value is None else f"{value:.3f}"


def eval_command(
    data: Path,
    settings: Settings,
    *,
    out_dir: Path,
    target_fpr: float,
    strict: bool,
    policy_id: str | None = None,
    engine: Any = None,
    console: Console | None = None,
) -> int:
    """Exit 0 on success, 1 when bad lines or failures occurred under ``--strict`` or nothing was evaluated,
    2 when the data file cannot be read or the policy is unknown."""
    console = console or Console()
    if not data.is_file():
        console.print(f"[red]error:[/red] data file not found: {data}")
        return 2
    if not 0.0 <= target_fpr <= 1.0:
        console.print("[red]error:[/red] --target-fpr must be within [0, 1]")
        return 2
    items: list[LabelledEvent] = []
    bad: list[BadLine] = []
    for entry in read_labelled(data, settings):
        (bad if isinstance(entry, BadLine) else items).append(entry)  # type: ignore[arg-type]
    for b in bad:
        console.print(f"[yellow]line {b.line}[/yellow]: {b.reason}: {b.message}")
    if bad and strict:
        console.print(f"[red]error:[/red] {len(bad)} bad line(s); --strict stops the run")
        return 1
    from worker.engine.registry import ModelRegistry

    engine = ModelRegistry.from_settings(settings) if engine is None else ModelRegistry.of(engine, settings)
    try:
        policy = engine.policy_for(policy_id)
    except RejectedError as exc:
        console.print(f"[red]error:[/red] {exc.rejection.message}")
        return 2
    scored, rows, failures = evaluate(items, engine, policy, settings, console=console)
    for f in failures:
        console.print(f"[yellow]line {f['line']}[/yellow]: {f['reason']}: {f['message']}")
    if failures and strict:
        console.print(f"[red]error:[/red] {len(failures)} item(s) failed; --strict stops the run")
        return 1
    if not scored:
        console.print("[red]error:[/red] no item could be evaluated")
        return 1
    report = build_report(scored, policy, target_fpr)
    report["table1_by_model"] = table1_by_model(scored)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "pr_curve": plot_pr_curve(
            report["threshold_sweep"],
            policy.threshold,
            out_dir / "pr_curve.png",
            recommended={
                t: (r["threshold"] if r else None) for t, r in report["recommendation"]["by_task"].items()
            },
        ),
        "category_f1": plot_category_f1(report["table2"]["all"], out_dir / "category_f1.png"),
    }
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "data": {
            "path": str(data),
            "evaluated": len(scored),
            "skipped_lines": [{"line": b.line, "reason": b.reason, "message": b.message} for b in bad],
            "failed_items": failures,
        },
        "model": engine.info(engine.names[0]).as_dict(),
        "models": {name: engine.info(name).as_dict() for name in engine.names},
        "policy": {"id": policy.id, "hash": policy.hash, "threshold": policy.threshold},
        **report,
        "plots": {k: v.name for k, v in plots.items()},
        "items": rows,
    }
    from worker.contracts.schemas import validator

    validator("eval_report").validate(orjson.loads(orjson.dumps(report)))
    (out_dir / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print_tables(report, console)
    console.print(
        f"evaluated {len(scored)} item(s); skipped {len(bad)} bad line(s); {len(failures)} failure(s); "
        f"report: {out_dir / 'report.json'}"
    )
    return 0
