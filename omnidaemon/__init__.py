"""omnidaemon: event-driven AI agents on a real event bus.

```python
from omnidaemon import App, Context

app = App("docs")

@app.agent("document.uploaded", publishes="text.extracted")
async def extract_text(event: Uploaded, ctx: Context) -> Extracted: ...
```
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omnidaemon.agents import AgentSpec
    from omnidaemon.app import App

    # The OmniDaemon SDK's names, where its code imports them (`from omnidaemon import
    # OmniDaemonSDK`); explicit re-exports, outside `__all__`, which is the native API.
    from omnidaemon.compat import AgentConfig as AgentConfig
    from omnidaemon.compat import EventEnvelope as EventEnvelope
    from omnidaemon.compat import OmniDaemonSDK as OmniDaemonSDK
    from omnidaemon.compat import PayloadBase as PayloadBase
    from omnidaemon.compat import SubscriptionConfig as SubscriptionConfig
    from omnidaemon.context import Context
    from omnidaemon.dead_letters import DeadLetter
    from omnidaemon.envelope import Envelope
    from omnidaemon.errors import (
        AgentFailed,
        AppLoadError,
        BusUnavailable,
        Cancelled,
        ConfigurationError,
        DelayTooLong,
        OmniDaemonError,
        PayloadTooLarge,
        PayloadValidationError,
    )
    from omnidaemon.flow import Budget, RateLimit
    from omnidaemon.results import Result
    from omnidaemon.retry import Backoff, Reject, Retry, RetryPolicy
    from omnidaemon.streaming.stream import OutputStream, StreamChunk
    from omnidaemon.traces.reading import RunSummary
    from omnidaemon.traces.tree import Trace

# Names are imported on first use, so that `omnidaemon --help` and other light commands do not
# pay for pydantic, redis and the rest at start-up.
_LAZY = {
    "AgentSpec": "omnidaemon.agents",
    "App": "omnidaemon.app",
    "Context": "omnidaemon.context",
    "DeadLetter": "omnidaemon.dead_letters",
    "Envelope": "omnidaemon.envelope",
    "AgentFailed": "omnidaemon.errors",
    "AppLoadError": "omnidaemon.errors",
    "BusUnavailable": "omnidaemon.errors",
    "Cancelled": "omnidaemon.errors",
    "ConfigurationError": "omnidaemon.errors",
    "DelayTooLong": "omnidaemon.errors",
    "OmniDaemonError": "omnidaemon.errors",
    "PayloadTooLarge": "omnidaemon.errors",
    "PayloadValidationError": "omnidaemon.errors",
    "Result": "omnidaemon.results",
    "Budget": "omnidaemon.flow",
    "RateLimit": "omnidaemon.flow",
    "Backoff": "omnidaemon.retry",
    "Reject": "omnidaemon.retry",
    "Retry": "omnidaemon.retry",
    "RetryPolicy": "omnidaemon.retry",
    "OutputStream": "omnidaemon.streaming.stream",
    "StreamChunk": "omnidaemon.streaming.stream",
    "RunSummary": "omnidaemon.traces.reading",
    "Trace": "omnidaemon.traces.tree",
    # The OmniDaemon SDK's top-level names (see omnidaemon.compat); not in __all__.
    "AgentConfig": "omnidaemon.compat",
    "EventEnvelope": "omnidaemon.compat",
    "OmniDaemonSDK": "omnidaemon.compat",
    "PayloadBase": "omnidaemon.compat",
    "SubscriptionConfig": "omnidaemon.compat",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'omnidaemon' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AgentFailed",
    "AgentSpec",
    "App",
    "AppLoadError",
    "Backoff",
    "Budget",
    "BusUnavailable",
    "Cancelled",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DelayTooLong",
    "Envelope",
    "OmniDaemonError",
    "OutputStream",
    "PayloadTooLarge",
    "PayloadValidationError",
    "RateLimit",
    "Reject",
    "Result",
    "Retry",
    "RetryPolicy",
    "RunSummary",
    "StreamChunk",
    "Trace",
    "__version__",
]

__version__ = "0.1.0.dev0"
