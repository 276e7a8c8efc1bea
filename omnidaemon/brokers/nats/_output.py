"""Output logs on NATS (`Broker.append_output` and its readers): one stream for every log.

Stream `p_out` takes subjects `p.out.<key>` (the key encoded, `_names`): a log is a subject,
its entries the subject's messages, their ids the stream sequences (decimal). One stream for
all logs, not one each: a stream costs the server far more than a subject, and logs are made
by the thousand (one per streamed event).

- An append is a JetStream publish with a per-message TTL (`Nats-TTL`, nats-server >= 2.12,
  whole seconds rounded up): the server drops each entry on time with no process of ours
  left. Not the stream's `max_age`: that is one age for every log, while each append says its
  own. Each entry expires `ttl` after its own append (JetStream cannot extend stored
  messages), so a log loses its oldest entries first; the contract allows that
  (`Broker.append_output`). Retried like a publish while the bus does not answer.
- A read is one batched direct get (`next_by_subj`, from the sequence after `after`): it
  reads the stored messages without a consumer, so readers cost the server nothing between
  reads and never remove anything.
- A read that waits subscribes to the log's subject (a core subscription also sees the
  messages JetStream stores), reads again (an append before the subscription is found by
  that read), then waits for a message on it, reading the stream again when one comes. It
  also reads again after a backoff (`_POLL_FIRST` doubling to `_POLL_MAX`) with no message:
  core messages are not replayed after a reconnect, and on a cluster the replica answering
  a direct get may lag the leader a little.
- Deleting purges the subject.
"""

from __future__ import annotations

import asyncio
import json

import anyio
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError, NoRespondersError

from omnidaemon.brokers.nats._core import REQUEST_TIMEOUT, JetStreamError, msg_seq, unavailable
from omnidaemon.brokers.nats._streams import NatsParts
from omnidaemon.brokers.nats._values import _ttl

__all__ = ["NatsOutput"]

_POLL_FIRST, _POLL_MAX = 0.05, 1.0  # seconds a waiting read goes without looking again
_RETRY_FIRST, _RETRY_MAX = 0.05, 1.0  # seconds between an append's tries


def _parse_id(entry_id: str) -> int:
    if not entry_id.isascii() or not entry_id.isdigit():
        raise ValueError(f"not an output entry id of a NATS bus: {entry_id!r}")
    return int(entry_id)


class NatsOutput(NatsParts):
    """The output-log commands of `NatsBroker`."""

    async def _ensure_output(self) -> str:
        stream = self._names.output_stream
        await self._ensure_stream(
            stream,
            {
                "subjects": [self._names.outputs_all],
                "retention": "limits",
                "discard": "old",
                "allow_msg_ttl": True,
                "duplicate_window": 0,  # appends carry no message ids
            },
        )
        return stream

    async def append_output(self, key: str, data: bytes, *, ttl: float) -> str:
        subject = self._names.output(key)
        deadline = anyio.current_time() + self._publish_timeout
        wait = _RETRY_FIRST
        while True:
            stream = await self._ensure_output()
            try:
                ack = await self._publish(subject, data, _ttl(ttl))
                return str(ack["seq"])
            except NoRespondersError:
                self._streams.discard(stream)  # the bus lost the stream: made again above
                error: BaseException = ConnectionError(f"no stream takes {subject}")
            except MaxPayloadError:
                raise
            except (ConnectionError, TimeoutError, OSError, NatsError) as exc:
                error = exc
            except JetStreamError as exc:
                if exc.code < 500 and exc.err_code not in (10008, 10076):
                    raise  # refused (too large, bad config): trying again cannot help
                error = exc  # no leader yet: a failover in progress
            if anyio.current_time() + wait > deadline:
                raise unavailable(self._url, error)
            await anyio.sleep(wait)
            wait = min(wait * 2, _RETRY_MAX)

    async def read_output(
        self, key: str, *, after: str | None = None, count: int = 100, timeout: float = 0.0
    ) -> list[tuple[str, bytes]]:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        seq = 0 if after is None else _parse_id(after)
        subject = self._names.output(key)
        found = await self._read_page(subject, seq, count)
        if found or timeout <= 0:
            return found
        deadline = anyio.current_time() + timeout
        client = await self._nc()
        appended = asyncio.Event()

        async def on_append(msg: Msg) -> None:
            appended.set()

        sub = await client.subscribe(subject, cb=on_append)
        try:
            poll = _POLL_FIRST
            while True:
                appended.clear()
                found = await self._read_page(subject, seq, count)
                left = deadline - anyio.current_time()
                if found or left <= 0:
                    return found
                with anyio.move_on_after(min(left, poll)):
                    await appended.wait()
                poll = min(poll * 2, _POLL_MAX)
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled read leaves no subscription
                await sub.unsubscribe()

    async def _read_page(self, subject: str, after: int, count: int) -> list[tuple[str, bytes]]:
        """Up to `count` messages of `subject` after sequence `after`: one batched direct get
        (its messages, then one status message: 204 end of batch, 404 nothing, 503 no
        stream; the messages of one connection arrive in order)."""
        client = await self._nc()
        page: list[tuple[str, bytes]] = []
        end: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        async def take(msg: Msg) -> None:
            if (msg.headers or {}).get("Status"):
                if not end.done():
                    end.set_result(msg)
            else:
                page.append((str(msg_seq(msg)), msg.data))

        inbox = client.new_inbox()
        sub = await client.subscribe(inbox, cb=take)
        try:
            request = {"seq": after + 1, "next_by_subj": subject, "batch": count}
            await client.publish(
                f"$JS.API.DIRECT.GET.{self._names.output_stream}",
                json.dumps(request).encode(),
                reply=inbox,
            )
            with anyio.fail_after(REQUEST_TIMEOUT):
                status_msg = await end
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
        headers = status_msg.headers or {}
        status = headers["Status"]
        if status in ("404", "503"):  # nothing after `after`, or no stream yet
            return page
        if status != "204":
            raise JetStreamError(int(status), 0, str(headers.get("Description", "")))
        return page[:count]

    async def delete_output(self, key: str) -> None:
        stream = self._names.output_stream
        try:
            await self._api(f"STREAM.PURGE.{stream}", {"filter": self._names.output(key)})
        except JetStreamError as exc:
            if not exc.not_found:  # no stream: no log
                raise
