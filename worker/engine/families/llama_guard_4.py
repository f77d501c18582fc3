"""Llama Guard 4 12B: its chat template, rule by rule.

- ``<|begin_of_text|><|header_start|>user<|header_end|>\\n\\n`` (its own header tokens)
- ``Task: Check if there is unsafe content in '{role}' messages in conversations according to our safety
  policy with the below categories.\\n\\n`` ("according *to* our", unlike Llama Guard 3)
- ``<BEGIN UNSAFE CONTENT CATEGORIES>\\n``, one ``{code}: {text}\\n`` per category not excluded,
  ``<END UNSAFE CONTENT CATEGORIES>\\n\\n``; without a ``categories`` argument: S1–S14, or S1–S13 when any
  message holds an image (the template drops S14, Code Interpreter Abuse, for image conversations)
- ``<BEGIN CONVERSATION>\\n`` (one newline only)
- per message, per *text part* (content is a list of parts; a message without text renders nothing, its
  images included): ``{User|Agent}: ``, then on the message's *first* text part one ``<|image|>`` per image
  of that message, then ``{text | trim}``, then a literal backslash-n pair twice (``\\\\n\\\\n``, the template
  writes them outside an expression) and two real newlines
- ``<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST {role} message in the above
  conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line must include a
  comma-separated list of violated categories. `` (space) ``<|eot|><|header_start|>assistant<|header_end|>``

The processor later expands each ``<|image|>`` into ``<|image_start|>``, patch tokens and ``<|image_end|>``;
the prompt command shows the template's form.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.families.common import (
    Conversation,
    RenderedCategory,
    Segment,
    category_lines,
    judged_role,
    role_label,
)

BEGIN_OF_TEXT = "<|begin_of_text|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
EOT = "<|eot|>"
IMAGE = "<|image|>"
SPECIAL_TOKENS = (BEGIN_OF_TEXT, HEADER_START, HEADER_END, EOT, IMAGE)
BUILTIN_CODES = tuple(f"S{i}" for i in range(1, 15))
IMAGE_DROPS = ("S14",)
MESSAGE_END = "\\n\\n\n\n"  # backslash, n, backslash, n, newline, newline

HEADER = (
    Segment(BEGIN_OF_TEXT, True),
    Segment(HEADER_START, True),
    Segment("user"),
    Segment(HEADER_END, True),
)
CLOSING = (Segment(EOT, True), Segment(HEADER_START, True), Segment("assistant"), Segment(HEADER_END, True))


def prefix(role: str, categories: Sequence[RenderedCategory]) -> list[Segment]:
    """Everything before the first message (shared across text-only rows)."""
    return [
        *HEADER,
        Segment("\n\n"),
        Segment(
            f"Task: Check if there is unsafe content in '{role}' messages in conversations according to our "
            "safety policy with the below categories.\n\n"
            "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
            f"{category_lines(categories)}"
            "<END UNSAFE CONTENT CATEGORIES>\n\n"
            "<BEGIN CONVERSATION>\n"
        ),
    ]


def render(conv: Conversation, categories: Sequence[RenderedCategory]) -> list[Segment]:
    """The whole prompt as segments (adjacent plain pieces merged)."""
    role = judged_role(conv.turns)
    segments = prefix(role, categories)
    for index, turn in enumerate(conv.turns):
        for part, text in enumerate(turn.texts):
            segments.append(Segment(f"{role_label(turn)}: "))
            if part == 0:
                segments += [Segment(IMAGE, True)] * conv.images_in(index)
            segments.append(Segment(text.strip() + MESSAGE_END))
    segments.append(
        Segment(
            "<END CONVERSATION>\n\n"
            f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
            " - First line must read 'safe' or 'unsafe'.\n"
            " - If unsafe, a second line must include a comma-separated list of violated categories. "
        )
    )
    segments += CLOSING
    return _merge_plain(segments, keep=len(HEADER) + 2)


def _merge_plain(segments: list[Segment], keep: int) -> list[Segment]:
    """Join runs of plain pieces after the first ``keep`` (the shared prefix keeps its own boundaries)."""
    out = list(segments[:keep])
    for seg in segments[keep:]:
        if not seg.special and out and not out[-1].special and len(out) > keep:
            out[-1] = Segment(out[-1].text + seg.text)
        else:
            out.append(seg)
    return out


def _family():
    from worker.engine.families import LG4, Family

    return Family(
        name=LG4,
        builtin_codes=BUILTIN_CODES,
        image_drops=IMAGE_DROPS,
        max_images=16,  # the engine's cap; limits.max_images_llama_guard_4 sets the working limit
        special_tokens=SPECIAL_TOKENS,
        image_token=IMAGE,
        end_of_turn=EOT,
        model_type="llama4",
        params="12B",
        render=render,
        prefix=prefix,
        template_takes_categories=True,
    )


FAMILY = _family()
