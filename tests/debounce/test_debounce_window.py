"""The window protocol's pure steps (`omnidaemon.debounce.window`), each as a redelivery or a
race would run it: duplicate checks die out, a sealed window is published by whichever copy
of its check comes, a message is collected once however often it is delivered, the bounds,
and a window whose check was lost is found again by its next message."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson

from omnidaemon.debounce.spec import MAX_DONE, MAX_WINDOW_MESSAGES
from omnidaemon.debounce.window import (
    Decision,
    Limits,
    add,
    decide,
    decode,
    record,
    remove_sealed,
    reschedule,
    seal_due,
)

LIMITS = Limits(
    debounce=5.0,
    max_wait=30.0,
    max_messages=3,
    max_bytes=100,
    retention=600.0,
    max_done=4,
    heal_after=60.0,
)


def msg(n: int, size: int = 1, created: float | None = None) -> dict[str, Any]:
    return {"id": f"id{n}", "c": float(n) if created is None else created, "p": n, "cid": None,
            "tid": None, "n": size}  # fmt: skip


ROOMY = replace(LIMITS, max_messages=100)


def collect(
    value: bytes | None, n: int, now: float, limits: Limits = LIMITS, **kw: Any
) -> tuple[bytes, Any]:
    new, _, added = add(value, msg(n, **kw), now, (f"w{n}", f"t{n}"), limits)
    return new, added


def test_a_first_message_opens_a_window_and_asks_for_its_check() -> None:
    value, added = collect(None, 0, now=100.0)
    assert not added.duplicate
    assert added.checks == (("t0", 105.0),)
    value, added = collect(value, 1, now=102.0)
    assert added.checks == ()  # the window's check is already on its way
    assert decide(decode(value), "t0", 105.0, LIMITS).action == "wait"
    assert decide(decode(value), "t0", 105.0, LIMITS).due == 107.0
    assert decide(decode(value), "t0", 107.0, LIMITS).action == "seal"


def test_duplicate_checks_die_out() -> None:
    value, _ = collect(None, 0, now=100.0)
    value, _ = collect(value, 1, now=103.0)
    # Two copies of check t0 (a redelivered message published it again) both find it early.
    first = decide(decode(value), "t0", 105.0, LIMITS)
    second = decide(decode(value), "t0", 105.0, LIMITS)
    assert first.action == second.action == "wait"
    value, _, moved = reschedule(value, "t0", "t1", first.due, LIMITS)
    assert moved
    value, _, moved_again = reschedule(value, "t0", "t2", second.due, LIMITS)
    assert not moved_again  # so it publishes no check t2
    assert decide(decode(value), "t1", 108.0, LIMITS).action == "seal"
    # A later copy of t0 learns of t1 (sent again only by a redelivery of t0: the worker
    # that handed the window to t1 may have died before publishing it).
    assert decide(decode(value), "t0", 106.0, LIMITS) == Decision("resend", due=108.0, token="t1")
    assert decide(decode(value), "t2", 200.0, LIMITS).action == "drop"


def test_a_sealed_window_is_published_by_any_copy_of_its_check() -> None:
    value, _ = collect(None, 2, now=100.0, created=7.0)
    value, _ = collect(value, 1, now=101.0, created=3.0)
    value, _, decision = seal_due(value, "t2", 106.0, LIMITS)
    assert decision.action == "publish"
    assert decision.sealed is not None
    assert [m["id"] for m in decision.sealed["msgs"]] == ["id1", "id2"]  # publish order
    # The worker died before forgetting the window: the check, delivered again, finds the
    # same batch to publish (Broker.publish_once keeps the bus from holding it twice).
    value, _, again = seal_due(value, "t2", 140.0, LIMITS)
    assert again == decision
    value, _, _ = remove_sealed(value, decision.sealed["w"], LIMITS)
    assert decide(decode(value), "t2", 150.0, LIMITS).action == "drop"


def test_messages_that_come_while_a_window_is_sealed_open_the_next() -> None:
    value, _ = collect(None, 0, now=100.0)
    value, _, _ = seal_due(value, "t0", 105.0, LIMITS)
    value, added = collect(value, 1, now=105.5)
    assert added.checks == (("t1", 110.5),)
    state = decode(value)
    assert state["open"]["w"] == "w1"
    assert [s["w"] for s in state["sealed"]] == ["w0"]


def test_a_message_is_collected_once_however_often_it_is_delivered() -> None:
    value, _ = collect(None, 0, now=100.0)
    value, again = collect(value, 0, now=101.0)
    assert again.duplicate
    assert again.checks == (("t0", 105.0),)  # its first collect may have died before this
    value, _, decision = seal_due(value, "t0", 106.0, LIMITS)
    value, sealed_again = collect(value, 0, now=107.0)  # while its batch is published
    # The check that publishes it may have been lost: sent again.
    assert sealed_again.duplicate and sealed_again.checks == (("t0", 107.0),)
    assert decision.sealed is not None
    value, _, _ = remove_sealed(value, decision.sealed["w"], LIMITS)
    value, flushed_again = collect(value, 0, now=500.0)  # after its batch was published
    assert flushed_again.duplicate
    assert decode(value)["open"] is None
    value, late = collect(value, 0, now=707.0)  # forgotten `retention` after its flush
    assert not late.duplicate


def test_flushed_ids_are_bounded() -> None:
    value = None
    for n in range(10):
        value, _ = collect(value, n, now=100.0 + n)
        value, _, decision = seal_due(value, f"t{n}", 200.0 + n, LIMITS)
        assert decision.sealed is not None
        value, _, _ = remove_sealed(value, decision.sealed["w"], LIMITS)
    value, _ = collect(value, 99, now=300.0)
    assert list(decode(value)["done"]) == ["id6", "id7", "id8", "id9"]


def test_a_full_window_is_sealed_at_once() -> None:
    value = None
    checks = []
    for n in range(4):
        value, added = collect(value, n, now=100.0 + n)
        checks.append(added.checks)
    # The third message fills the window (3 messages): sealed with a check due now.
    assert checks[2] == (("t0", 102.0),)
    state = decode(value)
    assert [m["id"] for m in state["sealed"][0]["msgs"]] == ["id0", "id1", "id2"]
    assert [m["id"] for m in state["open"]["msgs"]] == ["id3"]


def test_a_window_that_cannot_take_a_message_is_sealed_first() -> None:
    value, _ = collect(None, 0, now=100.0, size=60)
    value, added = collect(value, 1, now=101.0, size=60)  # 120 bytes would be over 100
    assert dict(added.checks) == {"t0": 101.0, "t1": 106.0}
    state = decode(value)
    assert [m["id"] for m in state["sealed"][0]["msgs"]] == ["id0"]
    assert [m["id"] for m in state["open"]["msgs"]] == ["id1"]


def test_a_window_whose_check_was_lost_is_found_by_its_next_message() -> None:
    value, _ = collect(None, 0, now=100.0)
    value, added = collect(value, 1, now=170.0, limits=ROOMY)  # its check (due at 105) never came
    assert added.checks == (("t0", 170.0),)
    # One re-sent check per heal_after, no more.
    value, added = collect(value, 2, now=171.0, limits=ROOMY)
    assert added.checks == ()
    value, added = collect(value, 3, now=229.0, limits=ROOMY)
    assert added.checks == ()
    value, added = collect(value, 4, now=231.0, limits=ROOMY)  # heal_after later: again
    assert added.checks == (("t0", 231.0),)


def test_a_sealed_window_whose_check_was_lost_is_found_by_the_next_message() -> None:
    value, _ = collect(None, 0, now=100.0, size=60)
    value, added = collect(value, 1, now=101.0, size=30)  # fits
    value, added = collect(value, 2, now=102.0, size=30)  # seals w0 (t0 due now), opens w2
    assert dict(added.checks) == {"t0": 102.0, "t2": 107.0}
    # Its first collect died before publishing t0, then a redelivery: t0 is sent again
    # (and w2's own check, which may be lost too), whether the redelivered message is the
    # one that sealed the window or one sealed in it.
    value, again = collect(value, 2, now=103.0, size=30)
    assert again.duplicate and dict(again.checks) == {"t0": 103.0, "t2": 107.0}
    value, again = collect(value, 0, now=104.0, size=60)
    assert again.duplicate and dict(again.checks) == {"t0": 104.0, "t2": 107.0}
    # No redelivery at all: a later message re-sends the overdue check, once per heal_after.
    value, _, _ = reschedule(value, "t2", "t9", 1_000.0, LIMITS)  # w2's check is fine
    value, added = collect(value, 3, now=162.5, limits=ROOMY)
    assert added.checks == (("t0", 162.5),)
    value, added = collect(value, 4, now=170.0, limits=ROOMY)
    assert added.checks == ()
    value, added = collect(value, 5, now=223.0, limits=ROOMY)
    assert added.checks == (("t0", 223.0),)
    assert decide(decode(value), "t0", 223.0, LIMITS).action == "publish"


def test_one_sealed_window_at_a_time() -> None:
    value, _ = collect(None, 0, now=100.0, size=60)
    value, _ = collect(value, 1, now=101.0, size=60)  # seals w0, opens w1
    value, added = collect(value, 2, now=102.0, size=40)  # fills w1: due now
    assert added.checks == (("t1", 102.0),)
    # w1 is full and w0's batch is not out yet: the next message is not collected; it asks
    # for w0 to be published first (and the value is unchanged).
    before = value
    value, added = collect(value, 3, now=103.0, size=10)
    assert value == before
    assert added.flush is not None and added.flush["w"] == "w0" and added.checks == ()
    # w1's check (due) does the same rather than seal a second window.
    assert decide(decode(value), "t1", 103.0, LIMITS) == Decision("flush", sealed=added.flush)
    value, _, flush = seal_due(value, "t1", 103.0, LIMITS)
    assert flush.action == "flush" and value == before
    value, _, _ = remove_sealed(value, "w0", LIMITS)  # w0's batch is on the bus
    value, added = collect(value, 3, now=103.0, size=10)
    assert added.flush is None and dict(added.checks) == {"t1": 103.0, "t3": 108.0}
    state = decode(value)
    assert [[m["id"] for m in s["msgs"]] for s in state["sealed"]] == [["id1", "id2"]]
    assert [m["id"] for m in state["open"]["msgs"]] == ["id3"]


def test_the_value_stays_bounded_while_its_checks_are_behind() -> None:
    # As for 64 KiB events: windows of 16 KiB, 8 KiB of flushed ids.
    limits = Limits(debounce=5.0, max_wait=30.0, max_messages=MAX_WINDOW_MESSAGES,
                    max_bytes=1 << 14, retention=600.0, max_done=MAX_DONE, heal_after=60.0,
                    max_done_bytes=1 << 13)  # fmt: skip
    bound = 2 * limits.max_bytes + limits.max_done_bytes + 1024  # as docs/debounce.md says
    value: bytes | None = None
    flushed = 0
    for n in range(1000):  # 300 KB for one key and no check runs: the collector flushes
        message = record(f"{n:036d}", float(n), {"text": "x" * 100}, f"run-{n:032d}", None)
        while True:
            value, _, added = add(value, message, 100.0 + n, (f"w{n}", f"t{n}"), limits)
            assert len(value) <= bound
            assert len(orjson.dumps(decode(value)["done"])) <= limits.max_done_bytes
            if added.flush is None:
                break
            value, _, _ = remove_sealed(value, added.flush["w"], limits)
            flushed += len(added.flush["msgs"])
    state = decode(value)
    assert len(state["sealed"]) == 1
    assert flushed + len(state["sealed"][0]["msgs"]) + len(state["open"]["msgs"]) == 1000
    assert len(value) > 2 * limits.max_bytes  # the bound is not loose


def test_flushed_ids_are_bounded_by_bytes_too() -> None:
    limits = Limits(debounce=5.0, max_wait=30.0, max_messages=1, max_bytes=10_000,
                    retention=600.0, max_done=1000, heal_after=60.0,
                    max_done_bytes=1000)  # fmt: skip
    value: bytes | None = None
    for n in range(50):
        message = record(f"{n:03d}" + "i" * 97, 1.0, n, "run", None)  # 100-character ids
        value, _, _ = add(value, message, 100.0 + n, (f"w{n}", f"t{n}"), limits)
        value, _, decision = seal_due(value, f"t{n}", 100.0 + n, limits)
        assert decision.sealed is not None
        value, _, _ = remove_sealed(value, decision.sealed["w"], limits)
    value, _, _ = add(value, record("x", 1.0, 0, "run", None), 200.0, ("w", "t"), limits)
    done = decode(value)["done"]
    assert 0 < len(orjson.dumps(done)) <= 1000
    assert [i[:3] for i in done] == [f"{n:03d}" for n in range(50 - len(done), 50)]
