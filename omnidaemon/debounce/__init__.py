"""Debounce: run a handler once per burst of messages, with the whole burst.

```python
@app.agent(
    "chat.message",
    debounce=timedelta(seconds=5),
    debounce_key=lambda m: m.conversation_id,
    debounce_max_wait=timedelta(seconds=30),
)
async def answer(messages: list[Message], ctx: Context) -> None: ...
```

Each message of the topic is collected into its key's *window*, a value on the bus; a window
is flushed once no message came for `debounce`, or `debounce_max_wait` after its first
message, whichever is sooner: its messages, in publish order, become one *batch* event, and
the handler runs with the batch like with any event (retries, dead letters, replay). Windows
and their timers live on the bus, so they survive worker crashes and are shared by every
worker of the agent. See docs/debounce.md for the guarantee and the bounds;
`omnidaemon.debounce.spec` for how a debounced agent runs, `omnidaemon.debounce.window` and
`omnidaemon.debounce.handlers` for the protocol.
"""

from omnidaemon.debounce.spec import (
    BATCH_IDS_HEADER,
    BATCH_KEY_HEADER,
    DebounceSpec,
    consumer_specs,
    debounced_spec,
    is_internal_topic,
)

__all__ = [
    "BATCH_IDS_HEADER",
    "BATCH_KEY_HEADER",
    "DebounceSpec",
    "consumer_specs",
    "debounced_spec",
    "is_internal_topic",
]
