"""`omnidaemon schedules APP`, `GET /v1/schedules` and `agents`: the schedules with their next
and last fire times, read from a real bus after a worker fired them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import anyio
import httpx
import pytest

from omnidaemon import App
from omnidaemon.schedules_view import schedule_views
from tests.api._support import READER, auth, running_api
from tests.e2e._support import cli_env, run_cli, write_module

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # runs the command line three times

SOURCE = """
    import os

    from omnidaemon import App

    NAME = os.environ["T_APP"]
    app = App(NAME, broker=os.environ["T_URL"])
    app.every(1.0, topic=NAME + ".tick", name="tick", payload={"n": 1}, catch_up=True)


    @app.schedule("0 9 * * MON-FRI", topic=NAME + ".report", timezone="Europe/London")
    def report() -> dict:
        return {"r": 1}


    @app.agent(NAME + ".tick")
    async def count(event: dict) -> None:
        pass
"""


def _load(tmp_path: Path, name: str, url: str) -> App:
    """The app of `SOURCE`, imported from its own file (a fresh module each time)."""
    import importlib.util
    import os

    path = write_module(tmp_path, "insp_app", SOURCE)
    os.environ["T_APP"], os.environ["T_URL"] = name, url
    try:
        spec = importlib.util.spec_from_file_location(f"insp_app_{uuid.uuid4().hex}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del os.environ["T_APP"], os.environ["T_URL"]
    app: App = module.app
    return app


async def test_cli_and_api_show_next_and_last_fire_times(redis_url: str, tmp_path: Path) -> None:
    name = f"insp-{uuid.uuid4().hex[:8]}"
    app = _load(tmp_path, name, redis_url)
    async with app.running():
        with anyio.fail_after(10):
            while (await schedule_views(app, app.broker))[0]["last_fire"] is None:
                await anyio.sleep(0.05)
        tick, report = await schedule_views(app, app.broker)
    assert (tick["name"], tick["spec"], tick["timezone"]) == ("tick", "every 1s", "UTC")
    assert tick["last_outcome"] == "fired" and tick["started"] and tick["catch_up"]
    assert tick["next_fire"] > tick["last_fire"]
    assert report["cron"] == "0 9 * * MON-FRI" and report["started"]
    assert report["last_fire"] is None and "T09:00:00+" in report["next_fire"]  # London time

    with running_api(_load(tmp_path, name, redis_url)) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=auth(READER)) as http:
            answer = await http.get("/v1/schedules")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["app"] == name
    assert [s["name"] for s in body["schedules"]] == ["tick", "report"]
    assert body["schedules"][0]["last_fire"] >= tick["last_fire"]

    env = cli_env(T_APP=name, T_URL=redis_url)
    listed = run_cli(["schedules", "insp_app:app", "--json"], tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["last_outcome"] == "fired"
    table = run_cli(["schedules", "insp_app:app"], tmp_path, env)
    assert "every 1s (catch up)" in table.stdout and "Europe/London" in table.stdout
    agents = run_cli(["agents", "insp_app:app", "--json"], tmp_path, env)
    assert json.loads(agents.stdout)[0]["scheduled_by"] == ["tick"]
