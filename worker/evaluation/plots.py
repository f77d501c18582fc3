"""PNG plots of an evaluation: the precision-recall curve and per-category F1 bars (matplotlib, Agg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


@dataclass(frozen=True, slots=True)
class Mark:
    """One marked point on the PR curve: a task's operating point or its recommended threshold."""

    task: str
    kind: str  # "operating" (the policy's threshold) or "recommended"
    threshold: float
    recall: float
    precision: float


def pr_curve_marks(
    sweep: dict[str, list[dict[str, Any]]], threshold: float, recommended: dict[str, float | None]
) -> list[Mark]:
    """The points ``plot_pr_curve`` marks: per task, the swept point the policy's threshold falls on (the
    lowest swept threshold at or above it) and the recommended threshold's point."""
    marks = []
    for task, points in sweep.items():
        drawable = [p for p in points if p["precision"] is not None and p["recall"] is not None]
        at = [p for p in drawable if p["threshold"] >= threshold]
        if at:
            op = min(at, key=lambda p: p["threshold"])
            marks.append(Mark(task, "operating", op["threshold"], op["recall"], op["precision"]))
        wanted = recommended.get(task)
        rec = [p for p in drawable if wanted is not None and p["threshold"] == wanted]
        if rec:
            marks.append(Mark(task, "recommended", wanted, rec[0]["recall"], rec[0]["precision"]))  # type: ignore[arg-type]
    return marks


_MARK_STYLE = {"operating": {"marker": "x", "s": 90}, "recommended": {"marker": "o", "s": 160}}


def plot_pr_curve(
    sweep: dict[str, list[dict[str, Any]]],
    threshold: float,
    path: Path,
    *,
    recommended: dict[str, float | None] | None = None,
) -> Path:
    """Precision against recall per task; each task's operating threshold (x) and recommended threshold (o)
    marked in the task's colour, labelled with their thresholds at offsets that keep the labels apart.
    Points with an undefined rate are not drawn (no segment to a made-up 0)."""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colours: dict[str, Any] = {}
    for task, points in sweep.items():
        drawable = [p for p in points if p["precision"] is not None and p["recall"] is not None]
        if not drawable:
            continue
        (line,) = ax.plot(
            [p["recall"] for p in drawable],
            [p["precision"] for p in drawable],
            marker=".",
            label=task,
            alpha=0.8,
        )
        colours[task] = line.get_color()
    for i, mark in enumerate(pr_curve_marks(sweep, threshold, recommended or {})):
        if mark.task not in colours:
            continue
        colour = colours[mark.task]
        style = _MARK_STYLE[mark.kind]
        if mark.kind == "operating":  # an unfilled marker: its colour is the face colour
            ax.scatter(
                [mark.recall],
                [mark.precision],
                marker=style["marker"],
                s=style["s"],
                c=[colour],
                linewidths=1.8,
                zorder=3,
            )
        else:  # a hollow ring around the point, visible even when it coincides with the operating point
            ax.scatter(
                [mark.recall],
                [mark.precision],
                marker=style["marker"],
                s=style["s"],
                facecolors="none",
                edgecolors=colour,
                linewidths=1.8,
                zorder=3,
            )
        # Labels fan out (one offset per mark) so marks on the same point stay readable.
        ax.annotate(
            f"{mark.task} {mark.kind} {mark.threshold:.3g}",
            (mark.recall, mark.precision),
            xytext=(8, 10 + 12 * i),
            textcoords="offset points",
            fontsize=7,
            color=colour,
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.5},
        )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"Precision-recall (x = policy threshold {threshold:g}, o = recommended)")
    if colours:
        ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_category_f1(table2: dict[str, dict[str, Any]], path: Path) -> Path:
    """F1 per category (categories with neither support nor predictions are left out)."""
    rows = [(code, m["f1"] or 0.0) for code, m in table2.items() if m["support"] or m["tp"] + m["fp"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([c for c, _ in rows], [f for _, f in rows], color="#4c72b0")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("Per-category F1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
