"""The `omnidaemon` command line."""

from omnidaemon.cli.main import main

__all__ = ["main"]
