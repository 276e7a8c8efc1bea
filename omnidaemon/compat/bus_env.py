"""Which bus the OmniDaemon SDK runs on, from OmniDaemon's environment variables
(`EVENT_BUS_TYPE`, `REDIS_URL`, `NATS_URL`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from omnidaemon.errors import ConfigurationError

__all__ = ["broker_url_from_env"]

# EVENT_BUS_TYPE -> the variable naming its URL. "nats" (NATS_URL, the NATS tools' variable):
# OmniDaemon announced NATS without naming its variables.
_BUS_URL_VARIABLES = {"redis_stream": "REDIS_URL", "nats": "NATS_URL"}
_NATS_SCHEMES = ("nats", "tls")


def broker_url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The broker URL OmniDaemon's `EVENT_BUS_TYPE` selects, or `None`.

    - `EVENT_BUS_TYPE` unset or `redis_stream`: `REDIS_URL` (Redis Streams); `None` without it.
    - `EVENT_BUS_TYPE=nats`: `NATS_URL` (NATS JetStream), as the NATS tools take it:
      `nats://[user:password@|token@]host:port`, `tls://...`, `host:port` alone, or a
      comma-separated list of servers. Without `NATS_URL`, `OMNIDAEMON_BROKER_URL` must name a
      NATS bus (then `None`).

    `None` leaves the choice to `App` (`OMNIDAEMON_BROKER_URL`, else the embedded bus).

    Raises:
        ConfigurationError: `EVENT_BUS_TYPE` names a bus other than `redis_stream` or `nats`,
            or `nats` without a NATS URL, or `NATS_URL` is not one (errors never echo it).
    """
    env = os.environ if env is None else env
    bus_type = (env.get("EVENT_BUS_TYPE") or "").strip().lower() or "redis_stream"
    if bus_type not in _BUS_URL_VARIABLES:
        raise ConfigurationError(
            f"EVENT_BUS_TYPE={env.get('EVENT_BUS_TYPE', '').strip()!r} is not supported: "
            "omnidaemon runs the OmniDaemon SDK on Redis Streams (EVENT_BUS_TYPE=redis_stream "
            "with REDIS_URL) and NATS JetStream (EVENT_BUS_TYPE=nats with NATS_URL); or unset "
            "it to use OMNIDAEMON_BROKER_URL or the embedded bus"
        )
    url = (env.get(_BUS_URL_VARIABLES[bus_type]) or "").strip()
    if bus_type == "redis_stream":
        return url or None
    if url:
        return _nats_url(url)
    fallback = env.get("OMNIDAEMON_BROKER_URL") or ""
    if fallback.partition("://")[0].lower() in _NATS_SCHEMES:
        return None
    raise ConfigurationError(
        "EVENT_BUS_TYPE=nats needs NATS_URL (nats://host:4222), or OMNIDAEMON_BROKER_URL "
        "naming a nats:// or tls:// bus"
    )


def _nats_url(value: str) -> str:
    """`NATS_URL` as one omnidaemon broker URL: `host:port` gets `nats://`, and a list of
    server URLs (`nats://u:p@a:4222,nats://u:p@b:4222`) becomes one URL listing the hosts
    (`nats://u:p@a:4222,b:4222`). Errors never echo the value: it may hold a password."""
    schemes: set[str] = set()
    credentials: set[str] = set()
    hosts: list[str] = []
    for server in filter(None, (part.strip() for part in value.split(","))):
        scheme, sep, rest = server.partition("://")
        scheme, rest = (scheme.lower(), rest) if sep else ("nats", server)
        if scheme not in _NATS_SCHEMES:
            raise ConfigurationError(
                f"NATS_URL names a {scheme}:// server; EVENT_BUS_TYPE=nats takes nats:// or "
                "tls:// servers (or host:port)"
            )
        userinfo, at, host = rest.rpartition("@")
        if at:
            credentials.add(userinfo)
        schemes.add(scheme)
        hosts.append(host)
    if not hosts:
        raise ConfigurationError("NATS_URL names no server")
    if len(schemes) > 1:
        raise ConfigurationError("NATS_URL mixes nats:// and tls:// servers")
    if len(credentials) > 1:
        raise ConfigurationError("NATS_URL gives its servers different credentials")
    userinfo = f"{credentials.pop()}@" if credentials else ""
    return f"{schemes.pop()}://{userinfo}{','.join(hosts)}"
