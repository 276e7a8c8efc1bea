"""`omnidaemon.schemas`, where the OmniDaemon SDK kept its models: see `omnidaemon.compat`."""

from omnidaemon.compat.models import AgentConfig, EventEnvelope, PayloadBase, SubscriptionConfig

__all__ = ["AgentConfig", "EventEnvelope", "PayloadBase", "SubscriptionConfig"]
