"""Flow control for agents that call models: fleet-wide rate limits, token budgets and
per-key concurrency, enforced with state on the bus (see `docs/flow-control.md`)."""

from omnidaemon.flow.limits import Budget, FlowSpec, RateLimit

__all__ = ["Budget", "FlowSpec", "RateLimit"]
