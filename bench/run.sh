#!/usr/bin/env bash
# The benchmark in one command: bash bench/run.sh [--quick | --smoke] [--no-peers] [--cases ...] [-n N]
# Needs redis-server on PATH (bash scripts/test.sh installs it) and the project's venv (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "bench: no .venv here: run 'bash scripts/test.sh' (or scripts/quickstart.sh) first" >&2
    exit 2
fi
exec .venv/bin/python -m bench "$@"
