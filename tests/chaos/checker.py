"""Reads a chaos run's histories after the fact and says what happened to every event.

Inputs: the workers' attempt logs (`tests/chaos/app.py`), what the publisher was told
(`published.jsonl`: one line per event the bus acknowledged, one per publish that raised),
what the injector wrote straight into the stream (`garbage.jsonl`), and the dead-letter queues
read from the bus. Nothing here trusts the workers' own accounts of what they acknowledged:
an event counts as processed only if a handler logged `done` for it.

An acknowledged event neither processed nor dead-lettered is lost. It is counted apart when the
bus itself no longer holds it (its entry is not in the topic's stream at the end: a failover
to a replica that never received it, which asynchronous replication allows), so that what the
bus dropped and what omnidaemon dropped are never confused; neither is hidden.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.app import AGENTS, MAX_RETRIES


@dataclass
class AgentReport:
    """What happened to the run's events in one agent (one consumer group)."""

    agent: str
    processed: int = 0
    ordinary_dead_lettered: Counter[str] = field(default_factory=Counter)  # by reason
    lost: list[int] = field(default_factory=list)
    lost_by_bus: list[int] = field(default_factory=list)  # not in the stream at the end
    duplicated: int = 0
    duplicate_causes: Counter[str] = field(default_factory=Counter)
    poison_dead_lettered: int = 0
    poison_total: int = 0
    poison_wrong: list[str] = field(default_factory=list)
    poison_outcomes: Counter[str] = field(default_factory=Counter)  # "<error type> after <n>"
    garbage_dead_lettered: int = 0
    garbage_total: int = 0
    garbage_reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class RunReport:
    """The whole run: one `AgentReport` per agent, the publisher's view and the faults."""

    published: int
    publish_failed: int
    publish_failed_but_arrived: int
    agents: list[AgentReport]
    faults: Counter[str]
    recoveries: list[tuple[str, float | None]]
    publish_errors: Counter[str] = field(default_factory=Counter)  # by type, unexpected ones
    bus_loss_allowed: bool = False
    """Whether events the bus itself dropped may be > 0 (a cluster without min_replicas)."""
    timings: dict[str, list[float]] = field(default_factory=dict)  # cluster operations
    worker_log: Counter[str] = field(default_factory=Counter)  # warnings and errors

    @property
    def lost(self) -> int:
        return sum(len(a.lost) for a in self.agents)

    @property
    def lost_by_bus(self) -> int:
        return sum(len(a.lost_by_bus) for a in self.agents)

    @property
    def ok(self) -> bool:
        """Nothing lost (but what the bus dropped, where allowed), every poison and garbage
        entry dead-lettered, and every failed publish a `BusUnavailable`."""
        return (
            self.lost == 0
            and (self.lost_by_bus == 0 or self.bus_loss_allowed)
            and self.poison_ok
            and self.garbage_ok
            and not self.publish_errors
        )

    @property
    def poison_ok(self) -> bool:
        return all(
            a.poison_dead_lettered == a.poison_total and not a.poison_wrong for a in self.agents
        )

    @property
    def garbage_ok(self) -> bool:
        return all(a.garbage_dead_lettered == a.garbage_total for a in self.agents)

    def table(self) -> str:
        """The report as a markdown table, one column per agent."""
        each = len(self.agents)
        rows: list[tuple[str, list[str]]] = [
            ("events published (acknowledged by the bus)", [str(self.published)] * each),
            ("publishes that raised (not acknowledged)", [str(self.publish_failed)] * each),
            ("... raising something else than BusUnavailable",
             [_counts(self.publish_errors)] * each),
            ("... of which reached the bus anyway", [str(self.publish_failed_but_arrived)] * each),
            ("processed successfully (distinct events)", [str(a.processed) for a in self.agents]),
            ("**lost** (acknowledged, still on the bus, neither processed nor dead-lettered)",
             [f"**{len(a.lost)}**" for a in self.agents]),
            ("**lost with the bus's data** (acknowledged, then gone from the stream: a "
             "failover" + (", allowed without min_replicas)" if self.bus_loss_allowed else ")"),
             [f"**{len(a.lost_by_bus)}**" for a in self.agents]),
            ("ordinary events dead-lettered (reason)",
             [_counts(a.ordinary_dead_lettered) for a in self.agents]),
            ("processed more than once", [_dups(a) for a in self.agents]),
            ("poison events dead-lettered / sent",
             [f"{a.poison_dead_lettered} / {a.poison_total}" for a in self.agents]),
            ("poison dead letters: reason after attempts", [_poison(a) for a in self.agents]),
            ("garbage entries dead-lettered / written",
             [f"{a.garbage_dead_lettered} / {a.garbage_total}" for a in self.agents]),
            ("dead-letter reasons for garbage", [_reasons(a) for a in self.agents]),
        ]  # fmt: skip
        head = "| | " + " | ".join(f"agent `{a.agent}`" for a in self.agents) + " |"
        lines = [head, "|---|" + "--:|" * len(self.agents)]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) or "none"
        lines.append("")
        lines.append(f"faults survived: {faults}")
        if self.recoveries:
            lines += ["", recovery_table(self.recoveries)]
        if self.timings:
            lines += ["", timing_table(self.timings)]
        if self.worker_log:
            lines += ["", "workers' warnings and errors (log lines):"]
            lines += [f"- {n} x {what}" for what, n in self.worker_log.most_common()]
        return "\n".join(lines)


def timing_table(timings: dict[str, list[float]]) -> str:
    """Per operation on the bus (a failover, a node rejoining, a slot migration): how often,
    and its median and longest duration."""
    lines = ["| bus operation | times | median | longest |", "|---|--:|--:|--:|"]
    for what, times in sorted(timings.items()):
        median = f"{statistics.median(times):.1f} s" if times else "—"
        longest = f"{max(times):.1f} s" if times else "—"
        lines.append(f"| {what} | {len(times)} | {median} | {longest} |")
    return "\n".join(lines)


def recovery_table(recoveries: list[tuple[str, float | None]]) -> str:
    """Per kind of fault: how often, and the median and longest time until the backlog was
    back to normal (faults after which it never was, within the run, are counted apart)."""
    by_kind: dict[str, list[float | None]] = defaultdict(list)
    for kind, seconds in recoveries:
        by_kind[kind].append(seconds)
    lines = [
        "| fault | times | backlog back to normal: median | longest | not within the run |",
        "|---|--:|--:|--:|--:|",
    ]
    for kind, times in sorted(by_kind.items()):
        known = sorted(t for t in times if t is not None)
        median = f"{statistics.median(known):.1f} s" if known else "—"
        longest = f"{known[-1]:.1f} s" if known else "—"
        missed = len(times) - len(known)
        lines.append(f"| {kind} | {len(times)} | {median} | {longest} | {missed} |")
    return "\n".join(lines)


def _dups(report: AgentReport) -> str:
    if not report.duplicated:
        return "0"
    causes = ", ".join(f"{n} {c}" for c, n in report.duplicate_causes.most_common())
    return f"{report.duplicated} ({causes})"


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items())) or "0"


def _poison(report: AgentReport) -> str:
    outcomes = sorted(report.poison_outcomes.items())
    return ", ".join(f"{outcome} ({n})" for outcome, n in outcomes) or "—"


def _reasons(report: AgentReport) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(report.garbage_reasons.items())) or "—"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every whole JSON line of `path` (a line cut short by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def check(
    folder: Path,
    dead_letters: dict[str, list[dict[str, Any]]],
    stream_seqs: Counter[int],
    faults: Counter[str],
    recoveries: list[tuple[str, float | None]],
) -> RunReport:
    """Build the run's report.

    Args:
        folder: the run's folder (`log/*.jsonl`, `published.jsonl`, `garbage.jsonl`).
        dead_letters: per agent, its dead-letter records as dicts (`DeadLetter` fields).
        stream_seqs: how many copies of each event (by `seq`) the topic's stream holds at
            the end (tells apart failed publishes that reached the bus anyway, acknowledged
            events the bus dropped, and events stored twice from those handled twice).
        faults: how many faults of each kind were injected.
        recoveries: per fault, seconds until the backlog was back to normal.
    """
    published = read_jsonl(folder / "published.jsonl")
    acked = {p["seq"]: p for p in published if p["ok"]}
    failed = {p["seq"] for p in published if not p["ok"]} - set(acked)
    unexpected = Counter(p["error_type"] for p in published if not p["ok"] and p.get("unexpected"))
    garbage = read_jsonl(folder / "garbage.jsonl")
    attempts: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted((folder / "log").glob("*.jsonl")):
        for line in read_jsonl(path):
            attempts[(line["agent"], line["seq"])].append(line)

    reports = []
    for agent in AGENTS:
        report = AgentReport(agent)
        letters = dead_letters.get(agent, [])
        dead_ids = {d["event_id"] for d in letters if d.get("event_id")}
        for seq, event in sorted(acked.items()):
            done = [a for a in attempts[(agent, seq)] if a["phase"] == "done"]
            if not done and event["id"] not in dead_ids and seq not in stream_seqs:
                report.lost_by_bus.append(seq)  # the bus no longer holds it: see the module
                continue
            if event["kind"] == "ok":
                if done:
                    report.processed += 1
                    if len(done) > 1:
                        report.duplicated += 1
                        report.duplicate_causes[_cause(done, stream_seqs[seq])] += 1
                elif event["id"] in dead_ids:
                    # A healthy event whose every attempt died with its worker (killed by the
                    # injector or by a poison event it shared the worker with): parked, not lost.
                    record = next(d for d in letters if d.get("event_id") == event["id"])
                    report.ordinary_dead_lettered[record["error_type"]] += 1
                else:
                    report.lost.append(seq)
            else:
                report.poison_total += 1
                record = next((d for d in letters if d.get("event_id") == event["id"]), None)
                if record is None:
                    report.lost.append(seq)
                    continue
                report.poison_dead_lettered += 1
                report.poison_outcomes[f"{record['error_type']} after {record['attempts']}"] += 1
                # A delivery whose outcome a fault lost (its worker killed, its retry or dead
                # letter not written) is counted as an attempt too, so the count may pass
                # MAX_RETRIES + 1. What must hold: never dead-lettered early, never handled to
                # the end, and the handler never run past its last attempt.
                ran_late = [
                    a["attempt"]
                    for a in attempts[(agent, seq)]
                    if a["phase"] == "begin" and a["attempt"] > MAX_RETRIES + 1
                ]
                if record["attempts"] < MAX_RETRIES + 1 or done or ran_late:
                    report.poison_wrong.append(
                        f"{seq}: {record['error_type']} after {record['attempts']} attempts"
                        + (f"; the handler ran at attempt {ran_late}" if ran_late else "")
                    )
        report.garbage_total = len(garbage)
        for item in garbage:
            record = next((d for d in letters if item["marker"] in d.get("entry", "")), None)
            if record is not None:
                report.garbage_dead_lettered += 1
                report.garbage_reasons[record["error_type"]] += 1
        reports.append(report)
    return RunReport(
        published=len(acked),
        publish_failed=len(failed),
        publish_failed_but_arrived=len(failed & set(stream_seqs)),
        agents=reports,
        faults=faults,
        recoveries=recoveries,
        publish_errors=unexpected,
    )


def _cause(done: list[dict[str, Any]], copies: int) -> str:
    # Every delivery of one stream entry counts an attempt, so two successes at attempt 1 are
    # two entries (a publish retried across a bus fault after its first try had landed), or one
    # entry the bus handed out afresh: it forgot its deliveries and acknowledgements (JetStream
    # on one server keeps a consumer's state a moment after it changes, and a SIGKILL loses
    # that moment). Otherwise the entry was delivered again because its first success's ack
    # never reached the bus (the worker was killed, or the bus restarted or was cut off, first).
    if sum(1 for d in done if d["attempt"] == 1) > 1:
        if copies > 1:
            return "published twice (publish retried across a bus fault)"
        return "delivered afresh (the bus lost its record of the delivery in a crash)"
    return "redelivered (ack lost to a kill or bus fault)"
