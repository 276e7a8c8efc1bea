"""`/asyncapi.json`: the AsyncAPI 3.0 document of the served app, beside FastAPI's
`/openapi.json` (which describes this HTTP API, not the app's events)."""

from typing import Any

from fastapi import APIRouter

from omnidaemon.api.auth import Scope
from omnidaemon.api.dependencies import CurrentApp, require
from omnidaemon.api.errors import documented
from omnidaemon.asyncapi import asyncapi_document

__all__ = ["router"]

router = APIRouter(tags=["fleet"])


@router.get("/asyncapi.json", dependencies=[require(Scope.read)], responses=documented(401, 403))
async def get_asyncapi(app: CurrentApp) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the app: its topics as channels, its agents as `receive`
    operations and what they publish as `send` operations, with the payloads' JSON Schemas
    (`omnidaemon asyncapi APP`). Needs the `read` scope, as `/v1/agents`."""
    return asyncapi_document(app)
