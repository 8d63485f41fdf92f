#!/usr/bin/env bash
# Set up (once) and run the whole suite: ruff, the import contracts, mypy, then unit, integration and
# end-to-end tests on real servers (embedded PostgreSQL 18 + the Tansu Kafka-protocol broker, or
# testcontainers when a Docker engine answers, or LEADFLOW_TEST_* URLs), then the integration
# tier again on the machine's PostgreSQL 15 when one answers on 127.0.0.1:5432 (required in CI).
# Extra arguments go to every pytest run, e.g. `bash scripts/test.sh -x -k settings`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${LEADFLOW_VENV:-.venv}
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "leadflow needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv with $python"
  "$python" -m venv "$venv"
fi
echo "==> installing leadflow with its test extras"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test,mysql]'
# shellcheck disable=SC1091
. "$venv/bin/activate"

echo "==> ruff"
ruff check .
ruff format --check .
echo "==> import contracts"
lint-imports
echo "==> mypy (strict)"
mypy

echo "==> unit, integration and end-to-end tests"
pytest "$@"

pg15=${LEADFLOW_TEST_PG15_URL:-postgresql://postgres@127.0.0.1:5432/test}
if python -c "import psycopg, sys; psycopg.connect(sys.argv[1], connect_timeout=3).close()" "$pg15" 2>/dev/null; then
  echo "==> integration tests again on the machine's PostgreSQL ($pg15)"
  LEADFLOW_TEST_DATABASE_URL=$pg15 pytest tests/integration "$@"
elif [ "${CI:-}" = "true" ]; then
  echo "PostgreSQL at $pg15 does not answer; CI runs the integration tier on it too" >&2
  exit 1
else
  echo "==> skipped the second integration run: no PostgreSQL answers at $pg15"
fi
echo "==> all green"
