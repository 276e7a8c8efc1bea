"""`omnidaemon api`: serving and stopping on SIGTERM as a real subprocess; its refusals run in
the test process (`tests/e2e/_in_process.py`, with the folder and environment a subprocess
would get), where only what the command prints and its exit status are checked."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.api._support import ADMIN, PUBLISHER, READER, auth
from tests.e2e._in_process import Ran, run_in_process
from tests.e2e._support import CLI, cli_env, wait_for, write_module
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.slow

SHOP_APP = """
    from pydantic import BaseModel

    from omnidaemon import App

    app = App("shop")


    class Order(BaseModel):
        sku: str
        qty: int


    @app.agent("order.placed", store_results=True)
    async def check(order: Order) -> dict:
        return {"sku": order.sku}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_module(tmp_path, "shop", SHOP_APP)
    return tmp_path


@pytest.fixture
def spawn(project: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts `omnidaemon api ...` processes (stderr to a file); kills any left at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        stderr = (project / f"api-{len(started)}.stderr").open("wb")
        process = subprocess.Popen(
            [*CLI, "api", *args],
            cwd=project,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        stderr.close()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_the_api_command_serves_and_stops_gracefully(
    project: Path, redis_server: RedisServer, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    tokens_file = project / "tokens"
    tokens_file.write_text(f"ops:admin:{ADMIN}\n")
    tokens_file.chmod(0o600)
    port = free_port()
    env = cli_env(OMNIDAEMON_API_TOKENS=f"ci:read,publish:{PUBLISHER} grafana:read:{READER}")
    args = ["shop:app", "--port", str(port), "--broker", redis_server.url]
    process = spawn([*args, "--tokens-file", str(tokens_file)], env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (project / "api-0.stderr").read_text()
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 20, "the API to answer")
    with httpx.Client(base_url=url) as http:
        topic = f"order.t{uuid.uuid4().hex[:8]}"
        published = http.post(
            "/v1/events", json={"topic": topic, "payload": {"n": 1}}, headers=auth(PUBLISHER)
        )
        assert published.status_code == 202, published.text
        assert "server" not in published.headers  # nothing says which server software runs
        wrong_type = http.post(
            "/v1/events",
            json={"topic": "order.placed", "payload": {"sku": "A1", "qty": "x"}},
            headers=auth(PUBLISHER),
        )
        assert wrong_type.status_code == 422  # checked against the app's Order type
        agents = http.get("/v1/agents", headers=auth(READER)).json()
        assert [a["name"] for a in agents["agents"]] == ["check"]
        inspected = http.get(f"/v1/topics/{topic}/entries", headers=auth(ADMIN))
        assert inspected.json()["entries"][0]["id"] == published.json()["event_id"]
        assert http.get("/v1/agents").status_code == 401
        assert http.get("/v1/agents", headers=auth(ADMIN + "x")).status_code == 401
        assert http.delete(f"/v1/topics/{topic}", headers=auth(PUBLISHER)).status_code == 403
        assert http.delete(f"/v1/topics/{topic}", headers=auth(ADMIN)).status_code == 200

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    log = (project / "api-0.stderr").read_text()
    lines = [orjson.loads(line) for line in log.splitlines()]
    events = [line["event"] for line in lines]
    assert "api listening" in events
    assert "api stopped" in events
    assert any(line.get("token") == "ops" and line.get("method") == "DELETE" for line in lines)
    for token in (ADMIN, PUBLISHER, READER, ADMIN + "x"):
        assert token not in log
    assert "Traceback" not in log


def _run(args: list[str], cwd: Path, **env: str) -> Ran:
    return run_in_process(["api", *args], cwd, cli_env(**env))


def _assert_one_line(status: int, stderr: str, expected: int, fragment: str) -> None:
    assert status == expected, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("omnidaemon api: error: "), stderr
    assert fragment in stderr, stderr
    assert ADMIN not in stderr


def test_refusals_of_the_whole_command(project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        # One after the other: the commands share this process's environment and streams.
        public = _run(["shop:app", "--insecure-no-auth", "--host", "0.0.0.0"], project)
        tokenless = _run(["shop:app"], project)
        in_use = _run(
            ["shop:app", "--port", busy], project, OMNIDAEMON_API_TOKENS=f"ops:admin:{ADMIN}"
        )
    _assert_one_line(public.returncode, public.stderr, 2, "only on a loopback --host")
    _assert_one_line(
        tokenless.returncode,
        tokenless.stderr,
        2,
        "no API tokens: set OMNIDAEMON_API_TOKENS or pass --tokens-file",
    )
    _assert_one_line(in_use.returncode, in_use.stderr, 1, f"cannot listen on 127.0.0.1:{busy}")


FIXED_APP = """
    from omnidaemon import App

    app = App("fixed", broker="memory://fixed")
"""


OPS = {"OMNIDAEMON_API_TOKENS": f"ops:admin:{ADMIN}"}


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["shop:app", "--insecure-no-auth", "--host", "10.1.2.3"], {}, "not '10.1.2.3'"),
        (["shop:app"], {"OMNIDAEMON_API_TOKENS": f"ops:root:{ADMIN}"}, "an unknown scope"),
        (["shop:app"], {"OMNIDAEMON_API_TOKENS": "ops:admin:2short"}, "shorter than 16"),
        (["shop:app", "--tokens-file", "nowhere"], {}, "cannot read tokens file nowhere"),
        (["nosuchmodule:app"], OPS, "cannot import 'nosuchmodule'"),
        ([], OPS, "name the app to serve"),
        (["shop:app", "--broker", "kafka://x"], OPS, "unsupported broker URL"),
        (["shop:app"], {**OPS, "OMNIDAEMON_BROKER_URL": "kafka://x"}, "unsupported broker URL"),
        (
            ["fixed:app", "--broker", "redis://u:s3cretpw@127.0.0.1:1/0"],
            OPS,
            "app 'fixed' names its own bus (memory://fixed), not --broker "
            "(redis://u:***@127.0.0.1:1/0)",
        ),
    ],
)
def test_refusals_are_one_line_with_status_2(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    fragment: str,
) -> None:
    from omnidaemon.cli import main

    write_module(project, "fixed", FIXED_APP)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    for name in ("OMNIDAEMON_BROKER_URL", "OMNIDAEMON_APP", "OMNIDAEMON_API_TOKENS"):
        monkeypatch.delenv(name, raising=False)  # restored after: --broker sets the first
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(SystemExit) as done:
            main(["api", *args])
    finally:
        for name in ("shop", "fixed"):  # imported from this test's folder only
            sys.modules.pop(name, None)
    code = done.value.code
    err = capsys.readouterr().err
    _assert_one_line(code if isinstance(code, int) else -1, err, 2, fragment)
    assert "s3cretpw" not in err


@pytest.mark.parametrize("command", ["api", "dashboard"])
def test_without_fastapi_the_command_says_what_to_install(project: Path, command: str) -> None:
    # fastapi and uvicorn made unimportable; every other module (but the extra's: the API and
    # the dashboard) must still import.
    script = """
import importlib, pkgutil, sys
sys.modules["fastapi"] = None
sys.modules["uvicorn"] = None
import omnidaemon
for info in pkgutil.walk_packages(omnidaemon.__path__, prefix="omnidaemon."):
    if not info.name.startswith(("omnidaemon.api", "omnidaemon.dashboard", "omnidaemon.__main__")):
        importlib.import_module(info.name)
from omnidaemon.cli import main
main([sys.argv[1], "shop:app"])
"""
    result = subprocess.run(
        [sys.executable, "-c", script, command],
        cwd=project,
        env=cli_env(OMNIDAEMON_API_TOKENS=f"ops:admin:{ADMIN}"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"omnidaemon {command}: error: the HTTP API needs FastAPI: pip install 'omnidaemon[api]'\n"
    )
