"""Imported at start-up by the workers `python -m bench.instructions` runs under valgrind (this
folder is put on their `PYTHONPATH`): a worker there runs about 50 times slower, so work done
per second of wall clock (the cancellation poll, heartbeats) would be counted as work per
event, and acks would go in batches of a few events. This spaces the periodic work out and
lets a batch of acks wait `OMNI_BENCH_ACK_DELAY` seconds (default 1), so that the count is
the same from one run to the next and batches are as full as in a fast worker's drain."""

import os

if os.environ.get("OMNI_BENCH_STEADY"):
    import omnidaemon.worker.acks as _acks
    import omnidaemon.worker.cancels as _cancels

    _cancels.POLL_INTERVAL = 1e6
    _delay = float(os.environ.get("OMNI_BENCH_ACK_DELAY", "1.0"))
    _init = _acks.AckBatcher.__init__

    def _steady_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["max_delay"] = _delay
        _init(self, *args, **kwargs)

    _acks.AckBatcher.__init__ = _steady_init  # type: ignore[method-assign]
