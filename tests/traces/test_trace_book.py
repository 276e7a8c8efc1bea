"""The worker's buffer of trace records (`TraceBook`): one record per attempt, written when it
ends; a start record only for an attempt still running after `START_AFTER`; and a failed
write put back before what was recorded since."""

from __future__ import annotations

import time

from omnidaemon.brokers.base import Delivery
from omnidaemon.brokers.traces import StoredTrace
from omnidaemon.envelope import Envelope
from omnidaemon.traces.records import START_AFTER, TraceBook, attempt_field, decode_record
from omnidaemon.traces.tree import build_trace


def test_records_starts_of_long_attempts_and_puts_back_a_failed_write() -> None:
    root = Envelope.new("doc.uploaded", {"n": 1})
    child = Envelope.new("text.extracted", {}, correlation_id=root.id, causation_id=root.id)
    running: dict[tuple[str, str], tuple[Delivery, float]] = {}
    book = TraceBook("extract", "worker-1", ttl=60, max_records=100, running=running)
    began = time.time() - 1
    book.ended(("s", "1"), root, 1, "succeeded", started=began, published=[("t", child.id)])
    # The child's attempt has run for longer than START_AFTER: its start goes out too.
    running[("s", "2")] = (Delivery("2", child.encode(), 1, "s", "c"), time.time() - START_AFTER)
    first = book.take()
    assert first is not None and book.take() is None and len(book) == 0
    names = [name for _, name, _ in first.encoded()]
    assert names == [attempt_field(root.id, "extract", 1), attempt_field(child.id, "extract", 1)]
    assert list(first.pointers) == [(child.id, root.id)]
    records = [decode_record(data) for _, _, data in first.encoded()]
    assert records[0] is not None and records[0]["outcome"] == "succeeded"
    assert records[0]["started"] == began and records[0]["ended"] >= began + 1
    assert records[1] is not None and records[1]["outcome"] == "running"
    assert records[1]["ended"] is None
    # The write fails; meanwhile the child's attempt ends: its end is stored after its start.
    del running[("s", "2")]
    book.ended(("s", "2"), child, 1, "retrying", error={"type": "RuntimeError", "message": "x"})
    book.restore(first)
    again = book.take()
    assert again is not None
    assert [decode_record(data)["outcome"] for _, _, data in again.encoded()] == [  # type: ignore[index]
        "succeeded",
        "running",
        "retrying",
    ]
    assert again.by_run()[root.id][attempt_field(child.id, "extract", 1)] == again.encoded()[-1][2]


def test_a_start_record_is_written_once_and_a_book_with_no_ttl_is_off() -> None:
    event = Envelope.new("doc.uploaded", {})
    running = {("s", "1"): (Delivery("1", event.encode(), 2, "s", "c"), time.time() - 5)}
    book = TraceBook("a", "w", ttl=60, max_records=10, running=running)
    assert book.start_due() is not None
    first = book.take()
    assert first is not None and len(first.encoded()) == 1
    assert book.take() is None and book.start_due() is None
    assert not TraceBook("a", "w", ttl=0, max_records=10).enabled


def test_an_end_recorded_while_its_delivery_is_still_running_is_never_replaced_by_a_start() -> None:
    # The worker records an end, then awaits (the result, the stream's end) with the delivery
    # still among the running ones: a batch sent meanwhile must not add its start after it.
    event = Envelope.new("doc.uploaded", {})
    began = time.time() - 1
    running = {("s", "1"): (Delivery("1", event.encode(), 1, "s", "c"), began)}
    book = TraceBook("a", "w", ttl=60, max_records=10, running=running)
    first = book.take()
    assert first is not None and decode_record(first.encoded()[0][2])["outcome"] == "running"  # type: ignore[index]
    book.ended(("s", "1"), event, 1, "retrying", started=began)
    again = book.take()
    assert again is not None
    assert [decode_record(data)["outcome"] for _, _, data in again.encoded()] == ["retrying"]  # type: ignore[index]
    assert book.take() is None and book.start_due() is None
    # A later attempt under the same delivery key gets its own start record.
    del running[("s", "1")]
    running[("s", "1")] = (Delivery("1", event.encode(), 2, "s", "c"), time.time() - 1)
    later = book.take()
    assert later is not None and decode_record(later.encoded()[0][2])["attempt"] == 2  # type: ignore[index]


def test_what_the_book_keeps_of_attempts_that_are_over_stays_bounded() -> None:
    # Every ended attempt leaves an entry (a start record must never follow its end); the
    # entries of attempts no longer under way are dropped together once they are many.
    running: dict[tuple[str, str], tuple[Delivery, float]] = {}
    book = TraceBook("a", "w", ttl=60, max_records=10, running=running)
    event = Envelope.new("doc.uploaded", {})
    # Another attempt under way all along (it began "later": its start is never due).
    running[("s", "other")] = (Delivery("other", event.encode(), 1, "s", "c"), time.time() + 3600)
    for i in range(2000):
        book.ended(("s", str(i)), event, 1, "succeeded", started=time.time())
        if i % 50 == 0:
            assert book.take() is not None
    book.take()
    assert len(book._started) <= 300
    # A long attempt under way still gets its start record, once.
    del running[("s", "other")]
    began = time.time() - 1
    running[("s", "long")] = (Delivery("long", event.encode(), 1, "s", "c"), began)
    write = book.take()
    assert write is not None and [decode_record(d)["outcome"] for _, _, d in write.encoded()] == [  # type: ignore[index]
        "running"
    ]
    assert book.take() is None


def test_a_success_replaces_its_start_record_and_keeps_the_events_creation_exactly() -> None:
    # The worker records a success with the event's creation as Unix seconds (computed for
    # its latency metric already); the trace shows the event's own time, to the microsecond.
    root = Envelope.new("doc.uploaded", {"n": 1})
    child = Envelope.new("text.extracted", {}, correlation_id=root.id, causation_id=root.id)
    began = time.time() - 1
    running = {("s", "2"): (Delivery("2", child.encode(), 1, "s", "c"), began)}
    book = TraceBook("extract", "worker-1", ttl=60, max_records=100, running=running)
    start = book.take()
    assert start is not None and decode_record(start.encoded()[0][2])["outcome"] == "running"  # type: ignore[index]
    del running[("s", "2")]  # the worker takes it out, then records the success
    now = time.time()
    book.succeeded(("s", "2"), child, 1, began, now, child.created_at.timestamp(), [], None)
    end = book.take()
    assert end is not None and end.attempts is not None
    assert end.attempts.replacing == {root.id: 1}  # it replaces the start: never dropped
    assert list(end.pointers) == [(child.id, root.id)]
    trace = build_trace(root.id, StoredTrace(end.by_run()[root.id]))
    [event] = trace.events
    assert event.id == child.id and event.created_at == child.created_at
    [attempt] = event.handlings[0].attempts
    assert attempt.outcome == "succeeded" and attempt.duration == round(now - began, 6)
    assert book.take() is None and book.start_due() is None
