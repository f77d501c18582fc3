"""Build the trained tiny checkpoints the tests use, ahead of pytest: ``python -m tests.support.prebuild FAMILY...``.

``scripts/test.sh`` starts this in the background so that a cold cache trains while lint, type checks and the
tests that need no checkpoint run; a test that needs one waits on the build's file lock (and builds it
itself if this process failed). Prints one line per family with its wall time.
"""

from __future__ import annotations

import sys
import time

from worker.dev.tiny_model.build import ensure_tiny_model


def main(families: list[str]) -> int:
    """Ensure each family's trained checkpoint is in the cache; 0 when all are there."""
    for family in families:
        started = time.monotonic()
        path = ensure_tiny_model(train=True, family=family)
        print(f"tiny checkpoint {family}: {path} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
