"""`redis://`, `rediss://`, `unix://`: the production bus, on Redis Streams (Redis >= 6.2, Valkey).

Layout per topic (every key carries the topic as a hash tag, so one topic lives in one Redis
Cluster slot), with `omni` as the default prefix:

- `omni:{<topic>}:stream`: the topic's entries, one field `e` holding the envelope; every
  agent is a consumer group on it.
- `omni:{<topic>}:due:<group>`: a sorted set of the group's scheduled retries by due time.
- `omni:{<topic>}:retry:<group>`: the group's retry stream: due retries are moved here (one
  atomic script) and read by the same group, with the attempt in field `a`.
- `omni:{<topic>}:dlq:<group>`: the group's dead-letter stream, one field `r` per record.
- `omni:{<topic>}:delayed`: a sorted set of entries published with a delay, by due time on the
  server's clock.
- `omni:{<topic>}:metrics:<group>`: a hash of the group's metrics, incremented by every worker
  with its batched acks (see `omnidaemon.metrics`).
- `omni:{<topic>}:once:<key>`: `publish_once`'s mark of a key (the token of the call that
  appended), expiring with its window.

Outside topics: `omni:result:<event id>` (stored results, a hash by agent),
`omni:value:<key>` (idempotency claims, worker heartbeats `worker:<name>`) and
`omni:output:<key>` (output logs: a stream each, one field `d` per entry, expiring `ttl` after
its last append).

Trimming: each publish trims the topic stream to about `maxlen` entries (`XADD MAXLEN ~`). An
entry no group has read yet is trimmed only once at least `maxlen` newer entries were published
after it; size `maxlen` above the backlog your slowest agent may build up.
"""

from __future__ import annotations

from omnidaemon.brokers.redis._connection import MAX_CONNECTIONS, redact_url
from omnidaemon.brokers.redis._delivery import RedisDelivery
from omnidaemon.brokers.redis._inspection import RedisInspection
from omnidaemon.brokers.redis._output import RedisOutput
from omnidaemon.brokers.redis._publishing import RedisPublishing

__all__ = ["MAX_CONNECTIONS", "RedisBroker", "redact_url"]


class RedisBroker(RedisOutput, RedisPublishing, RedisDelivery, RedisInspection):
    """The Redis Streams broker.

    Args:
        url: `redis://[[user]:password@]host[:port][/db]`, `rediss://...` for TLS, or
            `unix:///path/to/socket[?db=N]`.
        prefix: The first part of every key.
        maxlen: Entries each topic stream keeps (approximately; see the module docs).
        topic_maxlen: Per-topic overrides of `maxlen`.
        publish_timeout: Seconds a publish keeps trying an unreachable bus before it raises
            `BusUnavailable`.
        max_connections: The most connections the broker opens to the server (its pool):
            one per consumer of each agent while it reads, plus those commands use while
            they run. A command that finds them all in use fails at once with
            `MaxConnectionsError`, a `ConnectionError`. The URL's `?max_connections=N` wins
            over this argument.
        min_replicas: Replicas that must confirm a write before a publish or a settle
            returns (`WAIT`); a publish not confirmed within `publish_timeout` raises
            `NotReplicated`. `None` reads `OMNIDAEMON_REDIS_MIN_REPLICAS` (default 0: the
            server's answer is enough, and a failover can lose the last writes).

    A URL may list several nodes of a Redis Cluster (`redis://h1:7000,h2:7000`); a URL of one
    node is asked at connection whether it is a cluster. On a cluster, each command goes to the
    master of its keys' slot, following `MOVED` and `ASK`.
    """

    # Its parts, one job each: `_connection` (URLs, settings, the client and its pool),
    # `_cluster` (seed lists, telling a cluster, its nodes), `_routing` (the broker's own
    # connections, which server each command goes to, replica confirmation, scripts, missing
    # groups: the one place that knows where a key lives), `_keys` (the key layout),
    # `_publishing`, `_delivery` (fetching and settling), `_inspection` and `_output`
    # (output logs).

    def clone(self) -> RedisBroker:
        return RedisBroker(
            self._raw_url,
            prefix=self._prefix,
            maxlen=self._maxlen,
            topic_maxlen=self._topic_maxlen,
            publish_timeout=self._publish_timeout,
            max_connections=self._max_connections,
            min_replicas=self._min_replicas,
        )
