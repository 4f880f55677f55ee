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
#
# Most RabbitMQ tests read RabbitMQ's management API (port 15672): with RabbitMQ up and the API
# off, the script enables the plugin (`rabbitmq-plugins enable rabbitmq_management`) if it can,
# else it says so in one line at the start, and at the end how many tests were skipped for it.
# (Sourced, this file only defines its functions: tests/test_cli.py checks them.)
set -euo pipefail

MANAGEMENT_FIX="rabbitmq-plugins enable rabbitmq_management"

port_open() {  # port: is something listening on 127.0.0.1:port?
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# With RabbitMQ up and its management API off: enable the plugin if rabbitmq-plugins is there
# (and wait for the API), else print one warning line. Returns 0 either way.
rabbitmq_management() {
  local amqp=${RABBITMQ_PORT:-5672} api=${RABBITMQ_MANAGEMENT_PORT:-15672}
  local plugins=${RABBITMQ_PLUGINS:-rabbitmq-plugins} wait=${RABBITMQ_MANAGEMENT_WAIT:-30} i
  port_open "$amqp" || return 0   # no RabbitMQ: its tests skip (or fail under CI) saying so
  port_open "$api" && return 0
  if command -v "$plugins" >/dev/null 2>&1; then
    echo "scripts/test.sh: the RabbitMQ management API (127.0.0.1:$api) is off: $MANAGEMENT_FIX"
    if "$plugins" enable rabbitmq_management >/dev/null 2>&1; then
      for ((i = 0; i < wait; i++)); do
        port_open "$api" && return 0
        sleep 1
      done
    fi
  fi
  echo "WARNING: the RabbitMQ management API (127.0.0.1:$api) is off, so most RabbitMQ tests" \
    "will be skipped; to run them: $MANAGEMENT_FIX"
}

# The number of tests the pytest logs given skipped for the management API, from their
# `-ra` summaries ("SKIPPED [93] tests/backends.py:301: RabbitMQ management API ...").
management_skips() {  # log files...
  cat "$@" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' \
    | sed -n 's/^SKIPPED \[\([0-9]*\)\] .*rabbitmq_management.*/\1/p' \
    | awk '{ n += $1 } END { print n + 0 }'
}

management_summary() {  # log files...
  local skipped
  skipped=$(management_skips "$@")
  if [ "$skipped" -gt 0 ]; then
    echo "WARNING: $skipped RabbitMQ tests were skipped: the RabbitMQ management API is off;" \
      "to run them: $MANAGEMENT_FIX"
  fi
}

main() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  PYTHON=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[all,dev]"
  .venv/bin/python -m ruff check src tests benchmarks examples
  .venv/bin/python -m ruff format --check src tests benchmarks examples
  .venv/bin/python -m mypy src
  rabbitmq_management
  if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
  fi

  logs=$(mktemp -d)
  trap 'rm -rf "$logs"' EXIT
  color=()
  [ -t 1 ] && color=(--color=yes)
  status=0
  closing=()

  run_pass parallel -n "${PYTEST_WORKERS:-4}" --dist worksteal -m "not serial"
  run_pass serial -p no:xdist -m serial
  echo
  printf '%s\n' "${closing[@]}"
  management_summary "$logs/parallel" "$logs/serial"
  exit "$status"
}

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

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
