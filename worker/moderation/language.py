"""The language of the judged text, so review can weigh a verdict on text the model was not optimized for.

Llama Guard 3 Vision is optimized for English (its model card: English for image + text prompts); other
languages get verdicts, but with less reliable scores. Detection uses ``py3langid`` (langid.py's model,
shipped inside the wheel: no download at run time, ~100 languages, 0.1–0.4 ms per short text on the
dev machine, loaded once per process in 1–4 s). The judged text is the last message (what the verdict is about); results are
memoized per text; the stream and the HTTP endpoint detect only for events that reach the model (or a halting
blocklist) and keep the result in the verdict cache entry, so cache hits never pay for detection.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from typing import Any

# Below this normalized probability the detector is guessing (short text, names, code): say "und".
MIN_CONFIDENCE = 0.5
UNDETERMINED = "und"
_MEMO_SIZE = 8192
# The language shows in the first few hundred characters; the detector's cost grows with the text.
MAX_CHARS = 512
_lock = threading.Lock()
_identifier: Any = None


def _classifier() -> Any:
    global _identifier
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def warm_up() -> None:
    """Load the detector's model now (≈1–4 s) instead of on the first verdict."""
    _classifier()


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _detect(text: str) -> tuple[str, float]:
    code, probability = _classifier().classify(text)
    return str(code), float(probability)


def detect_language(texts: Iterable[str], optimized: Iterable[str]) -> dict[str, Any]:
    """``{"code": "fr", "confidence": 0.98, "model_optimized": false}`` for the judged text.

    ``code`` is ISO 639-1, or ``und`` when the detector is below ``MIN_CONFIDENCE``; ``model_optimized`` says
    whether ``code`` is among ``optimized`` (``model.optimized_languages``). ``und`` counts as not optimized.
    """
    text = "\n".join(texts).strip()[:MAX_CHARS]
    code, confidence = _detect(text) if text else (UNDETERMINED, 0.0)
    if confidence < MIN_CONFIDENCE:
        code = UNDETERMINED
    return {"code": code, "confidence": round(confidence, 3), "model_optimized": code in set(optimized)}
