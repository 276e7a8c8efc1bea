"""`nats://`, `tls://`: NATS JetStream, behind the same contract as Redis (`pip install
omnidaemon[nats]`). Imported only when a NATS URL is used.

Where everything lives is `_names`; how the contract maps onto JetStream is in
`docs/design.md` ("NATS JetStream").
"""

from __future__ import annotations

from omnidaemon.brokers.nats._core import REPLICAS_ENV
from omnidaemon.brokers.nats._dead_letters import NatsDeadLetters
from omnidaemon.brokers.nats._delivery import NatsDelivery
from omnidaemon.brokers.nats._inspection import NatsInspection
from omnidaemon.brokers.nats._output import NatsOutput
from omnidaemon.brokers.nats._publishing import NatsPublishing
from omnidaemon.brokers.nats._url import parse_nats_url, redact_nats_url
from omnidaemon.brokers.nats._values import NatsValues

__all__ = ["REPLICAS_ENV", "NatsBroker", "parse_nats_url", "redact_nats_url"]


class NatsBroker(
    NatsPublishing, NatsDelivery, NatsValues, NatsDeadLetters, NatsInspection, NatsOutput
):
    """The NATS JetStream broker.

    Args:
        url: `nats://[user:password@|token@]host[:port][,host:port...]`, `tls://...` for TLS;
            options `?creds=FILE` (a `.creds` file), `?nkey=FILE` (an NKey seed file),
            `?tls_ca=FILE` (a CA to trust).
        prefix: The first part of every stream and subject name.
        maxlen: Entries each topic stream keeps (the oldest are dropped beyond it).
        topic_maxlen: Per-topic overrides of `maxlen`.
        publish_timeout: Seconds a publish keeps trying a bus that does not answer before it
            raises `BusUnavailable`.
        replicas: Copies JetStream keeps of each stream (1 on one server, 3 on a cluster:
            a publish returns once a majority stored it). `None` reads
            `OMNIDAEMON_NATS_REPLICAS` (default 1).
        lease: The lease (AckWait) a new agent's consumer starts with, until a worker sets
            the agent's `reclaim_idle`.
    """

    def clone(self) -> NatsBroker:
        return NatsBroker(
            self._raw_url,
            prefix=self._prefix,
            maxlen=self._maxlen,
            topic_maxlen=self._topic_maxlen,
            publish_timeout=self._publish_timeout,
            replicas=self._replicas,
            lease=self._lease,
        )
