"""The dead-letter pages: the topics holding dead letters (`/ui/dead-letters`), one topic's
dead letters with replay (one, the selected, all), edit-and-replay of one, and purge behind a
typed confirmation. The work is `omnidaemon.admin`'s, as for the JSON API's `/v1/dlq` routes;
`dead_letters_view` shapes it for the pages."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from omnidaemon import admin
from omnidaemon.dashboard import dead_letters_view as view
from omnidaemon.dashboard.formatting import pretty_json
from omnidaemon.dashboard.session import ActionRefused, Admin, UiUser, Viewer, read_form
from omnidaemon.dashboard.templating import not_found, page, served_app
from omnidaemon.debounce import is_internal_topic
from omnidaemon.envelope import validate_topic
from omnidaemon.errors import NotFound, PayloadValidationError
from omnidaemon.observability.logging import get_logger
from omnidaemon.topology import type_name

__all__ = ["router"]

router = APIRouter()

_log = get_logger("omnidaemon.dashboard")

Flash = Annotated[str | None, Query(max_length=500)]
AgentFilter = Annotated[str | None, Query(max_length=200)]
Limit = Annotated[int, Query(ge=1, le=1000)]


def _topic_url(topic: str) -> str:
    return f"/ui/dead-letters/{quote(topic, safe='')}"


def _back(topic: str, *, done: str | None = None, problem: str | None = None) -> Response:
    """303 to the topic's dead letters, with a flash message (shown escaped)."""
    flash = {k: v for k, v in (("done", done), ("problem", problem)) if v}
    query = f"?{urlencode(flash)}" if flash else ""
    return RedirectResponse(_topic_url(topic) + query, status_code=303)


def _valid(topic: str) -> bool:
    try:
        # A debounced agent's batches and checks (`T#debounce.A`) are topics with dead
        # letters too (as `omnidaemon bus dlq` takes them).
        validate_topic(topic.partition("#")[0] if is_internal_topic(topic) else topic)
    except ValueError:
        return False
    return True


def _first(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _must_act(user: UiUser) -> None:
    """Pages that exist only to act (edit, purge) are for `admin` tokens."""
    if not user.can_act:
        raise ActionRefused(
            f"token {user.token.name!r} may look but not act: replay and purge need 'admin'"
        )


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letter_topics(request: Request, user: Viewer) -> Response:
    """Every topic holding dead letters, with how many each agent's queue holds."""
    app = served_app(request)
    topics = await view.dead_letter_topics(app.broker)
    return page(request, "dead_letters.html", user, title="Dead letters", topics=topics)


@router.get("/dead-letters/{topic}", response_class=HTMLResponse)
async def topic_dead_letters(
    request: Request,
    topic: str,
    user: Viewer,
    agent: AgentFilter = None,
    limit: Limit = view.DEFAULT_LIMIT,
    done: Flash = None,
    problem: Flash = None,
) -> Response:
    """A topic's most recent dead letters, newest first, with the actions an admin may take."""
    if not _valid(topic):
        return not_found(request, user, f"no topic {topic!r} on the bus")
    app = served_app(request)
    try:
        data = await view.read_topic(app, topic, agent=agent, limit=limit)
    except NotFound as exc:
        return not_found(request, user, str(exc))
    return page(
        request,
        "dead_letter_topic.html",
        user,
        title=f"Dead letters of {topic}",
        view=data,
        base=_topic_url(topic),
        agent=agent,
        limit=limit,
        done=done,
        problem=problem,
    )


def _said(done: view.ReplayDone) -> tuple[str | None, str | None]:
    """The flash messages of a replay: what was done, and what was not."""
    problems = []
    if done.missing:
        problems.append(f"{done.missing} no longer in the dead letters")
    if done.undecodable:
        problems.append(f"{done.undecodable} unreadable records left in the queue")
    return f"replayed {done.replayed}", "; ".join(problems) or None


@router.post("/dead-letters/{topic}/replay", response_class=HTMLResponse)
async def replay(request: Request, topic: str, user: Admin) -> Response:
    """Replay one dead letter, the selected ones (`id`: `agent/event_id`, repeated), or all
    of them (`all`, only `agent`'s when given); back to the list with what was done."""
    if not _valid(topic):
        return not_found(request, user, f"no topic {topic!r} on the bus")
    form = await read_form(request)
    broker = served_app(request).broker
    chosen = [value for value in form.get("id", []) if value]
    everything = bool(_first(form, "all"))
    if not everything and not chosen:
        return _back(topic, problem="nothing selected: tick the dead letters to replay")
    try:
        if everything:
            agent = _first(form, "agent") or None
            done = await view.replay_all(broker, topic, agent=agent)
        else:
            done = await view.replay_chosen(broker, topic, chosen)
    except NotFound as exc:
        return not_found(request, user, str(exc))
    _log.warning(
        "dead letters replayed",
        topic=topic,
        replayed=done.replayed,
        undecodable=done.undecodable,
        token=user.token.name,
        via="dashboard",
    )
    said, problem = _said(done)
    return _back(topic, done=said, problem=problem)


async def _queued(request: Request, topic: str) -> list[tuple[str, int]]:
    """Each agent of `topic` holding dead letters, with how many."""
    info = await admin.require_topic(served_app(request).broker, topic)
    return [(g.group, g.dead_letters) for g in info.groups if g.dead_letters]


def _purge_form(
    request: Request,
    topic: str,
    user: UiUser,
    agents: list[tuple[str, int]],
    *,
    error: str | None = None,
) -> Response:
    return page(
        request,
        "purge_confirm.html",
        user,
        status=400 if error else 200,
        title=f"Purge the dead letters of {topic}",
        topic=topic,
        base=_topic_url(topic),
        count=sum(n for _, n in agents),
        agents=agents,
        error=error,
    )


@router.get("/dead-letters/{topic}/purge", response_class=HTMLResponse)
async def purge_confirm(request: Request, topic: str, user: Viewer) -> Response:
    """Ask before purging: how many dead letters would go, and the topic's name to type."""
    _must_act(user)
    if not _valid(topic):
        return not_found(request, user, f"no topic {topic!r} on the bus")
    try:
        return _purge_form(request, topic, user, await _queued(request, topic))
    except NotFound as exc:
        return not_found(request, user, str(exc))


@router.post("/dead-letters/{topic}/purge", response_class=HTMLResponse)
async def purge(request: Request, topic: str, user: Admin) -> Response:
    """Empty the topic's dead-letter queues, once the user typed the topic's name, if they
    still hold as many dead letters as the confirmation showed (else it asks again: those
    that arrived since were not seen, and are not purged unseen)."""
    if not _valid(topic):
        return not_found(request, user, f"no topic {topic!r} on the bus")
    form = await read_form(request)
    broker = served_app(request).broker
    try:
        agents = await _queued(request, topic)
        shown = _first(form, "count") or ""
        if (_first(form, "confirm") or "").strip() != topic:
            error = f"type the topic's name, {topic}, to confirm: nothing was purged"
            return _purge_form(request, topic, user, agents, error=error)
        if shown != str(sum(n for _, n in agents)):
            error = (
                f"the dead letters changed since the confirmation counted {shown or 'them'}: "
                "nothing was purged; check the count and confirm again"
            )
            return _purge_form(request, topic, user, agents, error=error)
        removed = await admin.purge_dead_letters(broker, topic)
    except NotFound as exc:
        return not_found(request, user, str(exc))
    _log.warning(
        "dead letters purged", topic=topic, removed=removed, token=user.token.name, via="dashboard"
    )
    return _back(topic, done=f"purged {removed}")


def _edit_form(
    request: Request,
    user: UiUser,
    letter: Any,
    payload_type: Any,
    text: str,
    *,
    error: str | None = None,
) -> Response:
    return page(
        request,
        "dead_letter_edit.html",
        user,
        status=400 if error else 200,
        title=f"Edit and replay {letter.event_id}",
        letter=letter,
        base=_topic_url(letter.topic),
        # Not the request's path: it comes decoded, and an id holding `%` would then name
        # another event when posted.
        action=f"{_topic_url(letter.topic)}/{quote(letter.event_id, safe='')}/edit",
        type_name=type_name(payload_type),
        text=text,
        error=error,
    )


def _undeclared(request: Request, user: UiUser, topic: str, agent: str) -> Response:
    app = served_app(request)
    return not_found(
        request,
        user,
        f"app {app.name!r} does not declare agent {agent!r} on {topic!r}, so a corrected "
        "payload cannot be checked against its type: replay the event as it is, or use "
        "`omnidaemon bus replay --edit --app APP` with the agent's app",
    )


@router.get("/dead-letters/{topic}/{event_id:path}/edit", response_class=HTMLResponse)
async def edit_form(
    request: Request, topic: str, event_id: str, user: Viewer, agent: AgentFilter = None
) -> Response:
    """A dead letter's payload in a text area, to correct and replay."""
    _must_act(user)
    if not _valid(topic):
        return not_found(request, user, f"no topic {topic!r} on the bus")
    app = served_app(request)
    try:
        letter = await view.find_letter(app.broker, topic, event_id, agent)
    except NotFound as exc:
        return not_found(request, user, str(exc))
    payload_type = view.payload_type_of(app, topic, letter.agent)
    if payload_type is None:
        return _undeclared(request, user, topic, letter.agent)
    return _edit_form(request, user, letter, payload_type, pretty_json(letter.payload))


@router.post("/dead-letters/{topic}/{event_id:path}/edit", response_class=HTMLResponse)
async def edit_and_replay(request: Request, topic: str, event_id: str, user: Admin) -> Response:
    """Replay one dead letter with the payload typed in its form, checked against the
    agent's declared type: an invalid one re-renders the form with the error and the text
    as typed; nothing changes on the bus."""
    if not _valid(topic):
        return not_found(request, user, f"no topic {topic!r} on the bus")
    form = await read_form(request)
    app = served_app(request)
    text = _first(form, "payload") or ""
    try:
        agent = _first(form, "agent") or None
        letter = await view.find_letter(app.broker, topic, event_id, agent)
        payload_type = view.payload_type_of(app, topic, letter.agent)
        if payload_type is None:
            return _undeclared(request, user, topic, letter.agent)
        try:
            payload = view.parse_payload(text)
            corrected = await admin.replay_corrected(
                app.broker, topic, letter.agent, event_id, payload, payload_type=payload_type
            )
        except (ValueError, PayloadValidationError) as exc:
            return _edit_form(request, user, letter, payload_type, text, error=str(exc))
    except NotFound as exc:
        return not_found(request, user, str(exc))
    _log.warning(
        "dead letter replayed with a corrected payload",
        topic=topic,
        agent=letter.agent,
        event_id=event_id,
        new_event_id=corrected.id,
        token=user.token.name,
        via="dashboard",
    )
    return _back(topic, done=f"replayed 1 with a corrected payload, as event {corrected.id}")
