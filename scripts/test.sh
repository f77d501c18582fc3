#!/usr/bin/env bash
# The whole test suite (unit + integration against real tansu, Redis, Ray and the tiny Mllama).
# Fails when no test ran (pytest exit code 5). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test || exit 1
# Lint and format first: a finding fails the run, like a test (ruff's settings are in pyproject.toml).
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
# Types of the pure core (the files listed under [tool.mypy] in pyproject.toml).
.venv/bin/mypy || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
