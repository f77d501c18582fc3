"""Llama Guard 3 8B: its chat template, rule by rule (it differs from the 1B/Vision one in several bytes).

- a *space*, then ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n`` (the template's
  string literal starts with ``" <|begin_of_text|>"``)
- ``Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy
  with the below categories.\\n\\n`` ("according our", sic)
- ``<BEGIN UNSAFE CONTENT CATEGORIES>\\n``, S1–S14 (S14: Code Interpreter Abuse.), one per line,
  ``<END UNSAFE CONTENT CATEGORIES>\\n\\n`` — written out in the template: it takes no ``categories`` or
  ``excluded_category_keys`` argument. The engine renders a policy's own list in the same line format
  (what Meta's prompt-format guide does for custom categories); with the default policy the bytes are
  the template's.
- ``<BEGIN CONVERSATION>\\n\\n``, then per message ``{User|Agent}: {content.strip()}\\n\\n`` — content is a
  *string* (a list of parts raises in the template). A turn's text parts are joined with ``\\n\\n`` into
  that string (``TEXT_PART_SEPARATOR``) before stripping.
- ``<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST {role} message in the above
  conversation:\\n - First line must read 'safe' or 'unsafe'.\\n - If unsafe, a second line must include a
  comma-separated list of violated categories.`` — *no* space — ``<|eot_id|><|start_header_id|>assistant
  <|end_header_id|>``
- text only: no image token.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.engine.families import llama_guard_3_vision as _vision
from worker.engine.families.common import (
    Conversation,
    RenderedCategory,
    Segment,
    category_lines,
    judged_role,
    role_label,
)

BUILTIN_CODES = tuple(f"S{i}" for i in range(1, 15))
SPECIAL_TOKENS = (_vision.BEGIN_OF_TEXT, _vision.START_HEADER, _vision.END_HEADER, _vision.EOT)
TEXT_PART_SEPARATOR = "\n\n"

HEADER = (Segment(" "), *_vision.HEADER)


def message_content(texts: Sequence[str]) -> str:
    """The string content of one message: its text parts joined (the template reads one string)."""
    return TEXT_PART_SEPARATOR.join(texts)


def prefix(role: str, categories: Sequence[RenderedCategory]) -> list[Segment]:
    """Everything before the first message (shared across rows)."""
    return [
        *HEADER,
        Segment("\n\n"),
        Segment(
            f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
            "policy with the below categories.\n\n"
            "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
            f"{category_lines(categories)}"
            "<END UNSAFE CONTENT CATEGORIES>\n\n"
            "<BEGIN CONVERSATION>\n\n"
        ),
    ]


def render(conv: Conversation, categories: Sequence[RenderedCategory]) -> list[Segment]:
    """The whole prompt as segments."""
    role = judged_role(conv.turns)
    body = "".join(f"{role_label(t)}: {message_content(t.texts).strip()}\n\n" for t in conv.turns) + (
        "<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
    )
    start = prefix(role, categories)
    # One plain piece for the instructions and the conversation, as in the other families.
    return [*start[:-1], Segment(start[-1].text + body), *_vision.CLOSING]


def _family():
    from worker.engine.families import LG3_8B, Family

    return Family(
        name=LG3_8B,
        builtin_codes=BUILTIN_CODES,
        image_drops=(),
        max_images=0,
        special_tokens=SPECIAL_TOKENS,
        image_token=None,
        end_of_turn=_vision.EOT,
        model_type="llama",
        params="8.0B",
        render=render,
        prefix=prefix,
        template_takes_categories=False,
    )


FAMILY = _family()
