"""Run `omnidaemon worker` processes under a `Supervisor`, for the supervisor tests.

    python tests/worker/_supervise.py N APP_PATH [extra worker args]

Exits with the status `Supervisor.run()` returns. The supervisor's logs are JSON lines on
standard error, where the children's go too. Tests shrink its timings through the environment:
`T_RESTART_INITIAL` and `T_RESTART_MAX` (the restart backoff, in seconds) and `T_SHUTDOWN_GRACE`.
"""

from __future__ import annotations

import os
import sys

import anyio

from omnidaemon.observability.logging import configure_logging
from omnidaemon.retry import Backoff
from omnidaemon.worker.supervisor import Supervisor


def main(argv: list[str]) -> int:
    processes, app_path, extra = int(argv[0]), argv[1], argv[2:]
    configure_logging("INFO", "json")
    supervisor = Supervisor(
        lambda index: [sys.executable, "-m", "omnidaemon", "worker", app_path, *extra],
        processes,
        shutdown_grace=float(os.environ.get("T_SHUTDOWN_GRACE", "30")),
        restart_backoff=Backoff(
            initial=float(os.environ.get("T_RESTART_INITIAL", "0.1")),
            maximum=float(os.environ.get("T_RESTART_MAX", "1")),
            jitter=False,
        ),
    )
    return anyio.run(supervisor.run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
