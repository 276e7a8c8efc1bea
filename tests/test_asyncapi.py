"""`omnidaemon.asyncapi`: the AsyncAPI 3.0 document of an app, checked against the shape the
specification requires and for references that resolve."""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import BaseModel

from omnidaemon import App
from omnidaemon.asyncapi import asyncapi_document

KEY = re.compile(r"^[A-Za-z0-9_\-]+$")  # the specification's pattern for component keys


class Address(BaseModel):
    city: str


class Order(BaseModel):
    """An order placed."""

    sku: str
    qty: int
    ship_to: Address


class Checked(BaseModel):
    sku: str
    in_stock: bool
    ship_to: Address


def shop() -> App:
    app = App("shop", broker="memory://")

    @app.agent("order.placed", publishes="order.checked")
    async def check(order: Order) -> Checked:
        """Checks the stock."""
        return Checked(sku=order.sku, in_stock=True, ship_to=order.ship_to)

    @app.agent("order.checked")
    async def ship(checked: Checked) -> None:
        """Ships what is in stock."""

    @app.agent("order.placed", name="audit")
    async def audit(order: dict[str, Any]) -> None:
        """Logs every raw order."""

    return app


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert part in node, ref
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def test_the_document_has_the_fields_asyncapi_3_requires() -> None:
    document = asyncapi_document(shop(), version="2.1.0")
    orjson.dumps(document)  # JSON data only

    assert document["asyncapi"] == "3.0.0"
    assert (document["info"]["title"], document["info"]["version"]) == ("shop", "2.1.0")
    channels = document["channels"]
    assert {c["address"] for c in channels.values()} == {"order.placed", "order.checked"}
    for key, channel in channels.items():
        assert KEY.match(key), key
        assert channel["messages"], key
        for message in channel["messages"].values():
            assert message["contentType"] == "application/json"
            assert isinstance(message["payload"], dict)
    operations = document["operations"]
    assert sorted(
        (op["action"], resolve(document, op["channel"]["$ref"])["address"])
        for op in operations.values()
    ) == [
        ("receive", "order.checked"),
        ("receive", "order.placed"),
        ("receive", "order.placed"),
        ("send", "order.checked"),
    ]
    for key, op in operations.items():
        assert KEY.match(key), key
        assert op["action"] in ("send", "receive")
        channel = op["channel"]["$ref"]
        for message in op["messages"]:
            # An operation's messages must be messages of its own channel.
            assert message["$ref"].startswith(channel + "/messages/"), key
    for ref in refs(document):
        resolve(document, ref)  # every reference resolves within the document


def test_payload_schemas_come_from_the_types_and_models_are_written_once() -> None:
    document = asyncapi_document(shop())
    schemas = document["components"]["schemas"]
    assert sorted(schemas) == ["Address", "Checked", "Order"]
    assert schemas["Order"]["required"] == ["sku", "qty", "ship_to"]
    assert schemas["Order"]["properties"]["ship_to"] == {"$ref": "#/components/schemas/Address"}
    placed = document["channels"]["order_placed"]["messages"]
    # Two types declared for one topic: two messages, the raw dict's schema inline.
    assert placed["Order"]["payload"] == {"$ref": "#/components/schemas/Order"}
    assert [m["payload"] for k, m in placed.items() if k != "Order"] == [
        {"type": "object", "additionalProperties": True}
    ]
    check_send = document["operations"]["check_send"]
    assert resolve(document, check_send["messages"][0]["$ref"])["name"] == "Checked"
    assert check_send["description"] == "Checks the stock."
