"""Fault-injection (chaos) suite: see docs/reliability.md."""
