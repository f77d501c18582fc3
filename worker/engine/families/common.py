"""Pieces every family's renderer shares: prompt segments, the conversation as the template sees it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.contracts.events import Turn

_ROLE_LABEL = {"user": "User", "assistant": "Agent"}


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the prompt: a template control token (``special``) or plain text."""

    text: str
    special: bool = False


@dataclass(frozen=True, slots=True)
class RenderedCategory:
    """One line of the category block: ``f"{code}: {text}"`` — ``text`` is the template's dict value."""

    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """The turns to judge and where the images are: ``image_counts[i]`` images in turn ``i``."""

    turns: tuple[Turn, ...]
    image_counts: tuple[int, ...] = ()

    @property
    def images(self) -> int:
        """How many images the conversation carries."""
        return sum(self.image_counts)

    def images_in(self, index: int) -> int:
        """Images attached to turn ``index``."""
        return self.image_counts[index] if index < len(self.image_counts) else 0


def conversation(turns: Sequence[Turn], image_turns: Sequence[int] = ()) -> Conversation:
    """A ``Conversation`` from turns and the turn index of each image."""
    counts = [0] * len(turns)
    for index in image_turns:
        if not 0 <= index < len(turns):
            raise ValueError(f"image at turn {index}, but the conversation has {len(turns)} turns")
        counts[index] += 1
    return Conversation(tuple(turns), tuple(counts))


def role_label(turn: Turn) -> str:
    """``User`` or ``Agent``: how every template names a message's role."""
    return _ROLE_LABEL[turn.role]


def judged_role(turns: Sequence[Turn]) -> str:
    """``User`` for an odd number of messages (prompt task), else ``Agent`` — every template's first line.

    The templates set ``role`` from the message count before their loop; the ``role`` set inside the loop
    does not leak out of it (Jinja scoping), so the closing sentence uses this one too.
    """
    return "User" if len(turns) % 2 == 1 else "Agent"


def category_lines(categories: Sequence[RenderedCategory]) -> str:
    """``{{ key + ": " + categories[key] + "\\n" }}`` for each category, in order (all templates)."""
    return "".join(f"{c.code}: {c.text}\n" for c in categories)
