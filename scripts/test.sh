#!/usr/bin/env bash
# The test command: installs everything the tests need, then runs ruff, mypy and pytest.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev,api,docs

# Integration tests start their own redis-server on a free loopback port; the dashboard's
# browser tests drive Debian's chromium through its matching chromium-driver.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing ${missing[*]} from Debian's packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing: ${missing[*]}: install them (sudo apt-get install -y ${missing[*]})" >&2
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
# The tests start hundreds of worker processes, each importing omnidaemon afresh: with
# bytecode writing turned off (as this sandbox's environment does) every one compiled the
# package from source, 0.13 s of CPU each (10 % of a process-heavy test file's CPU). The
# bytecode is cached outside the checkout instead.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-${TMPDIR:-/tmp}/omnidaemon-pycache}"
.venv/bin/python -m compileall -q omnidaemon tests bench examples >/dev/null
# Four processes on two cores: most tests wait on worker processes and servers (measured: a
# process-heavy file keeps 43% of one core busy), so four finish where two took more than 9
# minutes. Tests are shared out one by one, an idle process taking work from a busy one
# (`worksteal`): with whole files per process (`loadfile`), the longest files (250 s of
# worker-process tests in one) left three processes idle at the end: 585 s against 478 s.
.venv/bin/python -m pytest -n 4 --dist worksteal "$@"
