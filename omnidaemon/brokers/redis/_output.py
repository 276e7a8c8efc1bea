"""Output logs on Redis (`Broker.append_output` and its readers): a stream per log.

`omni:output:<key>` holds the log's entries, one field `d` each; its ids are the stream's
(`<ms>-<seq>`). One key per log, so on a cluster a log lives in one slot whatever its name.

- An append is one script (`XADD` then `PEXPIRE`, sent with its text): one round trip, and
  the key never outlives its TTL because a connection broke between the two. No `MAXLEN`: the
  writer bounds its log. It waits for `min_replicas` like a publish, and is retried like one
  while the bus does not answer.
- A read is `XREAD` after the given id (`0-0`: from the first); a read that may wait adds
  `BLOCK`, at most `_MAX_BLOCK_MS` at a time (below the sockets' timeout), looping until the
  caller's timeout. It runs on a connection of the broker's own (`_direct`, no owner), held
  only while the command blocks, at most `_MAX_BLOCK_MS`: a waiting reader takes one
  connection from the broker's pool, as a consumer's fetch does, and a cancelled one closes
  it (its reply may still be on the way). `XREAD BLOCK` wakes as soon as an entry is appended,
  which polling would not.
- Deleting is `DEL`; the server drops a log whose TTL ran out by itself.
"""

from __future__ import annotations

import math
import re
from typing import Any

import anyio

from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT
from omnidaemon.brokers.redis._keys import _decode, _field
from omnidaemon.brokers.redis._publishing import RedisPublishing

__all__ = ["RedisOutput"]

_MAX_BLOCK_MS = 5_000  # the longest one XREAD BLOCK waits (the sockets time out at 10 s)
_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 2**64 - 1

# KEYS[1] the log; ARGV[1] the entry, ARGV[2] the TTL in ms. Returns the entry's id.
_APPEND = """
local id = redis.call('XADD', KEYS[1], '*', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return id
"""


def _check_id(entry_id: str) -> str:
    """`entry_id` if it is a stream id (`<ms>-<seq>`, each below 2^64)."""
    match = _ID.fullmatch(entry_id)
    if match is None or int(match[1]) > _U64 or int(match[2]) > _U64:
        raise ValueError(f"not an output entry id of a Redis bus: {entry_id!r}")
    return entry_id


class RedisOutput(RedisPublishing):
    """The output-log commands of `RedisBroker`."""

    async def append_output(self, key: str, data: bytes, *, ttl: float) -> str:
        stream = self.output_key(key)
        ttl_ms = max(1, math.ceil(ttl * 1000))
        command = ("EVAL", _APPEND, 1, stream, data, ttl_ms)
        entry_id = ""

        async def attempt() -> None:
            nonlocal entry_id
            replies = await self._exchange(
                (command,),
                key=stream,
                timeout=_SOCKET_TIMEOUT + self._replica_wait,
                replicate="publish",
            )
            entry_id = _decode(replies[0])

        await self._with_publish_deadline(attempt)
        return entry_id

    async def read_output(
        self, key: str, *, after: str | None = None, count: int = 100, timeout: float = 0.0
    ) -> list[tuple[str, bytes]]:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        start = "0-0" if after is None else _check_id(after)
        stream = self.output_key(key)
        deadline = anyio.current_time() + timeout
        while True:
            left = deadline - anyio.current_time()
            args: list[Any] = ["XREAD", "COUNT", count]
            block_ms = min(_MAX_BLOCK_MS, math.ceil(left * 1000)) if left > 0 else 0
            if block_ms > 0:  # never BLOCK 0: that would wait forever
                args += ("BLOCK", block_ms)
            args += ("STREAMS", stream, start)
            reply = await self._direct(args, key=stream, timeout=block_ms / 1000 + _SOCKET_TIMEOUT)
            found = _entries(reply)
            if found or anyio.current_time() >= deadline:
                return found

    async def delete_output(self, key: str) -> None:
        stream = self.output_key(key)
        await self._direct(("DEL", stream), key=stream, timeout=_SOCKET_TIMEOUT)


def _entries(reply: Any) -> list[tuple[str, bytes]]:
    """`(id, data)` of an XREAD reply of one stream: `[[key, [[id, [field, value, ...]],
    ...]]]` with RESP2, `{key: [...]}` with RESP3, nil for nothing."""
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(_decode(entry_id), _field(flat, b"d")) for entry_id, flat in entries]
