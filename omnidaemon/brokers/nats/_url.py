"""`nats://` and `tls://` URLs: what they name (servers, credentials, TLS), and the same URL with
its secrets masked, for logs and errors."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from omnidaemon.errors import ConfigurationError

__all__ = ["NatsTarget", "parse_nats_url", "redact_nats_url"]

_SECRET_PARAMS = frozenset({"password", "pass", "token", "auth_token", "nkey", "secret"})


def redact_nats_url(url: str) -> str:
    """`url` with its credentials masked: a password (`user:***@`), a token (`***@`), and
    secret query parameters. Safe to log."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, question, query = rest.partition("?")
    userinfo, at, hosts = rest.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    if question:
        fields = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if k.lower() in _SECRET_PARAMS else v}" for k, v in fields)
    return f"{scheme}://{rest}{question}{query}"


@dataclass(frozen=True, slots=True)
class NatsTarget:
    """What a `nats://` URL says: the servers and how to authenticate."""

    servers: tuple[str, ...]
    tls: bool
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None


def parse_nats_url(url: str) -> NatsTarget:
    """Read `nats://[user:password@|token@]host[:port][,host:port...][?creds=F|nkey=F]`
    (`tls://` for TLS; `?tls_ca=F` to trust a CA). Errors never echo the URL.

    Raises:
        ConfigurationError: the URL names no host, a bad port or an unknown option.
    """
    scheme, _, rest = url.partition("://")
    if scheme not in ("nats", "tls"):
        raise ConfigurationError(f"not a NATS URL scheme: {scheme!r}")
    rest, _, query = rest.partition("?")
    userinfo, at, hosts = rest.rpartition("@")
    hosts = hosts.rstrip("/")
    if not hosts:
        raise ConfigurationError(f"broker URL {redact_nats_url(url)} names no host")
    servers = []
    for host in hosts.split(","):
        # Seeds may repeat the scheme (`nats://h1:4222,nats://h2:4222`), as nats tools write.
        host = host.partition("://")[2] if "://" in host else host
        parts = urlsplit(f"//{host}")
        try:
            port = parts.port or 4222
        except ValueError:
            raise ConfigurationError(
                f"broker URL {redact_nats_url(url)} has a bad port in {host!r}"
            ) from None
        if not parts.hostname:
            raise ConfigurationError(f"broker URL {redact_nats_url(url)} names an empty host")
        name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        servers.append(f"{'tls' if scheme == 'tls' else 'nats'}://{name}:{port}")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"creds", "nkey", "tls_ca"}
    if unknown:
        raise ConfigurationError(
            f"broker URL {redact_nats_url(url)}: unknown option(s) {', '.join(sorted(unknown))}"
            " (known: creds, nkey, tls_ca)"
        )
    user = password = token = None
    if at:
        name, colon, secret = userinfo.partition(":")
        if colon:
            user, password = unquote(name), unquote(secret)
        else:
            token = unquote(name)
    return NatsTarget(
        servers=tuple(servers),
        tls=scheme == "tls" or "tls_ca" in options,
        user=user,
        password=password,
        token=token,
        creds=options.get("creds"),
        nkey=options.get("nkey"),
        tls_ca=options.get("tls_ca"),
    )
