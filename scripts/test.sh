#!/usr/bin/env bash
# Install roomrouter with every extra into .venv and run the linters and the test suite.
# Backend tests need Redis, RabbitMQ, PostgreSQL and MariaDB on 127.0.0.1 (Kafka is started by the tests);
# without CI set, a missing server skips its tests with the reason, with CI set it fails them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[all,dev]"
.venv/bin/python -m ruff check src tests benchmarks examples
.venv/bin/python -m ruff format --check src tests benchmarks examples
.venv/bin/python -m mypy src
.venv/bin/python -m pytest "$@"
