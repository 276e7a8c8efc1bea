"""The embedded bus as a broker: the Redis Streams broker on a local Valkey it starts itself.

Used when no broker URL is configured. Connecting starts (or finds) the machine's embedded
server (`embedded_server.ensure_server`) and then speaks to it exactly as to any Redis: same
code path as production, only the connection differs.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from omnidaemon.brokers.embedded_server import default_home, ensure_server
from omnidaemon.brokers.redis import RedisBroker

__all__ = ["EmbeddedBroker"]


class EmbeddedBroker(RedisBroker):
    """The Redis Streams broker on the embedded Valkey server of `home`.

    Args:
        home: The server's directory (socket, pid file, log, data); default
            `$OMNIDAEMON_HOME` or `./.omnidaemon`.
        maxlen: Entries each topic stream keeps (approximately).
    """

    def __init__(self, home: Path | None = None, *, maxlen: int = 100_000) -> None:
        self.home = (home or default_home()).resolve()
        super().__init__(f"unix://{self.home}/valkey.sock", maxlen=maxlen)
        self._url = f"embedded://{self.home}"

    def clone(self) -> EmbeddedBroker:
        return EmbeddedBroker(self.home, maxlen=self._maxlen)

    async def connect(self) -> None:
        if self._client is not None:
            return
        # Starting the server blocks (a fork, a file lock, a wait for PING): keep the loop free.
        self._raw_url = await anyio.to_thread.run_sync(ensure_server, self.home)
        await super().connect()
