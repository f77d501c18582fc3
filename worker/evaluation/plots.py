"""PNG plots of an evaluation: the precision-recall curve and per-category F1 bars (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_pr_curve(sweep: dict[str, list[dict[str, float]]], threshold: float, path: Path) -> Path:
    """Precision against recall per task, with the operating threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for task, points in sweep.items():
        if not points:
            continue
        ax.plot([p["recall"] for p in points], [p["precision"] for p in points], marker=".", label=task)
        # The operating point: the lowest swept threshold at or above the policy's.
        at = [p for p in points if p["threshold"] >= threshold]
        if at:
            op = min(at, key=lambda p: p["threshold"])
            ax.scatter([op["recall"]], [op["precision"]], s=80, marker="x", color="black", zorder=3)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Precision-recall (x = operating threshold {threshold:g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_category_f1(table2: dict[str, dict[str, Any]], path: Path) -> Path:
    """F1 per category (categories with neither support nor predictions are left out)."""
    rows = [(code, m["f1"]) for code, m in table2.items() if m["support"] or m["tp"] + m["fp"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([c for c, _ in rows], [f for _, f in rows], color="#4c72b0")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("Per-category F1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
