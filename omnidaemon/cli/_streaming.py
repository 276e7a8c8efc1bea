"""`omnidaemon publish --wait --stream`: print an event's streamed output as it comes."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from omnidaemon.cli._output import json_text

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.lanes import Priority

__all__ = ["print_stream"]


def _line(data: Any) -> str:
    return json_text(data, indent=False)


async def print_stream(
    app: App,
    topic: str,
    payload: Any,
    *,
    timeout: float,
    json: bool,
    correlation_id: str | None,
    tenant_id: str | None,
    priority: Priority | None,
) -> None:
    """Publish the event and print its stream: text chunks as they come (other chunks one
    JSON line each), a notice on standard error when a retry restarts it; with `json`, one
    JSON line per chunk and one for the end (with the result).

    Raises:
        AgentFailed: the agent gave up on the event (dead-lettered).
        Cancelled: the event was cancelled.
        TimeoutError: nothing was streamed for `timeout` seconds.
    """
    out = sys.stdout
    stream = await app.request_stream(
        topic,
        payload,
        timeout=timeout,
        correlation_id=correlation_id,
        tenant_id=tenant_id,
        priority=priority,
    )
    open_line = False  # text printed without its line's end
    announced = 0  # restarts told so far
    async for chunk in stream:
        if chunk.restarted:
            announced = stream.restarts
        if json:
            if chunk.restarted:
                out.write(_line({"event": "restart", "attempt": chunk.attempt}) + "\n")
            fields = {"attempt": chunk.attempt, "index": chunk.index, "data": chunk.data}
            out.write(_line({"event": "chunk", **fields}) + "\n")
        else:
            if chunk.restarted:
                if open_line:
                    out.write("\n")
                    open_line = False
                out.flush()
                print(
                    f"omnidaemon publish: the attempt before failed; attempt {chunk.attempt} "
                    "streams from its start",
                    file=sys.stderr,
                )
            text = chunk.data if isinstance(chunk.data, str) else _line(chunk.data) + "\n"
            out.write(text)
            open_line = bool(text) and not text.endswith("\n")
        out.flush()
    if stream.restarts > announced:
        # A retry that streamed nothing before it ended: what was printed is the failed one's.
        if json:
            out.write(_line({"event": "restart", "attempt": stream.attempt}) + "\n")
        else:
            if open_line:
                out.write("\n")
                open_line = False
            out.flush()
            print(
                f"omnidaemon publish: the attempt before failed; attempt {stream.attempt} "
                "ended without streaming: the output above is the failed attempt's",
                file=sys.stderr,
            )
    if json:
        end = {"event": "end", "status": stream.status, "result": stream.result}
        out.write(_line(end) + "\n")
    elif open_line:
        out.write("\n")
    if stream.truncated:
        print("omnidaemon publish: the output was truncated (past its bound)", file=sys.stderr)
    out.flush()
