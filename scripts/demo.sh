#!/usr/bin/env bash
# The main job on embedded defaults: embedded broker + Redis + tiny trained model, a sample stream through
# the worker (as a local Ray actor), flagged results and a summary. Extra arguments go to `moderation-worker demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh embedded
exec .venv/bin/moderation-worker demo "$@"
