"""The exceptions omnidaemon raises, all under `OmniDaemonError`."""

from __future__ import annotations

__all__ = [
    "AppLoadError",
    "BusUnavailable",
    "ConfigurationError",
    "OmniDaemonError",
    "PayloadValidationError",
]


class OmniDaemonError(Exception):
    """Base of every error omnidaemon raises on purpose."""


class ConfigurationError(OmniDaemonError):
    """A setting, broker URL or agent declaration cannot work; the message says what to change."""


class BusUnavailable(OmniDaemonError):
    """The bus did not answer within the timeout; the message names it (without password)."""


class AppLoadError(OmniDaemonError):
    """`module:attribute` did not name an importable `App`."""


class PayloadValidationError(OmniDaemonError):
    """A payload or return value did not match the type its agent declared."""
