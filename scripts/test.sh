#!/usr/bin/env bash
# The test command: installs everything the tests need, then runs ruff, mypy and pytest.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev,api,docs

# Integration tests start their own redis-server on a free loopback port.
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing redis-server from Debian's packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is missing: install it (sudo apt-get install -y redis-server)" >&2
        exit 1
    fi
fi

echo "== ruff"
.venv/bin/ruff check omnidaemon tests examples bench
.venv/bin/ruff format --check omnidaemon tests examples bench
echo "== mypy --strict"
.venv/bin/mypy
.venv/bin/mypy --strict tests/typing
echo "== pytest"
# Four processes on two cores, each test file on one of them in order, each with its own
# servers: most tests wait on worker processes and servers (measured: a process-heavy file
# keeps 43% of one core busy), so four finish the suite in about 7 minutes where two took
# more than 9.
.venv/bin/python -m pytest -n 4 --dist loadfile "$@"
