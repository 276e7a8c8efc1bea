"""Streamed output: a handler appends chunks with `ctx.emit`, readers follow them with
`App.stream` (or `GET /v1/events/{id}/stream`, as Server-Sent Events) from the start.

Each event has one output log on the bus (`stream:<event_id>`), kept `result_ttl` after its
last entry. Each entry names the agent and attempt that wrote it (`records`); a worker writes
an end marker when an attempt ends (`writer`); readers follow one agent and one attempt at a
time, told when a retry restarts the stream (`follower`, `stream`). See "Streaming output" in
docs/patterns.md for the guarantees.
"""

from omnidaemon.streaming.stream import OutputStream, StreamChunk

__all__ = ["OutputStream", "StreamChunk"]
