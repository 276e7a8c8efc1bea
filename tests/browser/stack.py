"""A whole dashboard to drive from a real browser: a redis-server, a worker process running a
small document pipeline, and `omnidaemon api` serving the dashboard; and a headless Chromium.

Shared by the browser tests (`tests/browser/conftest.py`) and the screenshot script
(`scripts/dashboard_screenshots.py`), so the pictures in the docs show what the tests check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from tests.e2e._support import CLI, WorkerProcess, cli_env, read_lines, wait_for, write_module
from tests.servers import running_redis, stop_process

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

__all__ = [
    "ADMIN_TOKEN",
    "AGENTS",
    "CHROMEDRIVER",
    "CHROMIUM",
    "READ_TOKEN",
    "TOPICS",
    "UPLOADED",
    "Stack",
    "browser_missing",
    "open_browser",
    "running_stack",
]

ADMIN_TOKEN = "adm-" + "4f" * 16
READ_TOKEN = "ro-" + "9c" * 16
TOKENS = f"ops:admin:{ADMIN_TOKEN} viewer:read:{READ_TOKEN}"

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

UPLOADED = "document.uploaded"
AGENTS = ("extract_text", "analyze", "notify_user")
"""The pipeline's agents, in the order an event goes through them."""
TOPICS = (UPLOADED, "text.extracted", "analysis.completed")
"""The topic each of `AGENTS` consumes."""

_MODULE = "browser_pipeline"
APP_SOURCE = '''
    """The browser tests' pipeline: extract_text -> analyze -> notify_user.

    A document whose payload names a `poison` fails extraction (dead-lettered at once, with
    its traceback) until the file `healed-<poison>` exists beside this module: then a replay
    of it goes through the whole pipeline.
    """

    from pathlib import Path

    from pydantic import BaseModel

    from omnidaemon import App

    app = App("docs")
    HERE = Path(__file__).parent


    class Uploaded(BaseModel):
        file_path: str
        user_id: str
        poison: str = ""


    class Extracted(BaseModel):
        file_path: str
        user_id: str
        words: int


    class Analysis(BaseModel):
        file_path: str
        user_id: str
        sentiment: str


    @app.agent("document.uploaded", publishes="text.extracted", max_retries=0)
    async def extract_text(event: Uploaded) -> Extracted:
        """Extract a document's text."""
        if event.poison and not (HERE / f"healed-{event.poison}").exists():
            raise ValueError(f"cannot parse {event.file_path}: broken xref table")
        return Extracted(file_path=event.file_path, user_id=event.user_id, words=120)


    @app.agent("text.extracted", publishes="analysis.completed")
    async def analyze(event: Extracted) -> Analysis:
        """Score the text's sentiment."""
        return Analysis(file_path=event.file_path, user_id=event.user_id, sentiment="positive")


    @app.agent("analysis.completed")
    async def notify_user(event: Analysis) -> None:
        """Tell the user their document is done."""
'''


@dataclass
class Stack:
    """The running stack: the dashboard's base `url`, the bus, and the project folder the
    worker and the API run in."""

    url: str
    redis_url: str
    directory: Path
    http: httpx.Client

    def publish(self, payload: dict[str, Any], topic: str = UPLOADED) -> str:
        """Publish through the API (admin token); the event's id."""
        answer = self.http.post("/v1/events", json={"topic": topic, "payload": payload})
        assert answer.status_code == 202, answer.text
        event_id: str = answer.json()["event_id"]
        return event_id

    def publish_document(self, name: str, *, poison: str = "") -> str:
        """Publish an uploaded document (`poison`: it fails until `heal(poison)`)."""
        return self.publish(
            {"file_path": f"reports/{name}.pdf", "user_id": "ada", "poison": poison}
        )

    def heal(self, poison: str) -> None:
        """Make documents poisoned with `poison` go through from now on."""
        (self.directory / f"healed-{poison}").touch()

    def dead_letter_ids(self, topic: str = UPLOADED) -> list[str]:
        """The event ids of `topic`'s dead letters, as the JSON API lists them."""
        answer = self.http.get(f"/v1/dlq/{topic}", params={"limit": 1000})
        assert answer.status_code == 200, answer.text
        return [d["event_id"] for d in answer.json()["dead_letters"]]

    def wait_dead_lettered(self, event_id: str, timeout: float = 15) -> None:
        """Wait until the worker has dead-lettered `event_id`."""
        wait_for(lambda: event_id in self.dead_letter_ids(), timeout, f"{event_id} dead-lettered")


def _listening_url(stderr: Path, process: subprocess.Popen[bytes]) -> str | None:
    """The URL `omnidaemon api` logged it listens on, once it has."""
    assert process.poll() is None, f"omnidaemon api exited:\n{stderr.read_text()[-3000:]}"
    for line in read_lines(stderr):
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if isinstance(record, dict) and record.get("event") == "api listening":
                return str(record["url"])
    return None


@contextlib.contextmanager
def running_stack(directory: Path) -> Iterator[Stack]:
    """A redis-server, a worker running the pipeline and `omnidaemon api` on a free port
    (started side by side), all on 127.0.0.1; stopped when the block ends."""
    write_module(directory, _MODULE, APP_SOURCE)
    with running_redis(directory) as redis:
        env = cli_env(OMNIDAEMON_BROKER_URL=redis.url, OMNIDAEMON_API_TOKENS=TOKENS)
        worker = WorkerProcess([f"{_MODULE}:app"], directory, env)
        api_log = directory / "api.stderr"
        with api_log.open("wb") as stderr:
            api = subprocess.Popen(
                [*CLI, "api", f"{_MODULE}:app", "--port", "0"],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            url = wait_for(lambda: _listening_url(api_log, api), 30, "omnidaemon api to listen")

            def worker_started() -> bool:
                assert worker.proc.poll() is None, f"the worker exited:\n{worker.stderr[-3000:]}"
                return worker.has_logged('"worker started"')

            wait_for(worker_started, 30, "the worker to start")
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
                yield Stack(url=url, redis_url=redis.url, directory=directory, http=http)
        finally:
            stop_process(api, signal.SIGTERM)
            worker.send(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                worker.wait_exit(10)
            worker.kill()


def browser_missing() -> str | None:
    """Why no browser can be driven here (one line), or `None` when Chromium and its
    driver are installed."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} missing: the browser tests need Debian's chromium and "
        "chromium-driver: run scripts/test.sh (it installs them) or "
        "`apt-get install chromium chromium-driver`"
    )


def open_browser(width: int = 1280, height: int = 800) -> WebDriver:
    """A headless Chromium driven by its installed chromedriver (Selenium never looks for
    or downloads a driver: both paths are given and `SE_OFFLINE` is set)."""
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--password-store=basic",
    ):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    return driver
