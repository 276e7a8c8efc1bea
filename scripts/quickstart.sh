#!/usr/bin/env bash
# The quick start: installs omnidaemon into .venv, starts a worker running the example document
# pipeline's agents, and publishes five documents to it from a second process. Both use the
# embedded bus (a local Valkey server omnidaemon starts in the clone's .omnidaemon/, which
# `bus init` makes so the clone has a bus of its own): nothing to set up.
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
export OMNIDAEMON_LOG_FORMAT="${OMNIDAEMON_LOG_FORMAT:-console}"

.venv/bin/python -m omnidaemon bus init
echo "== starting a worker: python -m omnidaemon worker examples.document_pipeline:app"
.venv/bin/python -m omnidaemon worker examples.document_pipeline:app &
worker=$!
stop() {
    kill -TERM "$worker" 2>/dev/null && wait "$worker" || true
    echo "== the embedded bus keeps your events in .omnidaemon/; stopping its server"
    .venv/bin/python -m omnidaemon bus stop
}
trap stop EXIT

echo "== publishing: python examples/document_pipeline.py"
.venv/bin/python examples/document_pipeline.py

echo "== what every worker did, from the bus: python -m omnidaemon metrics"
.venv/bin/python -m omnidaemon metrics
