#!/usr/bin/env bash
# The whole test suite (unit + integration against real tansu, Redis, Ray and the tiny Mllama).
# Fails when no test ran (pytest exit code 5). Extra arguments go to pytest.
# Tests run in MW_TEST_WORKERS pytest-xdist processes (default 3; 0 runs them in this process): the suite
# mostly waits on brokers, subprocesses and Ray, so 3 workers keep 2 cores busy.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test || exit 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# The trained tiny checkpoints (minutes on a cold cache, instant when cached) build in the background while
# lint, types and the tests that need no checkpoint run; tests that need one wait on its file lock. The Vision
# guard (most tests use it) trains first at normal priority; the text guard and Llama Guard 4 after it.
prebuild_log="$(mktemp -t mw-prebuild.XXXXXX)"
.venv/bin/python -m tests.support.prebuild llama-guard-3-vision >>"$prebuild_log" 2>&1 &
vision_pid=$!
nice -n 5 .venv/bin/python -m tests.support.prebuild llama-guard-3-1b llama-guard-4 >>"$prebuild_log" 2>&1 &
others_pid=$!
trap 'kill "$vision_pid" "$others_pid" 2>/dev/null' EXIT
# Lint and format first: a finding fails the run, like a test (ruff's settings are in pyproject.toml).
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
# Types of the pure core (the files listed under [tool.mypy] in pyproject.toml).
.venv/bin/mypy || exit 1
workers="${MW_TEST_WORKERS:-3}"
xdist=()
if [ "$workers" != 0 ]; then
  # loadgroup: tests on Ray share one worker (tests/conftest.py marks them), the rest spread by load.
  xdist=(-n "$workers" --dist loadgroup)
fi
.venv/bin/python -m pytest "${xdist[@]}" "$@"
rc=$?
# A run that needed no checkpoint (e.g. the unit tests) does not wait for the builds: they stop here and
# the next run resumes them.
kill "$vision_pid" "$others_pid" 2>/dev/null
sed 's/^/prebuild: /' "$prebuild_log"
rm -f "$prebuild_log"
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
