#!/usr/bin/env bash
# Create .venv and install the project with the given extras, once per pyproject.toml version (idempotent).
# Usage: scripts/bootstrap.sh EXTRAS   (e.g. "embedded" or "test")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-embedded}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.installed-${extras}-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "==> installing moderation-worker[${extras}] into .venv (first run only; a few minutes)"
# torch first, pinned, with pip: 2.13.0 is the CPU wheel (pip's configuration may point at a local copy); an
# unpinned or newer torch pulls a multi-GB CUDA build. GPU hosts install a CUDA wheel instead (README).
.venv/bin/python -m pip install --quiet "torch==2.13.0" "uv>=0.13,<0.14"
# The rest with uv (parallel downloads and installs: minutes faster than pip on a fresh machine); it keeps the
# installed torch, which satisfies the project's range. pip does it where uv cannot run.
if ! .venv/bin/uv pip install --quiet --python .venv/bin/python -e ".[${extras}]"; then
  echo "==> uv failed; installing with pip"
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
fi
touch "$stamp"
