"""Classification metrics as the Llama Guard 3 Vision model card reports them (pure Python).

Table 1 (per task): precision, recall, F1 and false-positive rate of the binary decision, with ``unsafe`` as
the positive class. Table 2 (per category): F1 of each category treated as its own one-vs-rest binary label
over every item of the task: an item is a positive for category ``c`` when its expected label lists ``c``, and
a predicted positive when the verdict is ``unsafe`` and lists ``c``. A multi-label item therefore counts once in
each of its categories; a correct ``unsafe`` decision with a wrong code is a false negative for the expected
code and a false positive for the predicted one.

A rate whose denominator is zero is undefined and is ``None`` (``null`` in the report), never 0.0: precision
with no predicted positives, recall (and so F1) of a category without examples, FPR with no negatives.
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
    """Binary confusion counts with the derived rates (None where a rate is undefined)."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return _ratio(2 * p * r, p + r) or 0.0

    @property
    def fpr(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def support(self) -> int:
        """Number of expected positives."""
        return self.tp + self.fn

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            **asdict(self),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "fpr": self.fpr,
            "support": self.support,
            "total": self.total,
        }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


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
    """The decision rates had the threshold been ``threshold`` (None where undefined)."""

    threshold: float
    precision: float | None
    recall: float | None
    f1: float | None
    fpr: float | None


def threshold_sweep(items: Sequence[Scored]) -> list[SweepPoint]:
    """Every distinct operating point, one per distinct score, ascending.

    Each threshold flags at least the item scored exactly there, so precision is always defined; the
    "flag nothing" point above every score is left out (its precision is undefined, not 0).
    """
    thresholds = sorted({i.score for i in items})
    points = []
    for t in thresholds:
        c = at_threshold(items, t)
        points.append(SweepPoint(t, c.precision, c.recall, c.f1, c.fpr))
    return points


def recommend_threshold(items: Sequence[Scored], target_fpr: float) -> SweepPoint | None:
    """The operating point with the best recall whose FPR is at most ``target_fpr`` (ties: higher threshold).

    With no negatives the FPR is undefined and every point qualifies. Returns None when there are no items
    or when every threshold flags more negatives than the target allows.
    """
    feasible = [p for p in threshold_sweep(items) if p.fpr is None or p.fpr <= target_fpr]
    if not feasible:
        return None
    return max(feasible, key=lambda p: (p.recall or 0.0, p.threshold))
