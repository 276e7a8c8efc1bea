"""`omnidaemon/requests.py`: where a failure reply goes for an entry the worker did not read."""

from __future__ import annotations

import orjson

from omnidaemon.envelope import encode_new
from omnidaemon.requests import ReplyTarget, new_reply_topic, reply_target


def test_a_malformed_entry_still_names_its_request() -> None:
    reply_to = new_reply_topic()
    entry = orjson.dumps({"id": "e1", "reply_to": reply_to, "tenant_id": "acme", "v": "x"})

    assert reply_target(entry, 10_000) == ReplyTarget("e1", reply_to, None, "acme")
    assert reply_target(orjson.dumps({"id": "e1", "reply_to": "plain.topic"}), 10_000) is None
    assert reply_target(b"not json", 10_000) is None


def test_a_too_large_entry_is_searched_not_parsed_and_the_last_reply_to_wins() -> None:
    reply_to = new_reply_topic()
    decoy = {"reply_to": new_reply_topic()}  # a payload may hold the same text
    event_id, entry = encode_new("t.x", {"decoy": decoy, "pad": "x" * 500}, reply_to=reply_to)

    assert reply_target(entry, 100) == ReplyTarget(event_id, reply_to)
    # Without a reply_to of its own the decoy is found, but the reply names this event as its
    # cause, so the decoy's requester (waiting for another event) ignores it.
    unasked_id, unasked = encode_new("t.x", {"decoy": decoy, "pad": "x" * 500})
    found = reply_target(unasked, 100)
    assert found is not None
    assert found.event_id == unasked_id
