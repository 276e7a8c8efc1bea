"""The worker's buffer of trace records (`TraceBook`): a start replaced by its end before
it is sent, and a failed write put back under what was recorded since."""

from __future__ import annotations

import time

from omnidaemon.envelope import Envelope
from omnidaemon.traces.records import TraceBook, attempt_field, decode_record


def test_an_end_replaces_its_start_and_a_failed_write_goes_with_the_next() -> None:
    root = Envelope.new("doc.uploaded", {"n": 1})
    child = Envelope.new("text.extracted", {}, correlation_id=root.id, causation_id=root.id)
    book = TraceBook("extract", "worker-1", ttl=60, max_records=100)
    book.started(root, 1, time.time() - 1)
    book.ended(root, 1, "succeeded", published=[("text.extracted", child.id)])
    book.started(child, 1, time.time())
    first = book.take()
    assert first is not None and book.take() is None and len(book) == 0
    assert set(first.records[root.id]) == {
        attempt_field(root.id, "extract", 1),
        attempt_field(child.id, "extract", 1),
    }
    assert first.pointers == {child.id: root.id}
    root_record = decode_record(first.records[root.id][attempt_field(root.id, "extract", 1)])
    assert root_record is not None and root_record["outcome"] == "succeeded"
    assert root_record["ended"] - root_record["started"] >= 1  # the start time was kept
    # The write fails; meanwhile the child's attempt ends: the newer end wins, the rest returns.
    book.ended(child, 1, "retrying", error={"type": "RuntimeError", "message": "x"})
    book.restore(first)
    again = book.take()
    assert again is not None and again.pointers == {child.id: root.id}
    records = {name: decode_record(data) for name, data in again.records[root.id].items()}
    assert {name: r["outcome"] for name, r in records.items() if r} == {
        attempt_field(root.id, "extract", 1): "succeeded",
        attempt_field(child.id, "extract", 1): "retrying",
    }


def test_a_book_with_no_ttl_is_off() -> None:
    assert not TraceBook("a", "w", ttl=0, max_records=10).enabled
    assert TraceBook("a", "w", ttl=1, max_records=10).enabled
