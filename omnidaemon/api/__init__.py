"""The control-plane HTTP API (`pip install 'omnidaemon[api]'`): the operations of the command
line as JSON over HTTP, with bearer tokens and scopes.

Run it with `omnidaemon api APP`, or build the ASGI application yourself with `create_api` and
serve it with any ASGI server. See docs/http-api.md.
"""

from omnidaemon.api.application import create_api
from omnidaemon.api.auth import ApiToken, Scope, load_tokens, parse_tokens

__all__ = ["ApiToken", "Scope", "create_api", "load_tokens", "parse_tokens"]
