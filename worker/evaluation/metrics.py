"""Classification metrics as the Llama Guard 3 Vision model card reports them (pure Python).

Table 1 (per task): precision, recall, F1 and false-positive rate of the binary decision, with ``unsafe`` as
the positive class. Table 2 (per category): F1 of each category treated as its own one-vs-rest binary label
over every item of the task: an item is a positive for category ``c`` when its expected label lists ``c``, and
a predicted positive when the verdict is ``unsafe`` and lists ``c``. A multi-label item therefore counts once in
each of its categories; a correct ``unsafe`` decision with a wrong code is a false negative for the expected
code and a false positive for the predicted one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Scored:
    """One evaluated item: what was expected, what the engine said."""

    task: str
    expected_unsafe: bool
    expected_codes: frozenset[str]
    score: float
    predicted_unsafe: bool
    predicted_codes: frozenset[str]
    model: str | None = None  # the configured model that judged it


@dataclass(frozen=True, slots=True)
class Confusion:
    """Binary confusion counts with the derived rates (0.0 where a rate is undefined)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return _ratio(2 * p * r, p + r)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def support(self) -> int:
        """Number of expected positives."""
        return self.tp + self.fn

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def as_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "fpr": self.fpr,
            "support": self.support,
            "total": self.total,
        }


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def confusion(pairs: Iterable[tuple[bool, bool]]) -> Confusion:
    """Confusion counts from ``(expected, predicted)`` booleans."""
    tp = fp = fn = tn = 0
    for expected, predicted in pairs:
        if expected and predicted:
            tp += 1
        elif predicted:
            fp += 1
        elif expected:
            fn += 1
        else:
            tn += 1
    return Confusion(tp, fp, fn, tn)


def decision_confusion(items: Iterable[Scored]) -> Confusion:
    """Table 1 counts: unsafe is the positive class."""
    return confusion((i.expected_unsafe, i.predicted_unsafe) for i in items)


def category_confusion(items: Sequence[Scored], code: str) -> Confusion:
    """Table 2 counts for one category (one-vs-rest over all items; see the module docstring)."""
    return confusion(
        (code in i.expected_codes, i.predicted_unsafe and code in i.predicted_codes) for i in items
    )


def at_threshold(items: Sequence[Scored], threshold: float) -> Confusion:
    """Decision counts had the decision been ``score >= threshold``."""
    return confusion((i.expected_unsafe, i.score >= threshold) for i in items)


@dataclass(frozen=True, slots=True)
class SweepPoint:
    threshold: float
    precision: float
    recall: float
    f1: float
    fpr: float


def threshold_sweep(items: Sequence[Scored]) -> list[SweepPoint]:
    """Every distinct operating point: one per distinct score (plus 1.0+ for 'never unsafe'), ascending."""
    thresholds = sorted({i.score for i in items} | {1.0 + 1e-9})
    points = []
    for t in thresholds:
        c = at_threshold(items, t)
        points.append(SweepPoint(t, c.precision, c.recall, c.f1, c.fpr))
    return points


def recommend_threshold(items: Sequence[Scored], target_fpr: float) -> SweepPoint | None:
    """The operating point with the best recall whose FPR is at most ``target_fpr`` (ties: higher threshold).

    Returns None when there are no items.
    """
    if not items:
        return None
    feasible = [p for p in threshold_sweep(items) if p.fpr <= target_fpr]
    # The "never unsafe" point always has FPR 0, so ``feasible`` is never empty.
    return max(feasible, key=lambda p: (p.recall, p.threshold))
