"""The sample labelled set shipped in ``examples/eval/``: held-out synthetic conversations for the tiny model.

``python -m worker.evaluation.sample_set`` rewrites ``examples/eval/synthetic_heldout.jsonl``; a test checks
the committed file equals what the generator makes (deterministic).
"""

from __future__ import annotations

from pathlib import Path

import orjson

from worker.dev.tiny_model.synthetic import synthetic_examples

SAMPLE_PATH = Path(__file__).resolve().parents[2] / "examples" / "eval" / "synthetic_heldout.jsonl"
SAMPLE_SIZE = 120
SAMPLE_SEED = 4242


def sample_lines(n: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> list[bytes]:
    """Each line: ``{"event": <chat event>, "label": {"decision": ..., "categories": [...]}}``."""
    return [
        orjson.dumps({"event": ex.event, "label": {"decision": ex.decision, "categories": list(ex.codes)}})
        for ex in synthetic_examples(n, seed=seed, split="heldout")
    ]


if __name__ == "__main__":
    SAMPLE_PATH.parent.mkdir(parents=True, exist_ok=True)
    SAMPLE_PATH.write_bytes(b"\n".join(sample_lines()) + b"\n")
    print(f"wrote {SAMPLE_PATH}")
