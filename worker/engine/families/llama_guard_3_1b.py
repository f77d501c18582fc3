"""Llama Guard 3 1B: its chat template is byte-identical to Llama Guard 3 11B Vision's.

So the rules are those of ``worker.engine.families.llama_guard_3_vision`` (list-of-parts content, S1–S13,
``categories`` / ``excluded_category_keys`` arguments, "according our", a space before ``<|eot_id|>``).
The 1B model reads no images: its tokenizer has no ``<|image|>`` token, so the engine never sends it one and
the prompt command refuses image events for it.
"""

from __future__ import annotations

from worker.engine.families import llama_guard_3_vision as _vision

BUILTIN_CODES = _vision.BUILTIN_CODES
SPECIAL_TOKENS = tuple(t for t in _vision.SPECIAL_TOKENS if t != _vision.IMAGE)
render = _vision.render
prefix = _vision.prefix


def _family():
    from worker.engine.families import LG3_1B, Family

    return Family(
        name=LG3_1B,
        builtin_codes=BUILTIN_CODES,
        image_drops=(),
        max_images=0,
        special_tokens=SPECIAL_TOKENS,
        image_token=None,
        end_of_turn=_vision.EOT,
        model_type="llama",
        params="1.5B",
        render=render,
        prefix=prefix,
        template_takes_categories=True,
    )


FAMILY = _family()
