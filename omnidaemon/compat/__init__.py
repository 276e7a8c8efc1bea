"""The OmniDaemon SDK surface on omnidaemon's engine, for code written against OmniDaemon.

```python
from omnidaemon.compat import AgentConfig, EventEnvelope, OmniDaemonSDK, PayloadBase

sdk = OmniDaemonSDK()   # EVENT_BUS_TYPE=redis_stream + REDIS_URL, =nats + NATS_URL, or defaults
await sdk.register_agent(agent_config=AgentConfig(topic="file.uploaded", callback=process))
await sdk.start()
```
"""

from omnidaemon.compat.models import AgentConfig, EventEnvelope, PayloadBase, SubscriptionConfig
from omnidaemon.compat.sdk import OmniDaemonSDK, broker_url_from_env

__all__ = [
    "AgentConfig",
    "EventEnvelope",
    "OmniDaemonSDK",
    "PayloadBase",
    "SubscriptionConfig",
    "broker_url_from_env",
]
