"""Output logs on the in-memory bus (`Broker.append_output` and its readers).

A log is a list of `(sequence, data)` with an expiry time on the bus's clock (so `advance`
moves it on, as it does values). Sequence numbers count up across the whole bus, never per
log: a reader holding an id of a log that was deleted and written again cannot skip the new
log's first entries by mistake, and ids never repeat within a log.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from dataclasses import dataclass, field

__all__ = ["OutputLogs", "parse_memory_id"]


def parse_memory_id(entry_id: str) -> int:
    """The sequence number an id of this bus stands for.

    Raises:
        ValueError: it is no id of this bus (a non-negative decimal number).
    """
    if not entry_id.isascii() or not entry_id.isdigit():
        raise ValueError(f"not an output entry id of the memory bus: {entry_id!r}")
    return int(entry_id)


@dataclass(slots=True)
class _Log:
    seqs: list[int] = field(default_factory=list)
    datas: list[bytes] = field(default_factory=list)
    expires_at: float = 0.0


class OutputLogs:
    """Every output log of one bus. The caller passes the bus's clock reading (`now`)."""

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        self._seq = itertools.count(1)
        self._sweep_at = 1024  # logs held when the expired ones are next dropped

    def append(self, key: str, data: bytes, ttl: float, now: float) -> str:
        """Append one entry; returns its id."""
        if len(self._logs) >= self._sweep_at:  # drop expired logs, amortised O(1) a call
            self._logs = {k: log for k, log in self._logs.items() if log.expires_at > now}
            self._sweep_at = max(1024, 2 * len(self._logs))
        log = self._live(key, now)
        if log is None:
            log = self._logs[key] = _Log()
        seq = next(self._seq)
        log.seqs.append(seq)
        log.datas.append(data)
        log.expires_at = now + ttl
        return str(seq)

    def read(self, key: str, after: int, count: int, now: float) -> list[tuple[str, bytes]]:
        """Up to `count` entries after sequence `after`, oldest first."""
        log = self._live(key, now)
        if log is None:
            return []
        start = bisect_right(log.seqs, after)  # sequences grow: the list is sorted
        end = start + count
        return [(str(s), d) for s, d in zip(log.seqs[start:end], log.datas[start:end], strict=True)]

    def delete(self, key: str) -> None:
        self._logs.pop(key, None)

    def _live(self, key: str, now: float) -> _Log | None:
        log = self._logs.get(key)
        if log is not None and log.expires_at <= now:
            del self._logs[key]
            return None
        return log
