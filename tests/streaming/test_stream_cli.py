"""`omnidaemon publish --wait --stream` against Redis and a worker in the test process: the
chunks print as text (JSON lines with --json), a retry's restart is said on standard error,
and a dead letter exits 1. The command runs in process (`tests/e2e/_in_process.py`) in a
thread, while the worker runs on the test's event loop."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from omnidaemon import App, Context
from omnidaemon.brokers import RedisBroker
from tests.e2e._in_process import Ran, run_in_process
from tests.e2e._support import cli_env

pytestmark = pytest.mark.anyio


async def test_publish_wait_stream_prints_the_chunks(redis_url: str, tmp_path: Path) -> None:
    topic = f"cli{uuid.uuid4().hex[:8]}.asked"
    app = App("clistream", broker=RedisBroker(redis_url))

    @app.agent(topic, max_retries=1, retry_backoff=0.01)  # chunks of any JSON value
    async def chat(question: dict[str, Any], ctx: Context) -> dict[str, int]:
        if question.get("quiet_retry"):  # the retry streams nothing
            if ctx.attempt == 1:
                await ctx.emit("half ")
                raise RuntimeError("first attempt broke")
            return {"tokens": 0}
        for i in range(3):
            await ctx.emit(f"w{i} ")
            if i == 1 and question.get("fail") and ctx.attempt == 1:
                raise RuntimeError("first attempt broke")
        if question.get("give_up"):
            raise RuntimeError("no answer")
        await ctx.emit({"tokens": 3})
        return {"tokens": 3}

    env = cli_env(OMNIDAEMON_BROKER_URL=redis_url)

    async def cli(*args: str) -> Ran:
        return await anyio.to_thread.run_sync(run_in_process, list(args), tmp_path, env)

    async with app, app.running():
        text = await cli("publish", topic, "{}", "--wait", "--stream", "--timeout", "10")
        assert text.returncode == 0, text.stderr
        assert text.stdout == 'w0 w1 w2 {"tokens":3}\n'

        lines = await cli("publish", topic, '{"fail": true}', "--wait", "--stream", "--json")
        assert lines.returncode == 0, lines.stderr
        events = [orjson.loads(line) for line in lines.stdout.splitlines()]
        assert [(e["event"], e.get("attempt"), e.get("data")) for e in events] == [
            ("chunk", 1, "w0 "),
            ("chunk", 1, "w1 "),
            ("restart", 2, None),
            ("chunk", 2, "w0 "),
            ("chunk", 2, "w1 "),
            ("chunk", 2, "w2 "),
            ("chunk", 2, {"tokens": 3}),
            ("end", None, None),
        ]
        assert events[-1] == {"event": "end", "status": "succeeded", "result": {"tokens": 3}}

        restarted = await cli("publish", topic, '{"fail": true}', "--wait", "--stream")
        assert restarted.stdout == 'w0 w1 \nw0 w1 w2 {"tokens":3}\n'
        assert "attempt 2 streams from its start" in restarted.stderr

        quiet = await cli("publish", topic, '{"quiet_retry": true}', "--wait", "--stream")
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stdout == "half \n"
        assert "attempt 2 ended without streaming" in quiet.stderr
        quiet_json = await cli(
            "publish", topic, '{"quiet_retry": true}', "--wait", "--stream", "--json"
        )
        events = [orjson.loads(line) for line in quiet_json.stdout.splitlines()]
        assert [e["event"] for e in events] == ["chunk", "restart", "end"]

        failed = await cli("publish", topic, '{"give_up": true}', "--wait", "--stream")
        assert failed.returncode == 1
        assert "no answer" in failed.stderr

    refused = await cli("publish", topic, "{}", "--stream")
    assert refused.returncode == 2
    assert "add --wait" in refused.stderr
