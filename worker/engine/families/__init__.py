"""The Llama Guard family: one module per model, each writing down that model's chat template as code.

Each family module (``llama_guard_3_vision``, ``llama_guard_3_1b``, ``llama_guard_3_8b``, ``llama_guard_4``)
renders a conversation into ``Segment``s — template control tokens (inserted by id, never parsed out of
text) and plain text (encoded with special-token recognition off) — byte-identical to the model's official
chat template as transformers' ``apply_chat_template`` renders it. The module docstrings list each template's
quirks; a reviewer diffs one module against one template.

``Family`` is what the rest of the engine needs to know about a family: its built-in categories, which
tokens its template places, how many images it reads, which transformers architecture holds its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.config import GUARD_FAMILIES
from worker.engine.families.common import Conversation, RenderedCategory, Segment

VISION = "llama-guard-3-vision"
LG3_1B = "llama-guard-3-1b"
LG3_8B = "llama-guard-3-8b"
LG4 = "llama-guard-4"
FAMILY_NAMES: tuple[str, ...] = (VISION, LG3_1B, LG3_8B, LG4)
DEFAULT_FAMILY = VISION
assert FAMILY_NAMES == GUARD_FAMILIES  # the config's ``model.family`` choices


@dataclass(frozen=True, slots=True)
class Family:
    """What the engine needs to know about one Llama Guard model (see the module docstring)."""

    name: str
    builtin_codes: tuple[str, ...]  # the categories the template lists by default, in order
    image_drops: tuple[str, ...]  # built-ins the template leaves out when an image is present (LG4: S14)
    max_images: int  # images one prompt can carry: 0 text-only, 1 Vision, more for Llama Guard 4
    special_tokens: tuple[str, ...]  # every control token the template places
    image_token: str | None
    end_of_turn: str  # the token that ends the model's answer
    model_type: str  # transformers config.model_type of the checkpoint
    params: str  # published parameter count (for the operator's table)
    render: Callable[[Conversation, Sequence[RenderedCategory]], list[Segment]]
    prefix: Callable[[str, Sequence[RenderedCategory]], list[Segment]]
    # Whether ``prefix`` is exactly the start of every text-only prompt of the same role and categories.
    template_takes_categories: bool  # False: the official template has no ``categories`` argument (LG3-8B)

    @property
    def supports_images(self) -> bool:
        """Whether this family's model reads images at all."""
        return self.max_images > 0

    def builtin_for(self, has_image: bool) -> tuple[str, ...]:
        """The built-in codes the template lists by default for a conversation with/without images."""
        if has_image and self.image_drops:
            return tuple(c for c in self.builtin_codes if c not in self.image_drops)
        return self.builtin_codes


def _families() -> dict[str, Family]:
    from worker.engine.families import llama_guard_3_1b, llama_guard_3_8b, llama_guard_3_vision, llama_guard_4

    return {
        m.FAMILY.name: m.FAMILY
        for m in (llama_guard_3_vision, llama_guard_3_1b, llama_guard_3_8b, llama_guard_4)
    }


_REGISTRY: dict[str, Family] | None = None


def get_family(name: str) -> Family:
    """The ``Family`` called ``name``; ValueError naming the known families otherwise."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown Llama Guard family {name!r}; known: {', '.join(FAMILY_NAMES)}") from None


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILY_NAMES",
    "LG3_1B",
    "LG3_8B",
    "LG4",
    "VISION",
    "Conversation",
    "Family",
    "RenderedCategory",
    "Segment",
    "get_family",
]
