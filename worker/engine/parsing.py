"""Strict parsing of the model's answer: ``safe`` or ``unsafe`` + newline + ``S1,S3``. Pure; no torch.

Accepted, and nothing else:
- surrounding whitespace (the model emits ``\\n\\n`` before the answer; decoding may leave a trailing newline);
- first line exactly ``safe`` (then nothing more), or exactly ``unsafe`` followed by one line of codes;
- codes ``S<number>`` separated by commas, optionally with spaces around the commas.
Codes outside the policy (disabled ones, or unknown ones such as ``S14``) are dropped and reported, never
silently kept; duplicates collapse. Anything else (``Safe``, ``unsafe`` without codes, extra lines, stray
text, a truncated answer) is an ``EngineError`` carrying the raw text — the engine never guesses.

An answer whose codes are all dropped stays ``unsafe`` with no codes: the decision comes from the model's
first line (or its score), the codes only explain it; ``dropped_codes`` tells the reader why the list is empty.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from worker.engine.types import EngineError

_CODES_LINE = re.compile(r"S\d{1,3}(?:[ \t]*,[ \t]*S\d{1,3})*")


@dataclass(frozen=True, slots=True)
class ParsedAnswer:
    """The model's answer: decision, enabled codes in code order, and codes dropped because not enabled."""

    unsafe: bool
    codes: tuple[str, ...] = ()
    dropped_codes: tuple[str, ...] = ()


def _code_number(code: str) -> int:
    return int(code[1:])


def parse_answer(raw: str, enabled_codes: Collection[str]) -> ParsedAnswer:
    """Parse one answer; raises ``EngineError(raw_output=raw)`` when it is not in the exact format."""
    text = raw.strip()
    lines = text.split("\n")
    first = lines[0].strip()
    if first == "safe":
        if len(lines) != 1:
            raise EngineError("model answered 'safe' followed by more text", raw_output=raw)
        return ParsedAnswer(False)
    if first != "unsafe":
        raise EngineError("model answer does not start with 'safe' or 'unsafe'", raw_output=raw)
    if len(lines) != 2:
        what = "no category line" if len(lines) == 1 else "more than one category line"
        raise EngineError(f"model answered 'unsafe' with {what}", raw_output=raw)
    codes_line = lines[1].strip()
    if not _CODES_LINE.fullmatch(codes_line):
        raise EngineError("model's category line is not a comma-separated list of codes", raw_output=raw)
    seen = dict.fromkeys(c.strip() for c in codes_line.split(","))
    kept = sorted((c for c in seen if c in enabled_codes), key=_code_number)
    dropped = sorted((c for c in seen if c not in enabled_codes), key=_code_number)
    return ParsedAnswer(True, tuple(kept), tuple(dropped))


def parse_codes_continuation(continuation: str, enabled_codes: Collection[str]) -> ParsedAnswer:
    """Parse what the model wrote after a forced ``unsafe`` (single-pass decoding): ``\\nS1,S3``."""
    return parse_answer("unsafe" + continuation, enabled_codes)
