"""Naming the app on the command line: near misses get a suggestion, and a file path works
wherever a `module:attribute` does (every command that takes APP). The commands run in the
test process (`tests/e2e/_in_process.py`), but for a worker that must start from a file."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.e2e._in_process import run_in_process
from tests.e2e._support import WorkerProcess, cli_env, wait_for, write_module
from tests.e2e.test_cli_loader import assert_one_line_error

RESEARCH_APP = """
    from omnidaemon import App

    from helpers import TOPIC  # a sibling module: the file's folder must be importable

    app = App("research")

    @app.agent(TOPIC)
    async def summarise(event: dict) -> None:
        pass
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_module(tmp_path, "researchapp", RESEARCH_APP)
    write_module(tmp_path, "helpers", 'TOPIC = "paper.added"\n')
    write_module(tmp_path / "agents", "main", RESEARCH_APP)
    write_module(tmp_path / "agents", "helpers", 'TOPIC = "paper.added"\n')
    write_module(
        tmp_path,
        "twoapps",
        """
        from omnidaemon import App

        first = App("first")
        second = App("second")
        """,
    )
    return tmp_path


@pytest.mark.parametrize(
    "command",
    [["worker"], ["agents"], ["graph"], ["api", "--port", "0", "--insecure-no-auth"]],
    ids=lambda c: c[0],
)
def test_a_misspelt_attribute_suggests_the_app(project: Path, command: list[str]) -> None:
    result = run_in_process([*command, "researchapp:ap"], cwd=project)

    assert_one_line_error(
        result, "no attribute 'ap'", "did you mean 'researchapp:app'?", f"omnidaemon {command[0]}"
    )


def test_a_misspelt_module_suggests_the_module_in_the_folder(project: Path) -> None:
    result = run_in_process(["worker", "reserchapp:app"], cwd=project)

    assert_one_line_error(result, "no module named 'reserchapp'", "did you mean 'researchapp'?")


@pytest.mark.parametrize(
    "target", ["./researchapp.py", "researchapp.py:app", "agents/main.py", "agents/main.py:app"]
)
def test_a_file_path_names_the_app(project: Path, target: str) -> None:
    result = run_in_process(["agents", target, "--json"], cwd=project)

    assert result.returncode == 0, result.stderr
    assert '"summarise"' in result.stdout and '"paper.added"' in result.stdout


@pytest.mark.slow
def test_worker_runs_the_app_of_a_file(project: Path) -> None:
    worker = WorkerProcess(["./agents/main.py"], project, cli_env())
    try:
        wait_for(lambda: worker.has_logged('"worker started"'), 20, "the worker to start")
        worker.send(signal.SIGTERM)
        status, _ = worker.wait_exit(10)
    finally:
        worker.kill()

    assert status == 0, worker.stderr
    started = [e for e in worker.logs() if e["event"] == "worker started"]
    assert started[0]["app"] == "research" and started[0]["agents"] == ["summarise"]


@pytest.mark.parametrize(
    ("target", "fragments"),
    [
        ("./twoapps.py", ["file './twoapps.py'", "exactly one App", "first, second"]),
        ("./helpers.py", ["file './helpers.py'", "exactly one App", "found: none"]),
        ("./nothere.py", ["no file './nothere.py'"]),
        ("./researchapp.py:ap", ["no attribute 'ap'", "did you mean './researchapp.py:app'?"]),
    ],
)
def test_a_file_path_that_names_no_app_is_one_line(
    project: Path, target: str, fragments: list[str]
) -> None:
    result = run_in_process(["worker", target], cwd=project)

    assert_one_line_error(result, *fragments)
