#!/usr/bin/env bash
# Install roomrouter with every extra into .venv and run the linters and the test suite.
# Backend tests need Redis, RabbitMQ, PostgreSQL and MariaDB on 127.0.0.1 (Kafka is started by the tests);
# without CI set, a missing server skips its tests with the reason, with CI set it fails them.
#
# Without arguments the suite runs in two passes (see tests/conftest.py): every test not marked
# `serial` on PYTEST_WORKERS pytest-xdist workers (default 4: the tests mostly wait on I/O), then
# the serial ones alone. The exit status is non-zero if either pass failed, and the last lines
# repeat each pass's closing line. With arguments, they go to one plain `pytest` run instead
# (e.g. `bash scripts/test.sh tests/test_redis.py -x`; add `-n 4` for workers).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[all,dev]"
.venv/bin/python -m ruff check src tests benchmarks examples
.venv/bin/python -m ruff format --check src tests benchmarks examples
.venv/bin/python -m mypy src
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
color=()
[ -t 1 ] && color=(--color=yes)
status=0
closing=()

run_pass() {  # name, pytest arguments...
  local name=$1 rc
  shift
  set +e
  .venv/bin/python -m pytest "${color[@]}" "$@" | tee "$logs/$name"
  rc=${PIPESTATUS[0]}
  set -e
  # 5: nothing collected (no serial test selected): not a failure.
  if [ "$rc" -eq 5 ]; then rc=0; fi
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  closing+=("$name pass (exit $rc): $(tail -n 1 "$logs/$name" | sed 's/\x1b\[[0-9;]*m//g')")
}

run_pass parallel -n "${PYTEST_WORKERS:-4}" --dist worksteal -m "not serial"
run_pass serial -p no:xdist -m serial
echo
printf '%s\n' "${closing[@]}"
exit "$status"
