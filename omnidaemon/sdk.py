"""`omnidaemon.sdk`, where the OmniDaemon SDK kept `OmniDaemonSDK`: see `omnidaemon.compat`."""

from omnidaemon.compat.sdk import OmniDaemonSDK

__all__ = ["OmniDaemonSDK"]
