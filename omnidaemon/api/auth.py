"""Bearer tokens and their scopes: reading them, and recognising the one a request presents.

Tokens come from the environment (`OMNIDAEMON_API_TOKENS`) or a file (`--tokens-file`), never
from the command line, where `ps` would show them. Both hold entries `NAME:SCOPES:TOKEN`
separated by whitespace (one per line in a file; lines starting with `#` are comments):

    # name    scopes         token
    ops:admin:9b1c...
    ci:read,publish:Yf3q...
    grafana:read:2kLm...

`NAME` identifies the token in logs (the token itself is never logged); `SCOPES` is a
comma-separated list of `read` (every GET), `publish` (publish events, request-reply) and
`admin` (replay and purge; implies `read` and `publish`); `TOKEN` is at least 16 characters
of RFC 6750's token syntax (letters, digits, `-._~+/`, then `=`). Only a SHA-256 digest of
each token is kept in memory, and a presented token is compared with every known one in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from omnidaemon.errors import ConfigurationError

__all__ = [
    "MIN_TOKEN_LENGTH",
    "TOKENS_ENV",
    "ApiToken",
    "Authenticator",
    "Scope",
    "is_loopback",
    "load_tokens",
    "parse_tokens",
]

TOKENS_ENV = "OMNIDAEMON_API_TOKENS"
"""The environment variable holding API tokens."""

MIN_TOKEN_LENGTH = 16
"""The shortest token accepted: a short token can be guessed."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# RFC 6750's b64token: what an `Authorization: Bearer` header can carry.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")


class Scope(StrEnum):
    """What a token may do."""

    read = "read"
    """Every GET: agents, results, topics, dead letters, metrics, health, stats."""
    publish = "publish"
    """Publish events and make requests (`POST /v1/events`, `POST /v1/requests`)."""
    admin = "admin"
    """Replay and purge, which move or delete events; implies `read` and `publish`."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A known token: its name, its scopes and a digest of its secret (never the secret).

    Attributes:
        name: Names the token in logs and errors.
        scopes: What it may do.
        digest: SHA-256 of the token.
    """

    name: str
    scopes: frozenset[Scope]
    digest: bytes = field(repr=False)

    def allows(self, scope: Scope) -> bool:
        """Whether the token may do what `scope` covers (`admin` covers everything)."""
        return scope in self.scopes or Scope.admin in self.scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_tokens(text: str, *, source: str) -> list[ApiToken]:
    """Read `NAME:SCOPES:TOKEN` entries from `text` (whitespace-separated; lines starting
    with `#` are comments). `source` names where the text came from, in error messages.

    Raises:
        ConfigurationError: an entry is malformed, names an unknown scope, or its token is
            shorter than `MIN_TOKEN_LENGTH`; the message names the line and the entry, never a
            field of it (any of them may be the secret when the fields are out of order).
    """
    tokens = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        for entry_number, entry in enumerate(line.split(), start=1):
            # Errors name the line and the entry, never a field of it: an entry that does not
            # parse may have its fields in the wrong order, so any of them may be the secret.
            where = f"{source} line {line_number}, entry {entry_number}"
            name, sep, rest = entry.partition(":")
            scope_text, sep2, secret = rest.partition(":")
            if not (sep and sep2 and name and scope_text and secret):
                raise ConfigurationError(
                    f"{where}: expected NAME:SCOPES:TOKEN, e.g. ci:read,publish:<token> "
                    "(scopes: read, publish, admin)"
                )
            if not _NAME_RE.fullmatch(name):
                raise ConfigurationError(
                    f"{where}: a token's name is 1 to 64 letters, digits, '_', '.' or '-'"
                )
            scopes = set()
            for word in scope_text.split(","):
                try:
                    scopes.add(Scope(word))
                except ValueError:
                    raise ConfigurationError(
                        f"{where}: an unknown scope (scopes: read, publish, admin; "
                        "the entry is NAME:SCOPES:TOKEN)"
                    ) from None
            if not _TOKEN_RE.fullmatch(secret):
                raise ConfigurationError(
                    f"{where}: the token has characters a bearer token cannot have "
                    "(letters, digits and -._~+/ then =; entries are separated by spaces)"
                )
            if len(secret) < MIN_TOKEN_LENGTH:
                raise ConfigurationError(
                    f"{where}: the token is shorter than {MIN_TOKEN_LENGTH} characters; "
                    "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            tokens.append(ApiToken(name, frozenset(scopes), _digest(secret)))
    return tokens


def load_tokens(env: Mapping[str, str], tokens_file: Path | None = None) -> list[ApiToken]:
    """The tokens of `OMNIDAEMON_API_TOKENS` in `env` and of `tokens_file`, together.

    Raises:
        ConfigurationError: the file cannot be read, an entry is malformed (see
            `parse_tokens`), or two tokens share a name or a secret.
    """
    tokens = parse_tokens(env.get(TOKENS_ENV, ""), source=TOKENS_ENV)
    if tokens_file is not None:
        try:
            text = tokens_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigurationError(f"cannot read tokens file {tokens_file}: {reason}") from None
        tokens += parse_tokens(text, source=str(tokens_file))
    names: set[str] = set()
    digests: set[bytes] = set()
    for token in tokens:
        if token.name in names:
            raise ConfigurationError(f"two API tokens are named {token.name!r}")
        if token.digest in digests:
            raise ConfigurationError(f"API token {token.name!r} repeats another token's secret")
        names.add(token.name)
        digests.add(token.digest)
    return tokens


class Authenticator:
    """Finds the known token a request presents.

    Args:
        tokens: The known tokens; none at all means every request is refused.
    """

    def __init__(self, tokens: Iterable[ApiToken]) -> None:
        self._tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def identify(self, presented: str) -> ApiToken | None:
        """The known token `presented` is, or `None`.

        Every known token is compared, each in constant time over digests of equal length, so
        the time taken says nothing of how close a guess came or which token matched.
        """
        digest = _digest(presented)
        found = None
        for token in self._tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
