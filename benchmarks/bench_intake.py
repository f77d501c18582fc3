"""Per-event cost of the intake additions: blocklist matching, language detection, and the category-score read.

Run: .venv/bin/python benchmarks/bench_intake.py [--events 5000] [--terms 1000]

Prints, in the same run (no thresholds: figures only):
  decode_event            the existing decoder on ~300-character messages (the baseline per event)
  blocklist match         fold (NFKC + anyascii + casefold) + one Aho-Corasick pass over --terms terms + 20 RE2
                          patterns, per event, and its ratio to decode_event
  language (uncached)     py3langid on distinct texts, and its ratio to decode_event (only model-bound events
                          pay it: cache hits read it from the cache entry)
  scoring pass            the tiny checkpoint's single-pass forward (batch 32) without and with the code-token
                          read that yields category_scores (ratio = the read's overhead)
"""

from __future__ import annotations

import argparse
import random
import time

import orjson

from worker.config import BlocklistSettings, Settings
from worker.contracts.decode import decode_event
from worker.engine.blocklist import compile_blocklists
from worker.moderation.language import _detect, detect_language, warm_up

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "what",
    "does",
    "it",
    "mean",
    "when",
    "my",
    "friend",
    "keeps",
    "calling",
    "at",
    "night",
]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(50)) + f" #{i}" for i in range(n)]


def per_event_us(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--terms", type=int, default=1000)
    args = parser.parse_args()
    settings = Settings()
    sample = texts(args.events, 1)
    records = [
        orjson.dumps(
            {"event_id": f"e{i}", "conversation_id": "c", "messages": [{"role": "user", "content": t}]}
        )
        for i, t in enumerate(sample)
    ]
    decode_us = per_event_us(lambda r: decode_event(r, settings), records)
    rng = random.Random(2)
    terms = [f"{rng.choice(WORDS)}zz{i}" for i in range(args.terms)]
    patterns = [rf"\b{rng.choice(WORDS)}\s+zz{i}\b" for i in range(20)]
    lists = compile_blocklists(
        "bench", {"terms": BlocklistSettings(terms=terms, patterns=patterns, category="spam")}, {}
    )
    match_us = per_event_us(lambda t: lists.match([t]), sample)
    warm_up()
    _detect.cache_clear()
    lang_us = per_event_us(lambda t: detect_language([t], ["en"]), sample)
    print(f"decode_event            {decode_us:8.1f} us/event")
    print(f"blocklist match         {match_us:8.1f} us/event   ({match_us / decode_us:.2f}x decode)")
    print(f"language (uncached)     {lang_us:8.1f} us/event   ({lang_us / decode_us:.2f}x decode)")
    scoring_overhead()


def scoring_overhead() -> None:
    import torch

    from worker.config import load_settings
    from worker.contracts.events import Turn
    from worker.dev.tiny_model.build import ensure_tiny_model
    from worker.engine import scoring
    from worker.engine.engine import GuardEngine
    from worker.engine.types import GuardRequest

    engine = GuardEngine.from_settings(load_settings(None, model__path=str(ensure_tiny_model(train=True))))
    policy = engine.policy_for(None)
    batch = engine.prepare([GuardRequest((Turn("user", (t,)),), policy) for t in texts(32, 3)])
    inputs = scoring.to_device(batch.inputs, engine.loaded.device, engine.loaded.dtype)
    # Interleaved, best of 10 each: a shared, busy machine drifts between consecutive blocks of runs.
    best = {"without": float("inf"), "with": float("inf")}
    for _ in range(10):
        for label, code_ids in (("without", ()), ("with", list(engine.code_tokens.values()))):
            cache = engine._prefix_cache(batch) if batch.prefix_keys else None
            start = time.perf_counter()
            with torch.inference_mode():
                scoring.score(
                    engine.model,
                    inputs,
                    engine.answer,
                    engine.answer_tail,
                    keep_cache=False,
                    cache=cache,
                    code_ids=code_ids,
                )
            best[label] = min(best[label], time.perf_counter() - start)
    figures = {label: seconds * 1000 for label, seconds in best.items()}
    print(
        f"scoring pass, batch 32  {figures['without']:8.2f} ms without category scores, "
        f"{figures['with']:.2f} ms with ({figures['with'] / figures['without']:.3f}x)"
    )


if __name__ == "__main__":
    main()
