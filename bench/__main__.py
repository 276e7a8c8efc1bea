"""`python -m bench`: run the benchmark, print the table, and (on a full run) write RESULTS.md.

    python -m bench                       # everything, N = 20,000, median of 3 runs
    python -m bench --quick               # N = 5,000, one run of each case
    python -m bench --smoke               # a few seconds: N = 500, one run, no peers (CI)
    python -m bench --cases drain,latency --no-peers -n 50000
    python -m bench --cases cluster --no-peers  # on a local Redis Cluster (writes its section)
    python -m bench --cases nats --no-peers     # on a local nats-server (writes its section)
    python -m bench --cases flow --no-peers     # a rate limit that never binds, Redis and NATS
    python -m bench --cases traces --reps 5     # the drain with and without run traces

Progress goes to stderr, the table to stdout. Exit status: 0 when every case was measured
(whether or not targets were met), 1 when a case failed, 2 when the benchmark cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.cases import cluster, flow, memory, nats, omni, peers, raw, scale, traces
from bench.common import (
    BenchError,
    Children,
    Config,
    LocalCluster,
    NatsServer,
    RedisServer,
    machine_info,
    progress,
    scratch_dir,
)

CASES = ("publish", "drain", "latency", "scale", "fanout", "memory")
# Run only when named in --cases: the drain at each of SWEEP's concurrencies, the Redis
# Cluster rows (publish and drain against redis-py's cluster client, and what min_replicas=1
# costs), which start a cluster of 6 nodes of their own (about 2.5 minutes at N = 20,000
# and 3 runs; 13 s even at --smoke's N = 500, most of it starting the cluster, the workers
# and the raw consumers), and the NATS JetStream rows (omnidaemon's `nats://` broker against
# nats-py on a nats-server of their own: about 3 minutes at N = 20,000 and 3 runs; 16 s at
# --smoke, most of it starting workers and stopping them: a NATS worker's graceful stop waits
# about 2.3 s for its last pull request to expire), and the flow-control rows (the drain
# with a rate limit that never binds against the same drain without, on Redis and on a
# nats-server of their own: 4 worker runs a repetition on each), and the run-trace rows (the
# drain with traces, as workers run by default, against the same drain with
# OMNIDAEMON_TRACE_TTL=0, and the raw drain: 3 consumer runs a repetition, on Redis).
_FLOW_VARIANTS = (
    ("plain", "no limit"),
    ("limited", "rate limit never binding"),
    ("lanes", "priority lanes in use"),
)
EXTRA_CASES = ("concurrency", "cluster", "nats", "flow", "traces")
# The extra cases that write their own section of RESULTS.md.
SECTIONS = ("cluster", "nats", "flow", "traces")
SWEEP = (16, 32, 64, 100, 256)


def parse_args(argv: list[str] | None) -> tuple[Config, bool, frozenset[str]]:
    """The settings; whether RESULTS.md's main part is written; which of its `SECTIONS`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="omnidaemon's benchmark against raw redis-py, FastStream and Taskiq.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="N = 5,000, one run of each case")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds: N = 500, one run, 1 s of latency, no peers, 1 process only",
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, from {','.join(CASES + EXTRA_CASES)} (default: all but "
        f"{','.join(EXTRA_CASES)}: the drain at concurrency {', '.join(map(str, SWEEP))}, "
        "publish and drain on a local Redis Cluster of 3 masters with a replica each, and on a "
        "local nats-server with JetStream, the drain with a rate limit that never binds, and "
        "the drain with and without run traces)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip FastStream and Taskiq")
    parser.add_argument("-n", type=int, help="events per case (default 20,000)")
    parser.add_argument("--reps", type=int, help="runs of each case; the median is shown")
    parser.add_argument("--latency-seconds", type=float, help="length of a latency run")
    parser.add_argument(
        "--no-write", action="store_true", help="do not write bench/RESULTS.md even on a full run"
    )
    args = parser.parse_args(argv)

    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    known = CASES + EXTRA_CASES
    unknown = sorted(set(cases) - set(known))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    cfg = Config(cases=tuple(c for c in known if c in cases), peers=not args.no_peers)
    if args.quick:
        cfg.mode, cfg.n, cfg.reps, cfg.latency_seconds = "quick", 5_000, 1, 3.0
    elif args.smoke:
        cfg.mode, cfg.n, cfg.reps, cfg.peers = "smoke", 500, 1, False
        cfg.latency_seconds, cfg.warmup_seconds = 1.0, 0.2
        cfg.processes, cfg.fanout, cfg.memory_events = (1,), (1,), 500
    if args.n is not None:
        cfg.n = max(100, args.n)
    if args.reps is not None:
        cfg.reps = max(1, args.reps)
    if args.latency_seconds is not None:
        cfg.latency_seconds = max(0.5, args.latency_seconds)
    # A full run writes RESULTS.md: its main part when it ran the default cases, the cluster
    # and NATS sections when it ran those cases; each keeps the other parts as they were.
    write = cfg.mode == "full" and not args.no_write
    main_cases = tuple(c for c in cfg.cases if c not in SECTIONS)
    full = write and main_cases == CASES and cfg.peers
    return cfg, full, frozenset(c for c in SECTIONS if write and c in cfg.cases)


class Bench:
    """One invocation: the server, the children, and the figures collected so far."""

    def __init__(self, cfg: Config, server: RedisServer, children: Children, out: Path) -> None:
        self.cfg = cfg
        self.server = server
        self.children = children
        self.out = out
        self.results: dict[str, list[float]] = defaultdict(list)
        self.notes: list[str] = []
        self.cluster_notes: list[str] = []  # the cluster section's
        self.cluster_elapsed = 0.0
        self.nats_notes: list[str] = []  # the NATS section's
        self.nats_elapsed = 0.0
        self.nats_info: dict[str, str] = {}  # nats-server's and nats-py's versions
        self.flow_notes: list[str] = []  # the flow-control section's
        self.flow_elapsed = 0.0
        self.traces_notes: list[str] = []  # the run-trace section's
        self.traces_elapsed = 0.0
        self.failed = False
        self.peers_python: Path | None = None

    def measure(self, what: str, run: Callable[[], dict[str, float]]) -> bool:
        """Run one repetition of one case; a failure is noted and the benchmark goes on."""
        try:
            figures = run()
        except Exception as exc:  # noted in the report; the other cases still run
            self.failed = True
            reason = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
            progress(f"{what}: FAILED: {reason}")
            notes = self.notes
            if what.startswith("flow"):
                notes = self.flow_notes
            elif what.startswith("traces"):
                notes = self.traces_notes
            elif what.startswith("cluster"):
                notes = self.cluster_notes
            elif what.startswith("nats"):
                notes = self.nats_notes
            notes.append(f"{what} failed: {(reason.splitlines() or ['?'])[0]}")
            return False
        for key, value in figures.items():
            self.results[key].append(value)
        shown = ", ".join(f"{k} {v:,.6g}" for k, v in figures.items())
        progress(f"{what}: {shown}")
        return True

    def reps(self) -> range:
        return range(1, self.cfg.reps + 1)

    def run(self) -> None:
        cfg, s, ch, out = self.cfg, self.server, self.children, self.out
        cases = set(cfg.cases)
        if cfg.peers and cases & {"drain", "latency"}:
            self.peers_python, why = peers.ensure_venv()
            if self.peers_python is None:
                self.notes.append(f"peers skipped: {why}")
                progress(f"peers skipped: {why}")
        peer_names = peers.PEERS if self.peers_python is not None else ()
        if not cfg.peers:
            self.notes.append("FastStream and Taskiq not run (--no-peers or --smoke)")
        if cfg.mode == "smoke":
            self.notes.append("smoke run: too few events for the figures to mean anything")
            self.cluster_notes.append(self.notes[-1])
            self.nats_notes.append(self.notes[-1])
            self.flow_notes.append(self.notes[-1])
            self.traces_notes.append(self.notes[-1])

        if cases - set(SECTIONS):
            raw.warm_server(s, cfg)
        if "publish" in cases:
            for i in self.reps():
                self.measure(f"publish raw #{i}", lambda: raw.publish(s, cfg))
                self.measure(f"publish omnidaemon #{i}", lambda: omni.publish(s, cfg))

        if cases & {"drain", "scale", "fanout", "concurrency"}:
            for i in self.reps():
                self.measure(f"drain raw #{i}", lambda: raw.drain(s, ch, cfg, out))
                if "drain" in cases:
                    self.measure(f"drain omnidaemon #{i}", lambda: self._omni_drain())
                    self.measure(f"drain omnidaemon --concurrency 100 #{i}", self._omni_drain_batch)
                    for peer in peer_names:
                        run = partial(peers.drain, self._python(), ch, s, cfg, out, peer)
                        self.measure(f"drain {peer} #{i}", run)

                if "concurrency" in cases:
                    for c in SWEEP:
                        run = partial(self._omni_drain_at, c)
                        self.measure(f"drain omnidaemon --concurrency {c} #{i}", run)

        if "latency" in cases:
            for i in self.reps():
                self.measure(f"latency raw #{i}", lambda: raw.latency(s, ch, cfg, out))
                self.measure(f"latency omnidaemon #{i}", lambda: omni.latency(s, ch, cfg, out))
                for peer in peer_names:
                    run = partial(peers.latency, self._python(), ch, s, cfg, out, peer)
                    self.measure(f"latency {peer} #{i}", run)

        if "scale" in cases:
            for i in self.reps():
                for count in cfg.processes:
                    if count == 1 and "drain" in cases:
                        continue  # the same measurement as the drain row: reused below
                    run = partial(scale.processes, s, ch, cfg, out, count)
                    self.measure(f"scale {count} process(es) #{i}", run)
            if 1 in cfg.processes and "drain" in cases:
                self.results["scale.p1"] = list(self.results.get("omni.drain", []))

        if "fanout" in cases:
            for i in self.reps():
                for agents in cfg.fanout:
                    if agents == 1 and "drain" in cases:
                        continue  # the same measurement as the drain row: reused below
                    run = partial(scale.fanout, s, ch, cfg, out, agents)
                    self.measure(f"fan-out {agents} agent(s) #{i}", run)
            if 1 in cfg.fanout and "drain" in cases:
                self.results["fanout.k1"] = list(self.results.get("omni.drain", []))
                self.results["fanout.k1_cpu"] = list(self.results.get("omni.drain_cpu", []))

        if "memory" in cases:
            for i in self.reps():
                self.measure(f"memory #{i}", lambda: memory.memory(s, ch, cfg, out))

        if "cluster" in cases:
            self.cluster()

        if "nats" in cases:
            self.nats()

        if "flow" in cases:
            self.flow()

        if "traces" in cases:
            self.traces()

    def cluster(self) -> None:
        """The Redis Cluster rows, on a cluster of their own (stopped when they end)."""
        cfg, ch, out = self.cfg, self.children, self.out
        started = time.monotonic()
        progress("starting a Redis Cluster: 3 masters, a replica each")
        lc = LocalCluster(masters=3, replicas=1)
        try:
            lc.start()
        except BenchError as exc:
            self.failed = True
            progress(f"cluster: FAILED to start: {exc}")
            self.cluster_notes.append(f"the cluster did not start: {str(exc).splitlines()[0]}")
            return
        try:
            topics = cluster.spread_topics(lc)
            progress(f"cluster masters on ports {', '.join(map(str, lc.master_ports))}")
            one, six = [cluster.TOPIC], f"{len(topics)} topics"
            for i in self.reps():
                run = partial(cluster.publish, lc, cfg, topics)
                self.measure(f"cluster publish, all publishers in turn #{i}", run)
                for name, on, label in (("", one, "1 topic"), ("_spread", topics, six)):
                    run = partial(_rate, f"cluster.raw.drain{name}", cluster.raw_drain, lc, ch,
                                  cfg, out, on)  # fmt: skip
                    self.measure(f"cluster drain raw, {label} #{i}", run)
                    run = partial(_rate, f"cluster.omni.drain{name}", cluster.omni_drain, lc, ch,
                                  cfg, out, on)  # fmt: skip
                    self.measure(f"cluster drain omnidaemon, {label} #{i}", run)
                run = partial(_rate, "cluster.mr1.drain", cluster.omni_drain, lc, ch, cfg, out,
                              one, min_replicas=1)  # fmt: skip
                self.measure(f"cluster drain omnidaemon min_replicas=1, 1 topic #{i}", run)
        finally:
            lc.stop()
            self.cluster_elapsed = time.monotonic() - started

    def nats(self) -> None:
        """The NATS JetStream rows, on a nats-server of their own (stopped when they end)."""
        cfg, ch, out = self.cfg, self.children, self.out
        started = time.monotonic()
        try:
            server = NatsServer()
            progress(f"starting nats-server (JetStream) on 127.0.0.1:{server.port}")
            server.start()
        except BenchError as exc:
            self.failed = True
            progress(f"nats: FAILED to start: {exc}")
            self.nats_notes.append(f"nats-server did not start: {str(exc).splitlines()[0]}")
            return
        try:
            self.nats_info = nats.versions(server)
            for i in self.reps():
                run = partial(nats.raw_publish, server, cfg)
                self.measure(f"nats publish raw #{i}", run)
                run = partial(nats.omni_publish, server, cfg)
                self.measure(f"nats publish omnidaemon #{i}", run)
            for i in self.reps():
                run = partial(nats.raw_drain, server, ch, cfg, out)
                self.measure(f"nats drain raw #{i}", run)
                run = partial(nats.omni_drain, server, ch, cfg, out)
                self.measure(f"nats drain omnidaemon #{i}", run)
                run = partial(nats.omni_drain, server, ch, cfg, out, concurrency=100)
                self.measure(f"nats drain omnidaemon --concurrency 100 #{i}", run)
            for i in self.reps():
                run = partial(nats.raw_latency, server, ch, cfg, out)
                self.measure(f"nats latency raw #{i}", run)
                run = partial(nats.omni_latency, server, ch, cfg, out)
                self.measure(f"nats latency omnidaemon #{i}", run)
        finally:
            server.stop()
            self.nats_elapsed = time.monotonic() - started

    def flow(self) -> None:
        """The flow-control rows: the drain with and without a rate limit that never binds,
        in turn, on the benchmark's redis-server, then on a nats-server of their own."""
        cfg, s, ch, out = self.cfg, self.server, self.children, self.out
        started = time.monotonic()
        try:
            raw.warm_server(s, cfg)
            for i in self.reps():
                for variant, label in _FLOW_VARIANTS:
                    run = partial(flow.redis_drain, s, ch, cfg, out, variant=variant)
                    self.measure(f"flow drain omnidaemon, {label} #{i}", run)
            try:
                server = NatsServer()
                progress(f"starting nats-server (JetStream) on 127.0.0.1:{server.port}")
                server.start()
            except BenchError as exc:
                self.failed = True
                progress(f"flow: nats-server FAILED to start: {exc}")
                self.flow_notes.append(f"nats-server did not start: {str(exc).splitlines()[0]}")
                return
            try:
                self.nats_info = nats.versions(server)
                for i in self.reps():
                    for variant, label in _FLOW_VARIANTS:
                        run = partial(flow.nats_drain, server, ch, cfg, out, variant=variant)
                        self.measure(f"flow nats drain omnidaemon, {label} #{i}", run)
            finally:
                server.stop()
        finally:
            self.flow_elapsed = time.monotonic() - started

    def traces(self) -> None:
        """The run-trace rows: the raw drain, then the omnidaemon drain with traces and
        without (in either order, turn about), on the benchmark's redis-server; each
        repetition's cost of traces (`1 - with/without`) when both of its drains ran."""
        cfg, s, ch, out = self.cfg, self.server, self.children, self.out
        started = time.monotonic()
        pinned = traces.pin(s)
        try:
            raw.warm_server(s, cfg)
            for i in self.reps():
                run = partial(traces.raw_drain, s, ch, cfg, out)
                self.measure(f"traces drain raw #{i}", run)
                rates: dict[str, float] = {}
                # Which of the two goes first alternates: neither always follows the raw drain.
                order = list(traces.VARIANTS)[:: 1 if i % 2 else -1]
                for variant in order:
                    key = f"traces.drain{traces.VARIANTS[variant]}"
                    run = partial(traces.omni_drain, s, ch, cfg, out, variant=variant)
                    if self.measure(f"traces drain omnidaemon, {variant} traces #{i}", run):
                        rates[variant] = self.results[key][-1]
                if len(rates) == len(traces.VARIANTS):
                    self.results["traces.cost"].append(1 - rates["with"] / rates["without"])
        finally:
            traces.unpin(pinned)
            self.traces_elapsed = time.monotonic() - started

    def _omni_drain(self) -> dict[str, float]:
        result = omni.drain(self.server, self.children, self.cfg, self.out, n=self.cfg.n)
        return {"omni.drain": result["rate"], "omni.drain_cpu": result["cpu"]}

    def _omni_drain_batch(self) -> dict[str, float]:
        result = omni.drain(
            self.server, self.children, self.cfg, self.out, n=self.cfg.n, concurrency=100
        )
        return {"omni.drain_batch": result["rate"]}

    def _omni_drain_at(self, concurrency: int) -> dict[str, float]:
        cfg = self.cfg
        result = omni.drain(
            self.server, self.children, cfg, self.out, n=cfg.n, concurrency=concurrency
        )
        return {f"concurrency.c{concurrency}": result["rate"]}

    def _python(self) -> Path:
        assert self.peers_python is not None
        return self.peers_python

    def peer_versions(self) -> str:
        if self.peers_python is None:
            return "not run"
        found: dict[str, str] = {}
        for peer in peers.PEERS:
            with contextlib.suppress(BenchError):
                found.update(peers.versions(self.peers_python, self.children, peer, self.out))
        names = {
            "faststream": "FastStream",
            "taskiq": "Taskiq",
            "taskiq-redis": "taskiq-redis",
            "hiredis": "with hiredis",
        }
        return ", ".join(f"{name} {found[key]}" for key, name in names.items() if key in found)


def _rate(key: str, run: Callable[..., float], *args: Any, **kwargs: Any) -> dict[str, float]:
    return {key: run(*args, **kwargs)}


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    cfg, full, sections = parse_args(argv)
    # Ctrl-C and SIGTERM stop the benchmark, its workers and its server, even when it was
    # started where SIGINT is ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()
    try:
        server = RedisServer()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    children = Children()
    try:
        progress(f"starting redis-server on 127.0.0.1:{server.port}")
        server.start()
        with scratch_dir() as out:
            bench = Bench(cfg, server, children, out)
            info = machine_info(server)
            progress(
                f"{cfg.mode} run: N={cfg.n:,}, {cfg.reps} run(s) of {', '.join(cfg.cases)}; "
                f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, "
                f"redis-server {info['redis-server']}"
            )
            bench.run()
            info["peers"] = bench.peer_versions()
            info.update(bench.nats_info)
    except KeyboardInterrupt:
        print("bench: interrupted; the server and workers were stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        children.stop_all()
        server.stop()

    elapsed = time.monotonic() - started
    rendered = report.render(
        bench.results,
        cfg,
        info,
        elapsed,
        bench.notes,
        cluster_notes=bench.cluster_notes,
        cluster_elapsed=bench.cluster_elapsed,
        nats_notes=bench.nats_notes,
        nats_elapsed=bench.nats_elapsed,
        flow_notes=bench.flow_notes,
        flow_elapsed=bench.flow_elapsed,
        traces_notes=bench.traces_notes,
        traces_elapsed=bench.traces_elapsed,
    )
    print(rendered.printed, flush=True)
    if full or sections:
        report.write_results(rendered, main=full, sections=sections)
        done = [("results", full), *((f"{s} section", s in sections) for s in SECTIONS)]
        written = " and ".join(what for what, wrote in done if wrote)
        path = report.RESULTS_MD.relative_to(report.RESULTS_MD.parent.parent)
        progress(f"wrote {path} ({written})")
    else:
        progress("bench/RESULTS.md not written (only a full run writes it)")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
