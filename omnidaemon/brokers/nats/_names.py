"""Where the NATS broker keeps what: stream, consumer and subject names (one place, so that
every part agrees).

Topics, agents, consumers and keys become single subject tokens and stream/consumer names by
`encode`: letters, digits, `_` and `-` stay, every other byte is `=` and two hex digits (NATS
names may not hold `.`, `*`, `>`, spaces or path separators; subjects split on `.`).

Per topic (`t` the encoded topic, `g` an encoded agent, `p` the prefix, `omni` by default):

- stream `p_t_<t>`: subjects `p.t.<t>` (the topic's entries, read by every agent),
  `p.g.<t>.<g>` (entries for one agent alone: replayed dead letters, deferred retries) and
  `p.d.<t>.<id>` (delayed publishes: message schedules whose target is `p.t.<t>`);
- a durable pull consumer `<g>` per agent on it, filtered to `p.t.<t>` and `p.g.<t>.<g>`;
- stream `p_x_<t>`: dead letters, subject `p.x.<t>.<g>` per agent.

Outside topics: stream `p_kv` (one message per subject, per-message TTLs) holds values
(`p.kv.v.<key>`), results (`p.kv.r.<event>.<agent>`), metric extremes (`p.kv.e.<t>.<g>.<field>`),
redelivery marks (`p.kv.h.<t>.<g>.<seq>`), deliveries never run (`p.kv.f.<t>.<g>.<seq>`) and the
consumer registry (`p.kv.c.<t>.<g>.<consumer>`);
stream `p_m` (a counter stream) holds metric sums (`p.m.<t>.<g>.<field>`).
stream `p_out` holds every output log (`p.out.<key>`, the key encoded), each entry with its own
TTL.
stream `p_trace` (one message per subject, per-message TTLs) holds the trace store (`_traces`):
records (`p.trace.rec.<run>.<field>`), refused-record counts (`p.trace.drop.<run>.<writer>`),
pointers (`p.trace.of.<event>`) and the index of runs (`p.trace.run.<run>`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["Names", "decode", "encode", "key_subject_tokens"]

_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"=([0-9a-f]{2})")


@functools.lru_cache(maxsize=8192)
def encode(text: str) -> str:
    """`text` as one subject token and a valid stream or consumer name (reversible)."""
    if not text:
        return "="  # a lone "=" never comes out of a non-empty text
    out = []
    for byte in text.encode():
        char = bytes((byte,))
        out.append(char.decode() if _SAFE.fullmatch(char) else f"={byte:02x}")
    return "".join(out)


def decode(token: str) -> str:
    """The text `encode` made `token` from."""
    if token == "=":
        return ""
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += token[i].encode()
            i += 1
    return raw.decode(errors="replace")


def key_subject_tokens(key: str) -> str:
    """A value's key as subject tokens: split on `:` (so `worker:` keys share a subject
    prefix a wildcard can scan), each part encoded."""
    return ".".join(encode(part) for part in key.split(":"))


def key_from_tokens(tokens: str) -> str:
    """The key `key_subject_tokens` made `tokens` from."""
    return ":".join(decode(part) for part in tokens.split("."))


@dataclass(frozen=True, slots=True)
class Names:
    """The names of everything the broker keeps, for one prefix."""

    prefix: str = "omni"

    # Topics ------------------------------------------------------------------------------

    def stream(self, topic: str) -> str:
        return f"{self.prefix}_t_{encode(topic)}"

    def topic_of_stream(self, stream: str) -> str | None:
        """The topic a stream holds, or `None` for a stream that is no topic's."""
        head = f"{self.prefix}_t_"
        return decode(stream[len(head) :]) if stream.startswith(head) else None

    def entries(self, topic: str) -> str:
        return f"{self.prefix}.t.{encode(topic)}"

    def group_entries(self, topic: str, group: str) -> str:
        return f"{self.prefix}.g.{encode(topic)}.{encode(group)}"

    def all_group_entries(self, topic: str) -> str:
        return f"{self.prefix}.g.{encode(topic)}.*"

    def delayed(self, topic: str, token: str) -> str:
        return f"{self.prefix}.d.{encode(topic)}.{token}"

    def all_delayed(self, topic: str) -> str:
        return f"{self.prefix}.d.{encode(topic)}.*"

    def consumer(self, group: str) -> str:
        return encode(group)

    # Dead letters ------------------------------------------------------------------------

    def dlq_stream(self, topic: str) -> str:
        return f"{self.prefix}_x_{encode(topic)}"

    def dlq(self, topic: str, group: str) -> str:
        return f"{self.prefix}.x.{encode(topic)}.{encode(group)}"

    def all_dlq(self, topic: str) -> str:
        return f"{self.prefix}.x.{encode(topic)}.*"

    # Values, results, marks, the consumer registry ---------------------------------------

    @property
    def kv_stream(self) -> str:
        return f"{self.prefix}_kv"

    @property
    def kv_all(self) -> str:
        return f"{self.prefix}.kv.>"

    def value(self, key: str) -> str:
        return f"{self.prefix}.kv.v.{key_subject_tokens(key)}"

    @property
    def value_root(self) -> str:
        return f"{self.prefix}.kv.v."

    def result(self, event_id: str, agent: str) -> str:
        return f"{self.prefix}.kv.r.{encode(event_id)}.{encode(agent)}"

    def results(self, event_id: str) -> str:
        return f"{self.prefix}.kv.r.{encode(event_id)}.*"

    def mark(self, topic: str, group: str, seq: int) -> str:
        return f"{self.prefix}.kv.h.{encode(topic)}.{encode(group)}.{seq}"

    def free(self, topic: str, group: str, seq: int) -> str:
        return f"{self.prefix}.kv.f.{encode(topic)}.{encode(group)}.{seq}"

    def registry(self, topic: str, group: str, consumer: str) -> str:
        return f"{self.prefix}.kv.c.{encode(topic)}.{encode(group)}.{encode(consumer)}"

    def registry_of(self, topic: str, group: str) -> str:
        return f"{self.prefix}.kv.c.{encode(topic)}.{encode(group)}.*"

    def topic_kv(self, kind: str, topic: str) -> str:
        """Every value-stream subject of one kind (`h` marks, `f` never-run counts, `c` the
        registry, `e` extremes) that belongs to one topic. Not a `*` for the kind: that would
        also match values and results whose key starts with the topic's name."""
        return f"{self.prefix}.kv.{kind}.{encode(topic)}.>"

    # Metrics -----------------------------------------------------------------------------

    @property
    def metrics_stream(self) -> str:
        return f"{self.prefix}_m"

    def metric(self, topic: str, group: str, field: str) -> str:
        return f"{self.prefix}.m.{encode(topic)}.{encode(group)}.{encode(field)}"

    def extreme(self, topic: str, group: str, field: str) -> str:
        return f"{self.prefix}.kv.e.{encode(topic)}.{encode(group)}.{encode(field)}"

    @property
    def metrics_all(self) -> str:
        return f"{self.prefix}.m.>"

    @property
    def extremes_all(self) -> str:
        return f"{self.prefix}.kv.e.>"

    def metrics_of_topic(self, topic: str) -> str:
        return f"{self.prefix}.m.{encode(topic)}.>"

    # Output logs -------------------------------------------------------------------------

    @property
    def output_stream(self) -> str:
        return f"{self.prefix}_out"

    @property
    def outputs_all(self) -> str:
        return f"{self.prefix}.out.*"

    def output(self, key: str) -> str:
        return f"{self.prefix}.out.{encode(key)}"

    # Traces ------------------------------------------------------------------------------

    @property
    def trace_stream(self) -> str:
        return f"{self.prefix}_trace"

    @property
    def traces_all(self) -> str:
        return f"{self.prefix}.trace.>"

    def trace_record(self, run_id: str, field: str) -> str:
        return f"{self.prefix}.trace.rec.{encode(run_id)}.{encode(field)}"

    def trace_dropped(self, run_id: str, writer: str) -> str:
        return f"{self.prefix}.trace.drop.{encode(run_id)}.{encode(writer)}"

    def trace_of_run(self, run_id: str) -> str:
        """A run's records and refused-record counts (no other kind has a token after the
        run's)."""
        return f"{self.prefix}.trace.*.{encode(run_id)}.*"

    def trace_pointer(self, event_id: str) -> str:
        return f"{self.prefix}.trace.of.{encode(event_id)}"

    def trace_index(self, run_id: str) -> str:
        return f"{self.prefix}.trace.run.{encode(run_id)}"

    @property
    def trace_index_all(self) -> str:
        return f"{self.prefix}.trace.run.*"
