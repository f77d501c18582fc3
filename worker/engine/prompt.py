"""The Llama Guard 3 Vision prompt, byte-exact with the model's chat template.

``render_segments`` is the one place the prompt is built. It returns the prompt as pieces that are either
control tokens the *template* places (``<|begin_of_text|>``, the headers, ``<|image|>``, ``<|eot_id|>``) or
plain text (the instructions, the category list and the untrusted conversation). ``render_prompt`` joins
them into the exact string; the tokenizer (``worker.engine.tokenize``) encodes each plain piece with special
tokens split, so a user typing ``<|eot_id|>`` never produces a control token.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.engine.policy import Policy
from worker.events import Turn

if TYPE_CHECKING:
    from worker.config import Settings

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"
TEMPLATE_SPECIAL_TOKENS: tuple[str, ...] = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT, IMAGE)

_ROLE_LABEL = {"user": "User", "assistant": "Agent"}


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the prompt: a template control token (``special``) or plain text."""

    text: str
    special: bool = False


_HEADER = (
    Segment(BEGIN_OF_TEXT, True),
    Segment(START_HEADER, True),
    Segment("user"),
    Segment(END_HEADER, True),
    Segment("\n\n"),
)


def judged_role(turns: Sequence[Turn]) -> str:
    """``User`` when the conversation has an odd number of turns (prompt task), else ``Agent`` (response)."""
    return "User" if len(turns) % 2 == 1 else "Agent"


def _instructions(role: str, policy: Policy) -> str:
    categories = "".join(f"{c.code}: {c.name}.\n" for c in policy.categories)
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        f"{categories}"
        "<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\n"
    )


def shared_text_prefix(role: str, policy: Policy) -> list[Segment]:
    """The start of every text-only prompt judging ``role`` under ``policy``: everything before the conversation.

    It is identical across a batch's rows of the same policy and role, so its keys and values can be computed
    once and shared (see ``GuardEngine``).
    """
    return [*_HEADER, Segment(_instructions(role, policy))]


def render_segments(turns: Sequence[Turn], policy: Policy, *, has_image: bool) -> list[Segment]:
    """The prompt as template control tokens and plain-text pieces, in order (see the module docstring)."""
    role = judged_role(turns)
    conversation = "".join(
        f"{_ROLE_LABEL[turn.role]}: {text.strip()}\n\n" for turn in turns for text in turn.texts
    )
    body = (
        f"{_instructions(role, policy)}"
        f"{conversation}"
        "<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories. "
    )
    segments = list(_HEADER)
    if has_image:
        # The model card's template puts the single image token (plus a space) before the task text.
        segments.append(Segment(IMAGE, True))
        body = " " + body
    segments += [
        Segment(body),
        Segment(EOT, True),
        Segment(START_HEADER, True),
        Segment("assistant"),
        Segment(END_HEADER, True),
    ]
    return segments


def render_prompt(turns: Sequence[Turn], policy: Policy, *, has_image: bool) -> str:
    """The exact prompt string the model reads for ``turns`` under ``policy`` (issue 3, item 2)."""
    return "".join(s.text for s in render_segments(turns, policy, has_image=has_image))


def prompt_command(file: str, settings: Settings, policy_id: str | None = None) -> int:
    """``moderation-worker prompt FILE|-``: print the exact prompt for one event; 1 if the event is invalid."""
    from worker.dead_letters import RejectedError, Rejection
    from worker.decode import decode_event  # lazily: the contracts module loads schemas
    from worker.engine.policy import load_policies, resolve_policy

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
            load_policies(settings),
            policy_id if policy_id is not None else event.policy,
            settings.default_policy,
        )
    except RejectedError as exc:
        print(f"invalid event: {exc.rejection.reason.value}: {exc.rejection.message}", file=sys.stderr)
        return 1
    sys.stdout.write(render_prompt(event.turns, policy, has_image=event.image is not None))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
