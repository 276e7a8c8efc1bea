"""Fuzz the HTTP API with schemathesis: every operation of `/openapi.json`, with an admin token,
against a real redis-server and a real worker, for a few minutes. Any 5xx fails the run.

    python -m tests.fuzz_api                 # 3 minutes
    python -m tests.fuzz_api --seconds 600   # longer

It installs schemathesis into the running environment when it is missing. The API serves an
app with typed agents (so payload checks run) that handle what is published, so results, dead
letters, replays and purges have something to work on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from xml.etree import ElementTree

import anyio
from pydantic import BaseModel

from omnidaemon import App, Context
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.observability.logging import configure_logging
from tests.api._support import ADMIN, running_api
from tests.servers import running_redis


class Order(BaseModel):
    """A typed payload: a publish that contradicts it is refused with 422."""

    sku: str
    quantity: int


def fuzzed_app(url: str) -> App:
    """An app with a typed agent, an untyped one, and one that always fails (dead letters)."""
    app = App("fuzz", broker=RedisBroker(url, prefix="fuzz"))

    @app.agent("order.placed", store_results=True, max_retries=0)
    async def place(order: Order, ctx: Context) -> dict[str, int]:
        return {"total": order.quantity}

    @app.agent("anything.happened", store_results=True, max_retries=0)
    async def anything(event: dict[str, object], ctx: Context) -> dict[str, object]:
        return event

    @app.agent("always.fails", max_retries=0)
    async def fails(event: dict[str, object], ctx: Context) -> None:
        raise RuntimeError("fails on purpose")

    return app


def _ensure_schemathesis() -> None:
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        print("installing schemathesis", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "schemathesis>=4"], check=True
        )


def _seed(app: App) -> None:
    async def publish() -> None:
        async with app:
            for n in range(5):
                await app.publish("order.placed", {"sku": f"A{n}", "quantity": n})
                await app.publish("always.fails", {"n": n})

    anyio.run(publish)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=180, help="time budget of the run")
    parser.add_argument("--seed", type=int, default=None, help="schemathesis' random seed")
    args = parser.parse_args(argv)
    _ensure_schemathesis()
    configure_logging("WARNING", "console")  # the server's request lines would drown the report
    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp)) as redis:
        stop = threading.Event()
        worker = threading.Thread(target=_run_worker, args=(redis.url, stop), daemon=True)
        worker.start()
        _seed(fuzzed_app(redis.url))
        try:
            report = Path(tmp) / "junit.xml"
            with running_api(fuzzed_app(redis.url)) as api:
                command = [
                    str(Path(sys.executable).with_name("st")),
                    "run",
                    f"{api.url}/openapi.json",
                    "--header",
                    f"Authorization: Bearer {ADMIN}",
                    "--checks",
                    "status_code_conformance",
                    "--max-time",
                    str(args.seconds),
                    "--workers",
                    "2",
                    # Waits are at most 2 s (tests.fuzz_hooks); a slow answer is a finding.
                    "--request-timeout",
                    "40",
                    "--report",
                    "junit",
                    "--report-junit-path",
                    str(report),
                    "--no-color",
                ]
                if args.seed is not None:
                    command += ["--seed", str(args.seed)]
                env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks"}
                subprocess.run(command, env=env, check=False)
                return _verdict(report)
        finally:
            stop.set()
            worker.join(timeout=30)


def _verdict(report: Path) -> int:
    """0 when schemathesis found no failure; errors of its own (an exception inside
    Hypothesis, say) are printed but do not fail the run, a timed-out request does."""
    if not report.exists():
        print("fuzz: schemathesis wrote no report", file=sys.stderr)
        return 1
    failures = errors = 0
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        failures += len(case.findall("failure"))
        for error in case.findall("error"):
            text = f"{error.get('message', '')} {error.text or ''}"
            if "timed out" in text.lower():
                failures += 1  # the server hung: a finding
            else:
                errors += 1
    print(f"fuzz: {failures} failures, {errors} errors of the tool", file=sys.stderr)
    return 1 if failures else 0


def _run_worker(url: str, stop: threading.Event) -> None:
    async def run() -> None:
        app = fuzzed_app(url)
        async with app.running():
            await anyio.to_thread.run_sync(stop.wait)

    anyio.run(run)


if __name__ == "__main__":
    raise SystemExit(main())
