"""Observability: logging now; metrics and health checks later."""

from omnidaemon.observability.logging import configure_logging

__all__ = ["configure_logging"]
