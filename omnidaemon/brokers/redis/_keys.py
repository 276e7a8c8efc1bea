"""The Redis broker's key layout (see the package docs) and the reply helpers its parts share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from omnidaemon.brokers.base import Subscription

__all__ = ["RedisKeys"]

# A delivery's origin: the topic stream, or the group's retry stream.
_STREAM = "s"
_RETRY = "r"


class RedisKeys:
    """The names of the keys a broker with prefix `_prefix` uses."""

    _prefix: str

    def stream_key(self, topic: str) -> str:
        """The key of a topic's stream."""
        return f"{self._prefix}:{{{topic}}}:stream"

    def retry_key(self, sub: Subscription) -> str:
        """The key of a group's retry stream."""
        return f"{self._prefix}:{{{sub.topic}}}:retry:{sub.group}"

    def due_key(self, sub: Subscription) -> str:
        """The key of a group's sorted set of scheduled retries."""
        return f"{self._prefix}:{{{sub.topic}}}:due:{sub.group}"

    def delayed_key(self, topic: str) -> str:
        """The key of a topic's sorted set of delayed events."""
        return f"{self._prefix}:{{{topic}}}:delayed"

    def dlq_key(self, sub: Subscription) -> str:
        """The key of a group's dead-letter stream."""
        return f"{self._prefix}:{{{sub.topic}}}:dlq:{sub.group}"

    def metrics_key(self, sub: Subscription) -> str:
        """The key of a group's metrics hash."""
        return f"{self._prefix}:{{{sub.topic}}}:metrics:{sub.group}"

    def once_key(self, topic: str, key: str) -> str:
        """The key of `publish_once`'s mark for `key` on a topic (`}` and `%` escaped, so
        that no mark looks like another kind of key to the scans by pattern)."""
        safe = key.replace("%", "%25").replace("}", "%7D")
        return f"{self._prefix}:{{{topic}}}:once:{safe}"

    def _origin_key(self, sub: Subscription, origin: str) -> str:
        return self.retry_key(sub) if origin == _RETRY else self.stream_key(sub.topic)

    def result_key(self, event_id: str) -> str:
        """The key of an event's stored results (a hash: agent -> record)."""
        return f"{self._prefix}:result:{event_id}"

    def value_key(self, key: str) -> str:
        """The Redis key of a stored value."""
        return f"{self._prefix}:value:{key}"

    def output_key(self, key: str) -> str:
        """The key of an output log (a stream, one field `d` per entry)."""
        return f"{self._prefix}:output:{key}"

    def trace_dir_key(self, shard: int, span_ms: int, bucket: int) -> str:
        """The key of a trace directory: a sorted set (all scores 0, read by lexical range) of
        the runs (and pointers) written in one span of time, each naming its batch."""
        return f"{self._prefix}:{{trace-{shard}}}:dir:{span_ms}:{bucket}"

    def trace_dirs_key(self, shard: int) -> str:
        """The key of a shard's live directories (a sorted set: key -> when it expires, ms)."""
        return f"{self._prefix}:{{trace-{shard}}}:dirs"

    def trace_batch_key(self, shard: int, ref: str) -> str:
        """The key of one written batch of trace records (one JSON document)."""
        return f"{self._prefix}:{{trace-{shard}}}:batch:{ref}"

    def trace_count_key(self, shard: int, run_id: str) -> str:
        """The key of a large run's counts (a hash: `n` records kept, `dropped`)."""
        return f"{self._prefix}:{{trace-{shard}}}:n:{run_id}"

    def runs_key(self) -> str:
        """The key of the index of runs (a stream: one entry per written batch, its runs)."""
        return f"{self._prefix}:runs"


def _is_nogroup(exc: ResponseError) -> bool:
    return "NOGROUP" in str(exc)


def _escape_glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _field(flat: Sequence[bytes] | None, name: bytes) -> bytes:
    """The value of field `name` in a flat `[field, value, ...]` list; `b""` if absent."""
    if flat:
        for i in range(0, len(flat) - 1, 2):
            if flat[i] == name:
                return flat[i + 1]
    return b""


def _xadd_args(key: str, maxlen: int, data: bytes) -> tuple[Any, ...]:
    # What `client.xadd(key, {"e": data}, maxlen=maxlen, approximate=True)` sends, built
    # directly: its argument handling costs more per event than packing the command.
    return ("XADD", key, "MAXLEN", "~", maxlen, "*", "e", data)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
