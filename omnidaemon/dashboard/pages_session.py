"""Signing in and out of the dashboard (`/ui/login`, `/ui/logout`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from omnidaemon.api.auth import Scope
from omnidaemon.dashboard.session import (
    COOKIE,
    SESSION_SECONDS,
    ActionRefused,
    read_form,
    safe_next,
    same_origin,
    signed_in,
)
from omnidaemon.dashboard.templating import page

__all__ = ["router"]

router = APIRouter()


@router.get("/login", response_class=HTMLResponse)
async def login_form(
    request: Request, next: Annotated[str | None, Query(max_length=2000)] = None
) -> Response:
    """The sign-in form (straight to the dashboard when already signed in, or when the
    server runs without authentication)."""
    if signed_in(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return page(request, "login.html", None, next=safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the token a user typed; keep it in the session cookie if it may read."""
    state = request.app.state.omnidaemon
    form = await read_form(request)
    presented = (form.get("token") or [""])[0].strip()
    next_path = safe_next((form.get("next") or [""])[0])
    if not same_origin(request):
        raise ActionRefused("sign in from this dashboard's own page")
    if state.authenticator is None:
        return RedirectResponse(next_path, status_code=303)
    token = state.authenticator.identify(presented) if presented else None
    if token is None or not token.allows(Scope.read):
        error = (
            "That token is not one this server knows."
            if token is None
            else f"Token {token.name!r} lacks the 'read' scope the dashboard needs."
        )
        return page(request, "login.html", None, status=401, next=next_path, error=error)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE,
        presented,
        max_age=SESSION_SECONDS,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """Forget the session cookie (a sign-out needs no CSRF token: the worst another site
    could do is sign the user out)."""
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response
