"""Handler introspection: what `@app.agent(...)` accepts, rejects, and how it calls the handler."""

import dataclasses
import re
import sys
import typing
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import typing_extensions
from pydantic import BaseModel, TypeAdapter, ValidationError

from omnidaemon import App, Backoff, Context
from omnidaemon.agents import AgentSpec, build_agent_spec
from omnidaemon.envelope import Envelope
from omnidaemon.testing import TestApp

# Payload types live at module level, where `typing.get_type_hints` can resolve them.


class Order(BaseModel):
    order_id: str
    amount: int


class OrderDict(typing_extensions.TypedDict):
    order_id: str
    amount: int


@dataclasses.dataclass
class OrderData:
    order_id: str
    amount: int


class Unvalidatable:
    """A plain class: pydantic has no schema for it."""


def make_app() -> App:
    return App("tests", broker="memory://")


def deliver(app: App, spec: AgentSpec, raw: Any, **envelope_options: Any) -> tuple[Any, Context]:
    """Do what the worker does with one event: decode it for `spec`, build the Context."""
    data = Envelope.new(spec.topic, raw, **envelope_options).encode()
    envelope = spec.envelope_adapter.validate_json(data)
    ctx = Context(app, envelope, agent=spec.name, attempt=1, max_attempts=spec.policy.max_attempts)
    return envelope.payload, ctx


# Payload annotation kinds --------------------------------------------------------------------

RAW_ORDER = {"order_id": "o-1", "amount": 3}

PAYLOAD_KINDS = [
    pytest.param(Order, RAW_ORDER, Order(order_id="o-1", amount=3), id="pydantic-model"),
    pytest.param(OrderDict, RAW_ORDER, {"order_id": "o-1", "amount": 3}, id="typeddict"),
    pytest.param(OrderData, RAW_ORDER, OrderData(order_id="o-1", amount=3), id="dataclass"),
    pytest.param(dict, RAW_ORDER, RAW_ORDER, id="dict"),
    pytest.param(dict[str, Any], RAW_ORDER, RAW_ORDER, id="dict-str-any"),
    pytest.param(Any, RAW_ORDER, RAW_ORDER, id="any-object"),
    pytest.param(Any, ["a", 1, None], ["a", 1, None], id="any-list"),
    pytest.param(Any, "just a string", "just a string", id="any-str"),
    pytest.param(list[int], [1, 2, 3], [1, 2, 3], id="list-int"),
]


@pytest.mark.parametrize(("annotation", "raw", "expected"), PAYLOAD_KINDS)
def test_payload_annotation_kinds_are_accepted_and_validated(
    annotation: Any, raw: Any, expected: Any
) -> None:
    app = make_app()
    received: list[Any] = []

    @app.agent("orders.created")
    def handle(event: annotation, ctx: Context) -> None:  # type: ignore[valid-type]
        received.append(event)

    spec = app.agents["handle"]
    assert spec.payload_type == annotation
    payload, ctx = deliver(app, spec, raw)
    spec.invoke(payload, ctx)
    assert received == [expected]
    assert type(received[0]) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "bad_raw"),
    [
        pytest.param(Order, {"order_id": "o-1"}, id="pydantic-model"),
        pytest.param(OrderDict, {"order_id": "o-1", "amount": "lots"}, id="typeddict"),
        pytest.param(OrderData, {"amount": 3}, id="dataclass"),
        pytest.param(dict, [1, 2], id="dict"),
        pytest.param(dict[str, Any], "text", id="dict-str-any"),
        pytest.param(list[int], ["x"], id="list-int"),
    ],
)
def test_payload_that_does_not_match_the_annotation_is_refused(
    annotation: Any, bad_raw: Any
) -> None:
    app = make_app()

    @app.agent("orders.created")
    def handle(event: annotation) -> None:  # type: ignore[valid-type]
        raise AssertionError("never called")

    spec = app.agents["handle"]
    with pytest.raises(ValidationError):
        spec.envelope_adapter.validate_json(Envelope.new("orders.created", bad_raw).encode())


def test_model_payload_fields_are_coerced_from_json() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def handle(event: Order) -> None: ...

    payload, _ = deliver(app, app.agents["handle"], {"order_id": "o-9", "amount": "12"})
    assert payload == Order(order_id="o-9", amount=12)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="typing.TypedDict works on 3.12+")
def test_typing_typeddict_on_python_311_is_a_clear_type_error() -> None:
    class StdlibOrder(typing.TypedDict):
        order_id: str

    app = make_app()
    with pytest.raises(TypeError, match=re.escape("typing_extensions.TypedDict")):

        @app.agent("orders.created")
        def handle(event: StdlibOrder) -> None: ...

    assert dict(app.agents) == {}


# Where the Context goes ----------------------------------------------------------------------


def handler_shapes(received: list[tuple[Any, Any]]) -> dict[str, Callable[..., Any]]:
    """Handlers that take the payload and the Context in every supported arrangement."""

    async def ctx_second(event: Order, ctx: Context) -> None:
        received.append((event, ctx))

    async def ctx_first(ctx: Context, event: Order) -> None:
        received.append((event, ctx))

    async def ctx_keyword_only(event: Order, *, ctx: Context) -> None:
        received.append((event, ctx))

    async def all_keyword_only(*, ctx: Context, event: Order) -> None:
        received.append((event, ctx))

    async def ctx_any_name(order: Order, context: Context) -> None:
        received.append((order, context))

    async def no_ctx(event: Order) -> None:
        received.append((event, None))

    def sync_ctx_second(event: Order, ctx: Context) -> None:
        received.append((event, ctx))

    def sync_ctx_first(ctx: Context, event: Order) -> None:
        received.append((event, ctx))

    def sync_ctx_keyword_only(event: Order, *, ctx: Context) -> None:
        received.append((event, ctx))

    def sync_no_ctx(event: Order) -> None:
        received.append((event, None))

    def positional_only(event: Order, /, ctx: Context) -> None:
        received.append((event, ctx))

    async def extra_defaulted_param(event: Order, label: str = "default", *, ctx: Context) -> None:
        assert label == "default"
        received.append((event, ctx))

    shapes = [
        ctx_second,
        ctx_first,
        ctx_keyword_only,
        all_keyword_only,
        ctx_any_name,
        no_ctx,
        sync_ctx_second,
        sync_ctx_first,
        sync_ctx_keyword_only,
        sync_no_ctx,
        positional_only,
        extra_defaulted_param,
    ]
    return {f.__name__: f for f in shapes}


SHAPES = list(handler_shapes([]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.anyio
async def test_invoke_passes_payload_and_context_in_every_position(shape: str) -> None:
    received: list[tuple[Any, Any]] = []
    handler = handler_shapes(received)[shape]
    app = make_app()
    app.agent("orders.created")(handler)
    spec = app.agents[shape]

    payload, ctx = deliver(app, spec, RAW_ORDER)
    result = spec.invoke(payload, ctx)
    if spec.is_async:
        result = await result
    assert result is None
    assert len(received) == 1
    event, got_ctx = received[0]
    assert event == Order(order_id="o-1", amount=3)
    if shape.endswith("no_ctx"):
        assert got_ctx is None
    else:
        assert got_ctx is ctx


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.anyio
async def test_worker_delivers_payload_and_context_in_every_position(shape: str) -> None:
    received: list[tuple[Any, Any]] = []
    handler = handler_shapes(received)[shape]
    app = make_app()
    app.agent("orders.created")(handler)

    async with TestApp(app) as bus:
        event_id = await bus.publish("orders.created", RAW_ORDER)
        await bus.drain()
        assert bus.dead_letters(shape) == []

    assert len(received) == 1
    event, ctx = received[0]
    assert event == Order(order_id="o-1", amount=3)
    if shape.endswith("no_ctx"):
        assert ctx is None
    else:
        assert isinstance(ctx, Context)
        assert ctx.event_id == event_id
        assert ctx.agent == shape
        assert ctx.topic == "orders.created"
        assert ctx.attempt == 1


def test_a_parameter_named_ctx_is_the_payload_unless_annotated_context() -> None:
    app = make_app()

    @app.agent("orders.created")
    def handle(ctx: Order) -> Order:
        return ctx

    spec = app.agents["handle"]
    assert spec.payload_type is Order
    payload, ctx = deliver(app, spec, RAW_ORDER)
    assert spec.invoke(payload, ctx) == Order(order_id="o-1", amount=3)


def test_context_subclass_is_recognised_as_the_context() -> None:
    class MyContext(Context):
        __slots__ = ()

    app = make_app()

    @app.agent("orders.created")
    def handle(ctx: MyContext, event: dict) -> dict:
        return event

    spec = app.agents["handle"]
    assert spec.payload_type is dict


def test_optional_context_parameter_receives_the_context() -> None:
    app = make_app()
    received: list[Any] = []

    def handle(event: dict, ctx: Context | None = None) -> None:
        received.append(ctx)

    try:
        app.agent("orders.created")(handle)
    except TypeError:
        return  # refusing the signature clearly would be fine too; silently passing None is not
    spec = app.agents["handle"]
    payload, ctx = deliver(app, spec, RAW_ORDER)
    spec.invoke(payload, ctx)
    assert received == [ctx]


# String annotations --------------------------------------------------------------------------

FUTURE_ANNOTATIONS_SOURCE = """
from __future__ import annotations

async def future_handler(event: Order, ctx: Context) -> Order:
    return event

def future_ctx_first(ctx: Context, event: dict[str, Any]) -> list[int]:
    return [len(event)]
"""


def compile_with_future_annotations(source: str, namespace: dict[str, Any]) -> dict[str, Any]:
    exec(compile(source, "<handlers with string annotations>", "exec"), namespace)
    return namespace


@pytest.mark.anyio
async def test_future_annotations_resolve() -> None:
    namespace = compile_with_future_annotations(
        FUTURE_ANNOTATIONS_SOURCE, {"Order": Order, "Context": Context, "Any": Any}
    )
    future_handler = namespace["future_handler"]
    future_ctx_first = namespace["future_ctx_first"]
    assert future_handler.__annotations__["event"] == "Order"  # really strings

    app = make_app()
    app.agent("orders.created", publishes="orders.checked")(future_handler)
    app.agent("orders.created")(future_ctx_first)

    spec = app.agents["future_handler"]
    assert spec.payload_type is Order
    assert spec.return_type is Order
    assert spec.return_adapter is not None
    payload, ctx = deliver(app, spec, RAW_ORDER)
    assert await spec.invoke(payload, ctx) == Order(order_id="o-1", amount=3)

    spec2 = app.agents["future_ctx_first"]
    assert spec2.payload_type == dict[str, Any]
    assert spec2.return_type == list[int]
    payload, ctx = deliver(app, spec2, RAW_ORDER)
    assert spec2.invoke(payload, ctx) == [2]


def test_quoted_annotations_resolve() -> None:
    app = make_app()

    @app.agent("orders.created")
    def handle(event: "Order", ctx: "Context") -> "OrderData":
        return OrderData(order_id=event.order_id, amount=event.amount)

    spec = app.agents["handle"]
    assert spec.payload_type is Order
    assert spec.return_type is OrderData
    payload, ctx = deliver(app, spec, RAW_ORDER)
    assert spec.invoke(payload, ctx) == OrderData(order_id="o-1", amount=3)


def test_unresolvable_string_annotation_is_a_clear_type_error() -> None:
    source = """
from __future__ import annotations

def make():
    class LocalOnly:
        pass

    def handle(event: LocalOnly) -> None: ...

    return handle

def handle_missing(event: NotDefinedAnywhere) -> None: ...
"""
    namespace = compile_with_future_annotations(source, {})
    app = make_app()
    for handler in (namespace["make"](), namespace["handle_missing"]):
        with pytest.raises(TypeError, match="cannot resolve the annotations"):
            app.agent("orders.created")(handler)
    assert dict(app.agents) == {}


# Signatures refused at decoration time ------------------------------------------------------


def two_payloads(event: Order, other: Order) -> None: ...


def missing_annotation(event) -> None: ...  # type: ignore[no-untyped-def]


def missing_annotation_with_ctx(ctx: Context, event) -> None: ...  # type: ignore[no-untyped-def]


def context_only(ctx: Context) -> None: ...


def no_parameters() -> None: ...


def two_contexts(event: Order, ctx: Context, ctx2: Context) -> None: ...


def var_args(event: Order, *args: Any) -> None: ...


def var_kwargs(event: Order, **kwargs: Any) -> None: ...


def only_var_args(*args: Any) -> None: ...


def generator(event: Order) -> typing.Iterator[Order]:
    yield event


async def async_generator(event: Order) -> typing.AsyncIterator[Order]:
    yield event


def unvalidatable_payload(event: Unvalidatable) -> None: ...


def unvalidatable_return(event: Order) -> Unvalidatable:
    return Unvalidatable()


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (two_payloads, "two payload parameters"),
        (missing_annotation, "no type annotation"),
        (missing_annotation_with_ctx, "no type annotation"),
        (context_only, "no payload parameter"),
        (no_parameters, "no payload parameter"),
        (two_contexts, "more than one Context"),
        (var_args, r"\*args and \*\*kwargs"),
        (var_kwargs, r"\*args and \*\*kwargs"),
        (only_var_args, r"\*args and \*\*kwargs"),
        (generator, "generator"),
        (async_generator, "generator"),
        (unvalidatable_payload, "cannot validate payloads"),
        (unvalidatable_return, "cannot validate return values"),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_unusable_signature_is_a_type_error_at_decoration(
    handler: Callable[..., Any], message: str
) -> None:
    app = make_app()
    with pytest.raises(TypeError, match=message) as info:
        app.agent("orders.created")(handler)
    assert handler.__name__ in str(info.value)  # the message names the culprit
    assert dict(app.agents) == {}


def test_publishes_with_a_none_return_is_a_type_error() -> None:
    app = make_app()
    with pytest.raises(TypeError, match=re.escape("publishes='orders.checked'")):

        @app.agent("orders.created", publishes="orders.checked")
        async def check(event: Order) -> None: ...

    assert dict(app.agents) == {}


def test_publishes_with_unannotated_or_typed_return_is_accepted() -> None:
    app = make_app()

    @app.agent("orders.created", publishes="orders.checked")
    async def unannotated(event: Order):  # type: ignore[no-untyped-def]
        return event

    @app.agent("orders.created", publishes="orders.checked")
    async def typed(event: Order) -> Order:
        return event

    assert app.agents["unannotated"].publishes == "orders.checked"
    assert app.agents["typed"].publishes == "orders.checked"


def test_decorating_something_not_callable_is_a_type_error() -> None:
    app = make_app()
    with pytest.raises(TypeError, match="decorates a function"):
        app.agent("orders.created")("not a function")  # type: ignore[type-var]


# Bad names and options ----------------------------------------------------------------------

BAD_TOPICS = [
    pytest.param("Orders.Created", id="uppercase"),
    pytest.param("orders created", id="space"),
    pytest.param("", id="empty"),
    pytest.param(".orders", id="leading-dot"),
    pytest.param("orders.", id="trailing-dot"),
    pytest.param("orders..created", id="double-dot"),
    pytest.param("orders/created", id="slash"),
    pytest.param("orders:{created}", id="redis-key-chars"),
    pytest.param("a" * 201, id="too-long"),
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_bad_topic_is_a_value_error_at_decoration(topic: str) -> None:
    app = make_app()
    with pytest.raises(ValueError, match="invalid topic name"):

        @app.agent(topic)
        async def handle(event: dict) -> None: ...

    assert dict(app.agents) == {}


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_bad_publishes_topic_is_a_value_error_at_decoration(topic: str) -> None:
    app = make_app()
    with pytest.raises(ValueError, match="invalid topic name"):

        @app.agent("orders.created", publishes=topic)
        async def handle(event: dict) -> dict: ...

    assert dict(app.agents) == {}


@pytest.mark.parametrize(
    "topic", ["orders", "orders.created", "billing.invoice-paid", "a_b.c-d.0.9", "x" * 200]
)
def test_good_topics_are_accepted(topic: str) -> None:
    app = make_app()

    @app.agent(topic, publishes=topic)
    async def handle(event: dict) -> dict: ...

    assert app.agents["handle"].topic == topic


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("has space", id="space"),
        pytest.param("-leading-dash", id="leading-dash"),
        pytest.param(".leading-dot", id="leading-dot"),
        pytest.param("a/b", id="slash"),
        pytest.param("a{b}", id="braces"),
        pytest.param("naïve", id="non-ascii"),
        pytest.param("n" * 201, id="too-long"),
    ],
)
def test_bad_agent_name_is_a_value_error(name: str) -> None:
    app = make_app()
    with pytest.raises(ValueError, match="invalid agent name"):

        @app.agent("orders.created", name=name)
        async def handle(event: dict) -> None: ...

    assert dict(app.agents) == {}


def test_empty_agent_name_is_a_value_error() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="invalid agent name"):

        @app.agent("orders.created", name="")
        async def handle(event: dict) -> None: ...


def test_agent_name_with_a_trailing_newline_is_a_value_error() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="invalid agent name"):

        @app.agent("orders.created", name="handle\n")
        async def handle(event: dict) -> None: ...


@pytest.mark.parametrize("name", ["extract_text", "Extractor", "billing:v2", "a.b-c_d", "0"])
def test_good_agent_names_are_accepted(name: str) -> None:
    app = make_app()

    @app.agent("orders.created", name=name)
    async def handle(event: dict) -> None: ...

    assert list(app.agents) == [name]
    assert app.agents[name].name == name


def test_duplicate_agent_name_on_one_app_is_a_value_error() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def handle(event: dict) -> None: ...

    first = app.agents["handle"]

    with pytest.raises(ValueError, match="already registered"):

        @app.agent("orders.paid")  # a different topic does not help
        async def handle(event: dict) -> None: ...

    with pytest.raises(ValueError, match="already registered"):

        @app.agent("orders.paid", name="handle")
        async def other(event: dict) -> None: ...

    assert app.agents["handle"] is first
    assert first.topic == "orders.created"


def test_same_name_on_two_apps_and_distinct_names_on_one_app_are_fine() -> None:
    app, other_app = make_app(), make_app()

    async def handle(event: dict) -> None: ...

    app.agent("orders.created")(handle)
    other_app.agent("orders.created")(handle)
    app.agent("orders.created", name="handle-again")(handle)
    assert sorted(app.agents) == ["handle", "handle-again"]
    assert list(other_app.agents) == ["handle"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -4}, "concurrency"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": timedelta(seconds=-1)}, "timeout"),
        ({"reclaim_idle": 0}, "reclaim_idle"),
        ({"start": "middle"}, "start"),
        ({"retry_backoff": -1.0}, "Backoff"),
    ],
)
def test_bad_options_are_value_errors(options: dict[str, Any], message: str) -> None:
    app = make_app()
    with pytest.raises(ValueError, match=message):

        @app.agent("orders.created", **options)
        async def handle(event: dict) -> None: ...

    assert dict(app.agents) == {}


def test_options_are_recorded_on_the_spec() -> None:
    app = make_app()

    @app.agent(
        "orders.created",
        name="checker",
        publishes="orders.checked",
        max_retries=0,
        retry_backoff=timedelta(milliseconds=250),
        concurrency=1,
        timeout=timedelta(minutes=2),
        reclaim_idle=timedelta(seconds=90),
        start="latest",
        description="Checks orders.",
    )
    async def check(event: Order) -> Order:
        return event

    spec = app.agents["checker"]
    assert spec.name == "checker"
    assert spec.topic == "orders.created"
    assert spec.handler is check
    assert spec.publishes == "orders.checked"
    assert spec.policy.max_retries == 0
    assert spec.policy.max_attempts == 1
    assert spec.policy.backoff.initial == 0.25
    assert spec.concurrency == 1
    assert spec.timeout == 120.0
    assert spec.reclaim_idle == 90.0
    assert spec.start == "latest"
    assert spec.description == "Checks orders."


def test_defaults_on_the_spec() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def handle(event: Order) -> None: ...

    spec = app.agents["handle"]
    assert spec.publishes is None
    assert spec.policy.max_retries == 3
    assert spec.policy.max_attempts == 4
    assert spec.policy.backoff == Backoff(initial=1.0)
    assert spec.concurrency == 16
    assert spec.timeout is None
    assert spec.reclaim_idle == 30.0
    assert spec.start == "earliest"


def test_retry_backoff_accepts_seconds_timedelta_or_backoff() -> None:
    custom = Backoff(initial=0.5, factor=3.0, maximum=10.0, jitter=False)
    app = make_app()

    async def handle(event: dict) -> None: ...

    app.agent("t.a", name="seconds", retry_backoff=2)(handle)
    app.agent("t.a", name="delta", retry_backoff=timedelta(seconds=5))(handle)
    app.agent("t.a", name="custom", retry_backoff=custom)(handle)
    assert app.agents["seconds"].policy.backoff.initial == 2.0
    assert app.agents["delta"].policy.backoff.initial == 5.0
    assert app.agents["custom"].policy.backoff is custom


def test_agents_mapping_is_read_only() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def handle(event: dict) -> None: ...

    with pytest.raises(TypeError):
        app.agents["sneaky"] = app.agents["handle"]  # type: ignore[index]


# Names, identity, sync/async, description, return adapter ----------------------------------


async def module_level_handler(event: Order) -> None:
    """Handles orders.

    Second paragraph.
    """


def test_name_defaults_to_the_function_name() -> None:
    app = make_app()
    app.agent("orders.created")(module_level_handler)

    @app.agent("orders.created")
    async def nested_in_test(event: Order) -> None: ...

    def outer() -> Callable[..., Any]:
        def inner() -> Callable[..., Any]:
            async def deeply_nested(event: Order) -> None: ...

            return deeply_nested

        return inner()

    app.agent("orders.created")(outer())
    assert sorted(app.agents) == ["deeply_nested", "module_level_handler", "nested_in_test"]
    for name, spec in app.agents.items():
        assert spec.name == name


def test_build_agent_spec_directly_uses_the_same_rules() -> None:
    def handle(event: Order) -> Order:
        return event

    spec = build_agent_spec(handle, topic="orders.created")
    assert isinstance(spec, AgentSpec)
    assert spec.name == "handle"
    assert spec.handler is handle
    with pytest.raises(ValueError, match="invalid topic name"):
        build_agent_spec(handle, topic="Orders")


@pytest.mark.anyio
async def test_decorator_returns_the_original_function_unchanged() -> None:
    app = make_app()

    async def original(event: Order, ctx: Context) -> Order:
        return event

    def sync_original(event: Order) -> int:
        return event.amount

    decorated = app.agent("orders.created")(original)
    sync_decorated = app.agent("orders.created")(sync_original)
    assert decorated is original
    assert sync_decorated is sync_original
    # Still callable directly, as in a unit test.
    order = Order(order_id="o-1", amount=3)
    assert await decorated(order, None) is order  # type: ignore[arg-type]
    assert sync_decorated(order) == 3
    # Stackable: the same function can serve two topics under two names.
    again = app.agent("orders.paid", name="original-paid")(decorated)
    assert again is original
    assert app.agents["original-paid"].handler is original


def test_sync_and_async_handlers_are_detected() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def async_handler(event: dict) -> None: ...

    @app.agent("orders.created")
    def sync_handler(event: dict) -> None: ...

    assert app.agents["async_handler"].is_async is True
    assert app.agents["sync_handler"].is_async is False


@pytest.mark.anyio
async def test_sync_handler_runs_under_the_worker() -> None:
    app = make_app()
    seen: list[int] = []

    @app.agent("orders.created", publishes="orders.checked")
    def sync_handler(event: Order) -> Order:
        seen.append(event.amount)
        return Order(order_id=event.order_id, amount=event.amount * 2)

    async with TestApp(app) as bus:
        await bus.publish("orders.created", RAW_ORDER)
        await bus.drain()
        out = bus.published("orders.checked")

    assert seen == [3]
    assert [e.payload for e in out] == [{"order_id": "o-1", "amount": 6}]


def test_description_defaults_to_the_docstring() -> None:
    app = make_app()
    app.agent("orders.created")(module_level_handler)
    app.agent("orders.created", name="explicit", description="Explicit.")(module_level_handler)

    @app.agent("orders.created")
    async def undocumented(event: dict) -> None: ...

    assert app.agents["module_level_handler"].description == (
        "Handles orders.\n\nSecond paragraph."
    )
    assert app.agents["explicit"].description == "Explicit."
    assert app.agents["undocumented"].description is None


def test_return_adapter_is_present_only_for_a_checkable_return_type() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def returns_model(event: dict) -> Order: ...

    @app.agent("orders.created")
    async def returns_list(event: dict) -> list[int]: ...

    @app.agent("orders.created")
    async def returns_none(event: dict) -> None: ...

    @app.agent("orders.created")
    async def unannotated(event: dict):  # type: ignore[no-untyped-def]
        ...

    @app.agent("orders.created")
    async def returns_any(event: dict) -> Any: ...

    model_adapter = app.agents["returns_model"].return_adapter
    assert isinstance(model_adapter, TypeAdapter)
    assert app.agents["returns_model"].return_type is Order
    assert model_adapter.validate_python(RAW_ORDER) == Order(order_id="o-1", amount=3)
    with pytest.raises(ValidationError):
        model_adapter.validate_python({"order_id": "o-1"})

    list_adapter = app.agents["returns_list"].return_adapter
    assert list_adapter is not None
    assert list_adapter.validate_python(["1", 2]) == [1, 2]

    assert app.agents["returns_none"].return_adapter is None
    assert app.agents["returns_none"].return_type is type(None)
    assert app.agents["unannotated"].return_adapter is None
    assert app.agents["unannotated"].return_type is Any
    assert app.agents["returns_any"].return_adapter is None
    assert app.agents["returns_any"].return_type is Any


def test_spec_is_read_only() -> None:
    app = make_app()

    @app.agent("orders.created")
    async def handle(event: dict) -> None: ...

    spec = app.agents["handle"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.topic = "orders.paid"  # type: ignore[misc]
