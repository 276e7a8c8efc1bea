"""The worker: loading an app, running its agents, and stopping gracefully."""

from omnidaemon.worker.loader import load_app
from omnidaemon.worker.runner import Worker

__all__ = ["Worker", "load_app"]
