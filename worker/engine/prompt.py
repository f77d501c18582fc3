"""The prompt of every Llama Guard family, byte-exact with the model's chat template.

``render_segments`` is the one entry point; the rules of each family live in ``worker.engine.families``
(one module per model, diffable against its template). It returns the prompt as pieces that are either
control tokens the *template* places (``<|begin_of_text|>``, the headers, ``<|image|>``, the end-of-turn
token) or plain text (the instructions, the category list and the untrusted conversation).
``render_prompt`` joins them into the exact string; the tokenizer (``worker.engine.tokenize``) encodes each
plain piece with special tokens split, so a user typing ``<|eot_id|>`` never produces a control token.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from worker.contracts.events import Turn
from worker.engine.families import DEFAULT_FAMILY, Segment, get_family
from worker.engine.families import llama_guard_3_vision as _vision
from worker.engine.families.common import conversation, judged_role
from worker.engine.policy import Policy

if TYPE_CHECKING:
    from worker.config import Settings

BEGIN_OF_TEXT = _vision.BEGIN_OF_TEXT
START_HEADER = _vision.START_HEADER
END_HEADER = _vision.END_HEADER
EOT = _vision.EOT
IMAGE = _vision.IMAGE
# The Vision template's control tokens (each family's set: ``get_family(name).special_tokens``).
TEMPLATE_SPECIAL_TOKENS: tuple[str, ...] = _vision.SPECIAL_TOKENS

__all__ = [
    "Segment",
    "judged_role",
    "prompt_command",
    "render_prompt",
    "render_segments",
    "shared_text_prefix",
]


def _image_turns(turns: Sequence[Turn], has_image: bool, image_turns: Sequence[int] | None) -> Sequence[int]:
    if image_turns is not None:
        return image_turns
    if not has_image:
        return ()
    # Without positions, the image belongs to the last user turn (where images are accepted).
    return (max(i for i, t in enumerate(turns) if t.role == "user"),)


def shared_text_prefix(role: str, policy: Policy, family: str = DEFAULT_FAMILY) -> list[Segment]:
    """The start of every text-only prompt judging ``role`` under ``policy``: everything before the conversation.

    It is identical across a batch's rows of the same policy and role, so its keys and values can be computed
    once and shared (see ``GuardEngine``).
    """
    return get_family(family).prefix(role, policy.rendered_categories(has_image=False))


def render_segments(
    turns: Sequence[Turn],
    policy: Policy,
    *,
    has_image: bool = False,
    image_turns: Sequence[int] | None = None,
    family: str = DEFAULT_FAMILY,
) -> list[Segment]:
    """The prompt as template control tokens and plain-text pieces, in order (see the module docstring).

    ``image_turns`` gives the turn index of each image (Llama Guard 4 places them per message);
    ``has_image=True`` alone means one image in the last user turn. ValueError if the family reads fewer
    images than given.
    """
    spec = get_family(family)
    positions = _image_turns(turns, has_image, image_turns)
    if len(positions) > spec.max_images:
        what = "no images" if not spec.max_images else f"at most {spec.max_images} image(s)"
        raise ValueError(f"{family} reads {what}; this conversation has {len(positions)}")
    conv = conversation(turns, positions)
    segments = spec.render(conv, policy.rendered_categories(has_image=bool(positions)))
    if spec.max_images > 1:
        placed = sum(1 for s in segments if s.special and s.text == spec.image_token)
        if placed != len(positions):
            # The template writes a message's images before its first text part: without text they vanish.
            raise ValueError(
                f"{family}'s template drops the images of a message without text ({len(positions) - placed} "
                "image(s) would not reach the model)"
            )
    return segments


def render_prompt(
    turns: Sequence[Turn],
    policy: Policy,
    *,
    has_image: bool = False,
    image_turns: Sequence[int] | None = None,
    family: str = DEFAULT_FAMILY,
) -> str:
    """The exact prompt string the model of ``family`` reads for ``turns`` under ``policy``."""
    segments = render_segments(turns, policy, has_image=has_image, image_turns=image_turns, family=family)
    return "".join(s.text for s in segments)


def prompt_command(
    file: str, settings: Settings, policy_id: str | None = None, family: str | None = None
) -> int:
    """``moderation-worker prompt [--family F] FILE|-``: print the exact prompt for one event; 1 if invalid.

    No weights are loaded: the prompt is what the template writes (images as ``<|image|>``, before a
    processor expands them).
    """
    from worker.contracts.decode import decode_event  # lazily: the contracts module loads schemas
    from worker.contracts.rejections import RejectedError, Rejection
    from worker.engine.policy import load_policies, resolve_policy

    family = family or settings.model.family
    try:
        get_family(family)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        print(f"cannot read {file}: {exc}", file=sys.stderr)
        return 1
    event = decode_event(raw, settings)
    if isinstance(event, Rejection):
        where = f" at {event.field}" if event.field else ""
        print(f"invalid event: {event.reason.value}{where}: {event.message}", file=sys.stderr)
        return 1
    try:
        policy = resolve_policy(
            load_policies(settings, family),
            policy_id if policy_id is not None else event.policy,
            settings.default_policy,
        )
    except RejectedError as exc:
        print(f"invalid event: {exc.rejection.reason.value}: {exc.rejection.message}", file=sys.stderr)
        return 1
    image_turns = event_image_turns(event)
    try:
        prompt = render_prompt(event.turns, policy, image_turns=image_turns, family=family)
    except ValueError as exc:
        print(f"cannot render the {family} prompt: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(prompt)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def event_image_turns(event: object) -> tuple[int, ...]:
    """The turn index of each image of a decoded event (``ChatEvent.images`` when present, else ``image``)."""
    images = getattr(event, "images", None)
    if images:
        return tuple(ref.turn_index for ref in images)
    image = getattr(event, "image", None)
    return () if image is None else (image.turn_index,)
