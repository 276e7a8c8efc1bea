"""Logging inside a user's own program (`app.running()`, `publish`), run as a subprocess.

The library configures nothing there: its lines go through the standard `logging` module under
`omnidaemon.*` names, to standard error when the program configured no logging, at the level
`OMNIDAEMON_LOG_LEVEL` names (WARNING by default), and never to standard output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow

# Publishes one event for an agent that asks for one retry (a warning) and logs through
# `ctx.log` (info), then prints its own output.
PROGRAM = """
    import logging
    import os
    import sys

    import anyio

    from omnidaemon import App, Context, Retry

    if os.environ.get("CONFIGURE_LOGGING") == "1":
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                fields = getattr(record, "omnidaemon", {})
                records.append([record.name, record.levelname, fields.get("event")])

        logging.basicConfig(level=logging.INFO, handlers=[Keep()])

    app = App("mine", broker=os.environ["BUS"])
    done = anyio.Event()


    @app.agent(os.environ["TOPIC"])
    async def handle(event: dict, ctx: Context) -> None:
        if ctx.attempt == 1:
            raise Retry(delay=0.01, reason="not yet")
        ctx.log.info("handled it")
        done.set()


    async def main() -> None:
        async with app.running():
            await app.publish(os.environ["TOPIC"], {"n": 1})
            with anyio.fail_after(20):
                await done.wait()
        print("program output")
        if os.environ.get("CONFIGURE_LOGGING") == "1":
            print(json_records(records))


    def json_records(records):
        import json

        return json.dumps(records)


    anyio.run(main)
"""


def _run(tmp_path: Path, redis_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(PROGRAM))
    base = {k: v for k, v in os.environ.items() if not k.startswith("OMNIDAEMON_")}
    base.update(BUS=redis_url, TOPIC=f"prog.{tmp_path.name}", **env)
    return subprocess.run(
        [sys.executable, str(script)],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_log_level_error_silences_info_and_warnings(tmp_path: Path, redis_url: str) -> None:
    run = _run(tmp_path, redis_url, OMNIDAEMON_LOG_LEVEL="ERROR")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "program output\n"
    assert run.stderr == ""


def test_our_lines_go_to_standard_error_only(tmp_path: Path, redis_url: str) -> None:
    """By default a program sees our warnings (the retry) on standard error, no info line;
    `OMNIDAEMON_LOG_LEVEL=INFO` adds the info lines, still on standard error."""
    run = _run(tmp_path, redis_url)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "program output\n"
    assert "WARNING omnidaemon.worker: handler failed; will retry" in run.stderr
    assert "INFO" not in run.stderr

    verbose = _run(tmp_path, redis_url, OMNIDAEMON_LOG_LEVEL="INFO")
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout == "program output\n"
    assert "INFO omnidaemon.worker: worker started" in verbose.stderr
    assert "INFO omnidaemon.agent: handled it" in verbose.stderr


def test_a_program_that_configures_logging_receives_our_records(
    tmp_path: Path, redis_url: str
) -> None:
    run = _run(tmp_path, redis_url, CONFIGURE_LOGGING="1")
    assert run.returncode == 0, run.stderr
    output, records = run.stdout.splitlines()
    assert output == "program output"
    records = orjson.loads(records)
    assert ["omnidaemon.worker", "INFO", "worker started"] in records
    assert ["omnidaemon.worker", "WARNING", "handler failed; will retry"] in records
    assert ["omnidaemon.agent", "INFO", "handled it"] in records
    # The program's handler took them: nothing of ours went to standard error as well.
    assert run.stderr == ""
