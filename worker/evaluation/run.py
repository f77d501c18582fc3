"""``moderation-worker eval``: run the worker's engine and policy over labelled data and report.

Prints Table 1 (per task: precision, recall, F1, FPR, support) and Table 2 (per-category F1) in the model
card's layout, writes ``report.json`` (``schemas/eval_report.v1.json``), ``pr_curve.png`` and
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
from worker.dead_letters import RejectedError
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
    image = None
    if item.event.image is not None:
        from worker.images.load import decode_image, image_bytes

        image = decode_image(image_bytes(item.event.image, settings), settings.limits)
    return GuardRequest(turns=item.event.turns, policy=policy, image=image)


def evaluate(
    items: Sequence[LabelledEvent],
    engine: Any,
    policy: Policy,
    settings: Settings,
    *,
    console: Console | None = None,
) -> tuple[list[Scored], list[dict[str, Any]], list[dict[str, Any]]]:
    """Classify ``items`` in batches; returns (scored items, per-item rows, per-item failures)."""
    scored: list[Scored] = []
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    batch_size = settings.batching.max_size
    with Progress(console=console, transient=True, disable=console is None) as progress:
        task_id = progress.add_task("classifying", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            requests, kept = [], []
            for item in chunk:
                try:
                    requests.append(_request(item, policy, settings))
                    kept.append(item)
                except RejectedError as exc:
                    failures.append(
                        {
                            "line": item.line,
                            "reason": exc.rejection.reason.value,
                            "message": exc.rejection.message,
                        }
                    )
            results = engine.classify(requests) if requests else []
            for item, result in zip(kept, results, strict=True):
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


def print_tables(report: dict[str, Any], console: Console) -> None:
    """Table 1 and Table 2 in the model card's layout."""
    t1 = Table(title="Table 1: performance per task (positive class: unsafe)")
    for col in ("Task", "Precision", "Recall", "F1", "FPR", "Support", "Items"):
        t1.add_column(col, justify="left" if col == "Task" else "right")
    names = {"prompt": "Prompt Classification", "response": "Response Classification", "all": "All"}
    for task in TASKS:
        m = report["table1"][task]
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
    if engine is None:
        from worker.engine.engine import GuardEngine

        engine = GuardEngine.from_settings(settings)
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
        "model": engine.model_info.as_dict(),
        "policy": {"id": policy.id, "hash": policy.hash, "threshold": policy.threshold},
        **report,
        "plots": {k: v.name for k, v in plots.items()},
        "items": rows,
    }
    from worker.contracts import validator

    validator("eval_report").validate(orjson.loads(orjson.dumps(report)))
    (out_dir / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print_tables(report, console)
    console.print(
        f"evaluated {len(scored)} item(s); skipped {len(bad)} bad line(s); {len(failures)} failure(s); "
        f"report: {out_dir / 'report.json'}"
    )
    return 0
