#!/usr/bin/env bash
# The quick start: installs omnidaemon into .venv, starts a worker running the example document
# pipeline's agents, and publishes five documents to it from a second process. Both use the
# embedded bus (a local Valkey server omnidaemon starts in the clone's .omnidaemon/, which
# `bus init` makes so the clone has a bus of its own): nothing to set up.
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
export OMNIDAEMON_LOG_FORMAT="${OMNIDAEMON_LOG_FORMAT:-console}"

if [ -e .omnidaemon/valkey.conf ]; then
    rerun=1  # a server ran here before: the bus kept what earlier runs did, so counts are totals
else
    rerun=0
fi
.venv/bin/python -m omnidaemon bus init

echo "== starting a worker: python -m omnidaemon worker examples.document_pipeline:app"
.venv/bin/python -m omnidaemon worker examples.document_pipeline:app &
worker=$!
stop_worker() {
    kill -TERM "$worker" 2>/dev/null && wait "$worker" || true
}
stop() {
    stop_worker
    echo "== the embedded bus keeps your events in .omnidaemon/; stopping its server"
    .venv/bin/python -m omnidaemon bus stop
}
trap stop EXIT

echo "== publishing: python examples/document_pipeline.py"
report=$(mktemp)
.venv/bin/python examples/document_pipeline.py | tee "$report"
first_run=$(sed -n 's/.*python -m omnidaemon trace //p' "$report")
rm -f "$report"

# A running worker writes its counts to the bus about once a second; one that stops on SIGTERM
# writes them all before it exits. Stopped first, the table below is exact: it matches the
# report above.
echo "== stopping the worker (SIGTERM): it finishes its work and writes its counts"
stop_worker
echo "== what every worker did, from the bus: python -m omnidaemon metrics"
.venv/bin/python -m omnidaemon metrics
if [ "$rerun" = 1 ]; then
    echo "== (totals of every run on this bus, which keeps them; rm -rf .omnidaemon to start afresh)"
fi
echo "== the first document's whole run, from the bus: python -m omnidaemon trace $first_run"
.venv/bin/python -m omnidaemon trace "$first_run"
