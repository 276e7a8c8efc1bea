"""Reading JetStream for the NATS broker's inspection: stream info with per-subject counts,
paginated listings, and messages by batched direct gets (`$JS.API.DIRECT.GET.<stream>` with
`next_by_subj` and `batch`, page by page), which any replica answers and which cost the stream
no consumer.
"""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
from nats.aio.msg import Msg

from omnidaemon.brokers.nats._core import JetStreamError, msg_seq
from omnidaemon.brokers.nats._streams import NatsParts

__all__ = ["NatsListing"]

_TIMEOUT = 5.0  # one page of a direct get
_PAGE = 256  # messages per direct-get page


class NatsListing(NatsParts):
    """JetStream reads the inspection parts share."""

    async def _purge(self, stream: str, subject: str) -> int:
        """Remove the stream's messages on `subject` (a filter); how many (0: no stream)."""
        try:
            reply = await self._api(f"STREAM.PURGE.{stream}", {"filter": subject})
        except JetStreamError as exc:
            if exc.not_found:
                return 0
            raise
        return int(reply.get("purged", 0))

    async def _stream_info(
        self, stream: str, subjects: str | None
    ) -> tuple[dict[str, Any], dict[str, int]] | None:
        """A stream's info and its message count per subject matching `subjects`, every page
        of them; `None` if there is no such stream."""
        counts: dict[str, int] = {}
        while True:
            body = {"subjects_filter": subjects, "offset": len(counts)} if subjects else None
            try:
                info = await self._api(f"STREAM.INFO.{stream}", body)
            except JetStreamError as exc:
                if exc.not_found:
                    return None
                raise
            page = info["state"].get("subjects") or {}
            counts.update(page)
            if not page or len(counts) >= int(info.get("total", 0)):
                return info, counts

    async def _listing(self, api: str, key: str, **body: str) -> list[dict[str, Any]]:
        """Every item of a paged JetStream listing (`STREAM.LIST`, `CONSUMER.LIST.<stream>`),
        page after page; none when its stream does not exist."""
        found: list[dict[str, Any]] = []
        while True:
            try:
                page = await self._api(api, {**body, "offset": len(found)})
            except JetStreamError as exc:
                if exc.not_found:
                    return found
                raise
            items = page.get(key) or []
            found += items
            if not items or len(found) >= int(page.get("total", 0)):
                return found

    async def _page(
        self, stream: str, subject: str, start: int, batch: int
    ) -> tuple[list[Msg], int]:
        """Up to `batch` messages on `subject` from sequence `start` on, oldest first, and how
        many more match after them (none: no such stream, or nothing from `start` on)."""
        client = await self._nc()
        inbox = client.new_inbox()
        sub = await client.subscribe(inbox)
        body = {"seq": max(start, 1), "next_by_subj": subject, "batch": batch}
        found: list[Msg] = []
        try:
            await client.publish(
                f"$JS.API.DIRECT.GET.{stream}", json.dumps(body).encode(), reply=inbox
            )
            with anyio.fail_after(_TIMEOUT):
                async for msg in sub.messages:
                    status = (msg.headers or {}).get("Status")
                    if not status:
                        found.append(msg)
                        continue
                    if status == "204":  # end of the batch: how many more match
                        return found, int((msg.headers or {}).get("Nats-Num-Pending", 0))
                    if status in ("404", "503"):  # nothing from `start` on; no stream
                        return found, 0
                    raise JetStreamError(int(status), 0, "direct get failed")
        except TimeoutError:
            raise TimeoutError(f"JetStream at {self._url} did not answer in time") from None
        finally:
            await sub.unsubscribe()
        return found, 0  # the subscription ended (the connection closed)

    async def _recent(self, stream: str, subject: str, limit: int) -> list[Msg]:
        """The `limit` most recent messages on `subject`, oldest first.

        JetStream reads forwards only: windows of sequences are read from the end backwards,
        each sized to hold what is still missing at the subject's average density, and
        doubled while they come back short.
        """
        found = await self._stream_info(stream, subject) if limit > 0 else None
        count = found[1].get(subject, 0) if found else 0
        if found is None or not count:
            return []
        state = found[0]["state"]
        first, hi = int(state["first_seq"]), int(state["last_seq"])
        span = math.ceil(limit * (hi - first + 1) / count)
        msgs: list[Msg] = []
        while hi >= first and len(msgs) < limit:
            lo = max(first, hi - span + 1)
            window: list[Msg] = []
            start = lo
            while start <= hi:
                page, more = await self._page(stream, subject, start, min(_PAGE, hi - start + 1))
                window += [m for m in page if msg_seq(m) <= hi]
                if not page or not more or msg_seq(page[-1]) >= hi:
                    break
                start = msg_seq(page[-1]) + 1
            msgs = window + msgs
            hi, span = lo - 1, span * 2
        return msgs[-limit:]
