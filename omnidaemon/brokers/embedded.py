"""The embedded bus as a broker: the Redis Streams broker on a local Valkey it starts itself.

Used when no broker URL is configured. Connecting starts (or finds) the machine's embedded
server (`embedded_server.ensure_server`) and then speaks to it exactly as to any Redis: same
code path as production, only the connection differs.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from omnidaemon.brokers.embedded_home import find_home
from omnidaemon.brokers.embedded_server import ensure_server, server_status
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.errors import BusUnavailable

__all__ = ["EmbeddedBroker"]


class EmbeddedBroker(RedisBroker):
    """The Redis Streams broker on the embedded Valkey server of `home`.

    Args:
        home: The server's directory (socket, pid file, log, data); default `find_home()`:
            `$OMNIDAEMON_HOME`, else the nearest `.omnidaemon/` in the current folder or a
            parent, else `~/.omnidaemon`.
        maxlen: Entries each topic stream keeps (approximately).
        start_server: Start the server when it does not run. Inspection tools pass `False`:
            looking at the bus should not bring one up, and a bus that is not running is
            worth reporting as such.
    """

    def __init__(
        self, home: Path | None = None, *, maxlen: int = 100_000, start_server: bool = True
    ) -> None:
        # Looked up once, here: a process that changes folder later keeps its bus.
        self.reason: str | None = None  # why this bus: said when starting it makes a new one
        if home is None:
            chosen = find_home()
            home, self.reason = chosen.path, chosen.reason
        self.home = Path(home).resolve()
        self._start_server = start_server
        super().__init__(f"unix://{self.home}/valkey.sock", maxlen=maxlen)
        self._url = f"embedded://{self.home}"

    def clone(self) -> EmbeddedBroker:
        twin = EmbeddedBroker(self.home, maxlen=self._maxlen)
        twin.reason = self.reason
        return twin

    def ensure_server(self) -> str:
        """Start this bus's server unless it runs (blocking); its `unix://` URL."""
        return ensure_server(self.home, reason=self.reason)

    async def connect(self) -> None:
        if self._client is not None:
            return
        if not self._start_server:
            status = await anyio.to_thread.run_sync(server_status, self.home)
            if not status["running"]:
                raise BusUnavailable(
                    f"the embedded bus server is not running in {self.home} "
                    "(a worker or a publisher starts it)"
                )
            self._raw_url = status["url"]
            await super().connect()
            return
        # Starting the server blocks (a fork, a file lock, a wait for PING): keep the loop free.
        self._raw_url = await anyio.to_thread.run_sync(self.ensure_server)
        await super().connect()
