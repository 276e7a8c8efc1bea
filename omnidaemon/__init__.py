"""omnidaemon: event-driven AI agents on a real event bus.

```python
from omnidaemon import App, Context

app = App("docs")

@app.agent("document.uploaded", publishes="text.extracted")
async def extract_text(event: Uploaded, ctx: Context) -> Extracted: ...
```
"""

from omnidaemon.agents import AgentSpec
from omnidaemon.app import App
from omnidaemon.context import Context
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import Envelope
from omnidaemon.errors import (
    AgentFailed,
    AppLoadError,
    BusUnavailable,
    ConfigurationError,
    OmniDaemonError,
    PayloadValidationError,
)
from omnidaemon.results import Result
from omnidaemon.retry import Backoff, Reject, Retry, RetryPolicy

__all__ = [
    "AgentFailed",
    "AgentSpec",
    "App",
    "AppLoadError",
    "Backoff",
    "BusUnavailable",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "Envelope",
    "OmniDaemonError",
    "PayloadValidationError",
    "Reject",
    "Result",
    "Retry",
    "RetryPolicy",
    "__version__",
]

__version__ = "0.1.0.dev0"
