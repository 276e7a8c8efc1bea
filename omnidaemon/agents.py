"""AgentSpec: what `@app.agent(...)` learns about a handler, checked once at decoration time."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from pydantic import TypeAdapter
from pydantic.errors import PydanticSchemaGenerationError, PydanticUserError

from omnidaemon.context import Context
from omnidaemon.envelope import Envelope, validate_topic
from omnidaemon.flow.limits import Budget, FlowSpec, RateLimit, build_flow_spec
from omnidaemon.retry import Backoff, RetryPolicy

if typing.TYPE_CHECKING:
    from omnidaemon.debounce.spec import DebounceSpec

__all__ = ["AgentSpec", "Handler", "build_agent_spec", "validate_agent_name"]

Handler = Callable[..., Any] | Callable[..., Awaitable[Any]]
"""A handler: `async def` or plain `def`, taking the payload and optionally a `Context`."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$")
_MAX_NAME_LENGTH = 200


def validate_agent_name(name: str) -> str:
    """Return `name` if it can name an agent (and so a consumer group), else raise `ValueError`."""
    if not isinstance(name, str) or len(name) > _MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid agent name {name!r}: use letters, digits and '_', '.', ':', '-'")
    return name


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


@dataclass(frozen=True, slots=True, eq=False)
class AgentSpec:
    """One agent: a handler subscribed to a topic, with its types and policies.

    Made by `App.agent`; the worker runs it. Read-only once made.

    Attributes:
        name: The agent's name, which is also its consumer group.
        topic: The topic it consumes.
        handler: The decorated function.
        payload_type: The type the payload is validated into.
        return_type: The declared return type, or `Any` when not annotated.
        publishes: The topic the return value is published to, if any.
        policy: Retry policy (attempts and backoff).
        concurrency: Most handlers of this agent running at once in one worker.
        timeout: Seconds one attempt may take before it fails, or `None`.
        reclaim_idle: Seconds after which a delivery whose worker stopped renewing its lease is
            taken over by another worker.
        start: Where a new consumer group starts: `"earliest"` or `"latest"`.
        description: Free text for `omnidaemon agents` and the docs.
        store_results: Keep each event's status and result (`App.result`).
        result_ttl: Seconds a stored result is kept.
        idempotency_key: Maps a payload to its key; the handler runs at most once per key
            among successful runs (see `omnidaemon.idempotency`).
        idempotency_ttl: Seconds a key's successful result is remembered.
        flow: Rate limit, budgets and per-key concurrency (see `omnidaemon.flow`), or `None`.
        debounce: The debounce options and the agents a debounced agent runs as (see
            `omnidaemon.debounce`), or `None`. A debounced agent's `payload_type` is the type
            of one message of its topic (`X` of the handler's `list[X]`).
        is_async: Whether the handler is a coroutine function (else it runs in a thread).
        envelope_adapter: Validates an envelope with this agent's payload type from JSON bytes.
        return_adapter: Validates the return value, or `None` when it is not checked.
        stream_type: The type of the chunks the handler streams with `ctx.emit` (`stream=`),
            or `None` when it declared none (any JSON value may then be emitted).
        stream_adapter: Validates an emitted chunk against `stream_type`, or `None`.
    """

    name: str
    topic: str
    handler: Handler
    payload_type: Any
    return_type: Any
    publishes: str | None
    policy: RetryPolicy
    concurrency: int
    timeout: float | None
    reclaim_idle: float
    start: Literal["earliest", "latest"]
    description: str | None
    is_async: bool
    envelope_adapter: TypeAdapter[Envelope[Any]]
    return_adapter: TypeAdapter[Any] | None
    invoke: Callable[[Any, Context], Any]
    store_results: bool = False
    result_ttl: float = 86_400.0
    idempotency_key: Callable[[Any], Any] | None = None
    idempotency_ttl: float = 86_400.0
    flow: FlowSpec | None = None
    debounce: DebounceSpec | None = None
    stream_type: Any = None
    stream_adapter: TypeAdapter[Any] | None = None


def _qualname(handler: Handler) -> str:
    name = getattr(handler, "__qualname__", None)
    return name if isinstance(name, str) else type(handler).__qualname__


def _is_coroutine_function(handler: Handler) -> bool:
    # A callable object counts when its __call__ is `async def`.
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - the method itself is what is inspected
    )


def _resolve_hints(handler: Handler, localns: Mapping[str, Any] | None) -> dict[str, Any]:
    target = handler if inspect.isroutine(handler) else getattr(handler, "__call__", handler)  # noqa: B004
    try:
        return typing.get_type_hints(
            target, localns=dict(localns) if localns else None, include_extras=True
        )
    except Exception as exc:
        raise TypeError(
            f"cannot resolve the annotations of {_qualname(handler)}: {exc} "
            "(are the annotated types importable at module level?)"
        ) from exc


def _is_context(annotation: Any) -> bool:
    """True for `Context`, a subclass, `Annotated[Context, ...]` and `Context | None`."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type):
        return issubclass(annotation, Context)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(members) == 1 and _is_context(members[0])
    return False


def _make_invoker(
    handler: Handler, positional: list[str], keyword: list[tuple[str, str]]
) -> Callable[[Any, Context], Any]:
    """Build `invoke(payload, ctx)` that calls the handler with its parameters in place."""
    if not keyword:
        if positional == ["payload"]:
            return lambda payload, ctx: handler(payload)
        if positional == ["payload", "ctx"]:
            return lambda payload, ctx: handler(payload, ctx)
        if positional == ["ctx", "payload"]:
            return lambda payload, ctx: handler(ctx, payload)

    def invoke(payload: Any, ctx: Context) -> Any:
        values = {"payload": payload, "ctx": ctx}
        args = [values[kind] for kind in positional]
        kwargs = {name: values[kind] for name, kind in keyword}
        return handler(*args, **kwargs)

    return invoke


def build_agent_spec(
    handler: Handler,
    *,
    topic: str,
    name: str | None = None,
    publishes: str | None = None,
    max_retries: int = 3,
    retry_backoff: float | timedelta | Backoff = 1.0,
    concurrency: int = 16,
    timeout: float | timedelta | None = None,
    reclaim_idle: float | timedelta = 30.0,
    start: Literal["earliest", "latest"] = "earliest",
    description: str | None = None,
    localns: Mapping[str, Any] | None = None,
    store_results: bool = False,
    result_ttl: float | timedelta = 86_400.0,
    idempotency_key: Callable[[Any], Any] | None = None,
    idempotency_ttl: float | timedelta = 86_400.0,
    rate_limit: str | RateLimit | None = None,
    rate_limit_key: Callable[[Any], Any] | None = None,
    key_concurrency: int | None = None,
    concurrency_key: Callable[[Any], Any] | None = None,
    budgets: Sequence[Budget] | None = None,
    estimate: Callable[[Any], float | Mapping[str, float]] | None = None,
    stream: Any = None,
) -> AgentSpec:
    """Inspect `handler` and the decorator's options; raise `TypeError`/`ValueError` if unusable.

    The payload parameter is the one parameter not annotated with `Context`; it must be
    annotated with a type pydantic can validate (a model, TypedDict, dataclass, `dict`, `Any`,
    ...). A `Context` parameter is optional and found by its annotation. String annotations
    (`from __future__ import annotations`) are resolved in the handler's module and in
    `localns`, the scope the decorator was applied in.
    """
    if not callable(handler):
        raise TypeError(f"@app.agent decorates a function, not {handler!r}")
    qualname = _qualname(handler)
    if inspect.isasyncgenfunction(handler) or inspect.isgeneratorfunction(handler):
        raise TypeError(f"{qualname}: a handler cannot be a generator; return the result instead")
    validate_topic(topic)
    if publishes is not None:
        validate_topic(publishes)
    agent_name = validate_agent_name(name if name is not None else qualname.split("<locals>.")[-1])

    signature = inspect.signature(handler)
    hints = _resolve_hints(handler, localns)
    positional: list[str] = []
    keyword: list[tuple[str, str]] = []
    payload_param: inspect.Parameter | None = None
    has_context = False
    skipped = False
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{qualname}: *args and **kwargs are not supported in a handler")
        annotation = hints.get(param.name, inspect.Parameter.empty)
        if _is_context(annotation):
            if has_context:
                raise TypeError(f"{qualname}: more than one Context parameter")
            has_context = True
            kind = "ctx"
        elif param.default is not param.empty and payload_param is not None:
            skipped = True  # an extra parameter with a default is left to its default
            continue
        else:
            if payload_param is not None:
                raise TypeError(
                    f"{qualname}: two payload parameters ({payload_param.name!r} and "
                    f"{param.name!r}); a handler takes one payload and optionally `ctx: Context`"
                )
            if annotation is inspect.Parameter.empty:
                raise TypeError(
                    f"{qualname}: parameter {param.name!r} has no type annotation; annotate it "
                    "with the payload type (a pydantic model, TypedDict, dataclass) or `dict`"
                )
            payload_param = param
            kind = "payload"
        if param.kind == param.KEYWORD_ONLY or skipped:
            if param.kind == param.POSITIONAL_ONLY:
                raise TypeError(f"{qualname}: cannot pass {param.name!r} after a default")
            keyword.append((param.name, kind))
        else:
            positional.append(kind)
    if payload_param is None:
        raise TypeError(
            f"{qualname}: no payload parameter; a handler takes the payload as its first "
            "parameter, e.g. `async def handle(event: MyEvent, ctx: Context)`"
        )
    payload_type = hints[payload_param.name]

    try:
        envelope_adapter: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[payload_type])  # type: ignore[valid-type]
    except (PydanticSchemaGenerationError, PydanticUserError, TypeError) as exc:
        raise TypeError(
            f"{qualname}: cannot validate payloads of type {payload_type!r}: {exc}"
        ) from exc

    return_type = hints.get("return", Any)
    return_adapter: TypeAdapter[Any] | None = None
    if return_type is None or return_type is type(None):
        if publishes is not None:
            raise TypeError(
                f"{qualname}: publishes={publishes!r} but the handler is annotated to return "
                "None; annotate the type it returns"
            )
        return_type = type(None)
    elif return_type is not Any:
        try:
            return_adapter = TypeAdapter(return_type)
        except (PydanticSchemaGenerationError, PydanticUserError, TypeError) as exc:
            raise TypeError(
                f"{qualname}: cannot validate return values of type {return_type!r}: {exc}"
            ) from exc

    if max_retries < 0:
        raise ValueError(f"{qualname}: max_retries must be >= 0, not {max_retries}")
    if concurrency < 1:
        raise ValueError(f"{qualname}: concurrency must be >= 1, not {concurrency}")
    backoff = (
        retry_backoff
        if isinstance(retry_backoff, Backoff)
        else Backoff(initial=_seconds(retry_backoff))
    )
    timeout_s = None if timeout is None else _seconds(timeout)
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"{qualname}: timeout must be > 0 seconds")
    reclaim_s = _seconds(reclaim_idle)
    if reclaim_s <= 0:
        raise ValueError(f"{qualname}: reclaim_idle must be > 0 seconds")
    ttl_s = _seconds(result_ttl)
    if ttl_s <= 0:
        raise ValueError(f"{qualname}: result_ttl must be > 0 seconds")
    if start not in ("earliest", "latest"):
        raise ValueError(f"{qualname}: start must be 'earliest' or 'latest', not {start!r}")
    stream_adapter: TypeAdapter[Any] | None = None
    if stream is not None:
        try:
            stream_adapter = TypeAdapter(stream)
        except (PydanticSchemaGenerationError, PydanticUserError, TypeError) as exc:
            raise TypeError(
                f"{qualname}: cannot validate chunks of type {stream!r}: {exc}"
            ) from exc
    flow = build_flow_spec(
        qualname,
        rate_limit=rate_limit,
        rate_limit_key=rate_limit_key,
        key_concurrency=key_concurrency,
        concurrency_key=concurrency_key,
        budgets=budgets,
        estimate=estimate,
    )

    return AgentSpec(
        name=agent_name,
        topic=topic,
        handler=handler,
        payload_type=payload_type,
        return_type=return_type,
        publishes=publishes,
        policy=RetryPolicy(max_retries=max_retries, backoff=backoff),
        concurrency=concurrency,
        timeout=timeout_s,
        reclaim_idle=reclaim_s,
        start=start,
        description=description if description is not None else inspect.getdoc(handler),
        is_async=_is_coroutine_function(handler),
        envelope_adapter=envelope_adapter,
        return_adapter=return_adapter,
        invoke=_make_invoker(handler, positional, keyword),
        store_results=store_results,
        result_ttl=ttl_s,
        idempotency_key=idempotency_key,
        idempotency_ttl=_seconds(idempotency_ttl),
        flow=flow,
        stream_type=stream,
        stream_adapter=stream_adapter,
    )
