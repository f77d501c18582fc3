"""What goes into and comes out of the guard engine (plain data; no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from worker.contracts.events import Turn

if TYPE_CHECKING:
    from PIL.Image import Image

    from worker.engine.policy import Policy


@dataclass(frozen=True, slots=True)
class GuardRequest:
    """One conversation to judge under one policy, with its decoded RGB PIL images.

    ``image`` is the one image (Llama Guard 3 Vision reads one); ``images`` several (Llama Guard 4), with the
    turn index of each in ``image_turns`` (empty = all in the last user turn).
    """

    turns: tuple[Turn, ...]
    policy: Policy
    image: Image | None = None
    images: tuple[Image, ...] = ()
    image_turns: tuple[int, ...] = ()

    @property
    def all_images(self) -> tuple[Image, ...]:
        """Every image of the request, in order."""
        return self.images if self.images else (() if self.image is None else (self.image,))

    @property
    def has_image(self) -> bool:
        return bool(self.all_images)

    def image_positions(self) -> tuple[int, ...]:
        """The turn index of each image (default: the last user turn, where the model reads images)."""
        if self.image_turns:
            return self.image_turns
        last_user = max((i for i, t in enumerate(self.turns) if t.role == "user"), default=0)
        return (last_user,) * len(self.all_images)


@dataclass(frozen=True, slots=True)
class GuardResult:
    """The engine's answer for one request."""

    score: float  # P(unsafe) at the answer's first word
    unsafe: bool  # score >= policy.threshold (single_pass) or the decoded first line (generate)
    codes: tuple[str, ...]  # violated codes, restricted to the policy's enabled categories, in code order
    dropped_codes: tuple[str, ...] = ()  # codes the model emitted that the policy does not enable
    raw_output: str | None = None  # decoded text, when decoding ran
    # Per enabled code: P(unsafe) x P(first code | unsafe), see worker.engine.category_scores; None if unknown.
    category_scores: dict[str, float] | None = None
    halted: bool = False  # decided by a halting blocklist: no model call (score 1.0)
    language: dict[str, Any] | None = (
        None  # of the judged text (worker.moderation.language), set by the caller
    )


class ErrorKind(StrEnum):
    """Why the engine gave no answer for an item."""

    PREPARE = "prepare"  # the prompt or the image could not be prepared for the model
    MODEL = "model"  # the forward pass raised
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory
    NON_FINITE = "non_finite"  # the model produced a NaN/inf score
    TRUNCATED = "truncated"  # decoding stopped before the answer was complete
    MALFORMED = "malformed"  # the model's answer does not parse


# Kinds that say the model itself failed on the item (not that its answer did not parse).
FAULT_KINDS = frozenset({ErrorKind.MODEL, ErrorKind.OUT_OF_MEMORY, ErrorKind.NON_FINITE})
# Kinds the engine reports on every row of a batch whose forward pass failed as a whole.
BATCH_FAILURE_KINDS = frozenset({ErrorKind.MODEL, ErrorKind.OUT_OF_MEMORY})


class EngineError(Exception):
    """The model produced something we cannot parse, or failed on an item. Carries the raw text.

    ``kind`` says why (``ErrorKind``); ``detail`` may carry more (e.g. the score read before parsing failed).
    A ``detail`` dict with a ``"kind"`` key sets the kind when ``kind`` is not given.
    """

    def __init__(
        self,
        message: str,
        raw_output: str | None = None,
        detail: Any = None,
        kind: ErrorKind | str | None = None,
    ) -> None:
        super().__init__(message)
        self.raw_output = raw_output
        self.detail = detail
        self._kind = ErrorKind(kind) if kind is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross processes (a batch prepared in a preparation process): keep more than the message.
        return (type(self), (str(self), self.raw_output, self.detail, self._kind))

    @property
    def kind(self) -> ErrorKind:
        """Why there is no answer (read from ``detail["kind"]`` when not given; default ``malformed``)."""
        if self._kind is not None:
            return self._kind
        if isinstance(self.detail, dict) and self.detail.get("kind") in ErrorKind._value2member_map_:
            return ErrorKind(self.detail["kind"])
        return ErrorKind.MALFORMED

    @property
    def is_fault(self) -> bool:
        """The model itself failed on the item (a raised or non-finite forward pass, not a parse)."""
        return self.kind in FAULT_KINDS


def halt_result(event: Any, optimized_languages: Any) -> GuardResult:
    """The answer for an event a halting blocklist decided: unsafe, score 1.0, no model call."""
    from worker.moderation.language import detect_language

    return GuardResult(
        score=1.0,
        unsafe=True,
        codes=(),
        halted=True,
        language=detect_language(event.turns[-1].texts, optimized_languages),
    )
