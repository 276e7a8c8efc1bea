#!/usr/bin/env bash
# The quick start: installs omnidaemon into .venv and runs the example document pipeline
# (its agents in a worker, and a publisher sending it five documents).
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
exec .venv/bin/python examples/document_pipeline.py "$@"
