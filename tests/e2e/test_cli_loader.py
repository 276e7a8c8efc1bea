"""`omnidaemon worker APP`: finding the app, and one-line errors when it cannot be found.

Every bad invocation must exit with status 2 and say what is wrong in exactly one line on
stderr, without a traceback: that is what an operator reading a crash-looping container's log
sees.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from omnidaemon import App
from omnidaemon.errors import AppLoadError, OmniDaemonError
from omnidaemon.worker import load_app
from tests.e2e._in_process import Ran, run_in_process
from tests.e2e._support import cli_env, run_cli, write_module

GOOD_APP = """
    from omnidaemon import App

    app = App("goodapp")

    @app.agent("job.run")
    async def work(event: dict) -> None:
        pass
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder holding the app modules the command line is asked to load."""
    write_module(tmp_path, "goodapp", GOOD_APP)
    write_module(tmp_path, "broken", "import os\n\nvalue = undefined_name + 1\n")
    write_module(tmp_path, "needsdep", "import not_installed_dependency_xyz\n")
    write_module(tmp_path, "plain", "value = 3\n\ndef work():\n    pass\n")
    write_module(
        tmp_path,
        "twoapps",
        """
        from omnidaemon import App

        first = App("first")
        second = App("second")
        """,
    )
    write_module(tmp_path, "syntaxerror", "def f(:\n    pass\n")
    write_module(tmp_path, "exits", "import sys\n\nsys.exit(3)\n")
    return tmp_path


def assert_one_line_error(result: Ran | subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Status 2, no stdout, one stderr line holding every fragment, and no traceback."""
    stderr = result.stderr
    assert result.returncode == 2, f"status {result.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert stderr.endswith("\n")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert result.stdout == ""
    return lines[0]


# The command line, in process (a subprocess for the entry point itself) --------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(
            ["nosuchmodule:app"], ["'nosuchmodule'", "no module named"], id="missing-module"
        ),
        pytest.param(
            ["broken:app"],
            ["'broken'", "NameError", "undefined_name", "broken.py:3"],
            id="module-raises-on-import",
        ),
        pytest.param(
            # The app module exists; a module it imports does not. The message must name the
            # missing dependency, not claim that the app module is missing.
            ["needsdep:app"],
            ["'needsdep'", "ModuleNotFoundError", "not_installed_dependency_xyz"],
            id="module-imports-missing-dependency",
        ),
        pytest.param(
            ["goodapp:nope"], ["'goodapp'", "no attribute", "'nope'"], id="missing-attribute"
        ),
        pytest.param(
            ["plain:work"], ["'plain:work'", "function", "not an omnidaemon App"], id="not-an-app"
        ),
        pytest.param(
            ["goodapp:app.name"],
            ["'goodapp:app.name'", "str", "not an omnidaemon App"],
            id="dotted-attribute-not-an-app",
        ),
        pytest.param(
            ["plain"], ["'plain'", "exactly one App", "found: none"], id="module-without-app"
        ),
        pytest.param(
            ["twoapps"],
            ["'twoapps'", "exactly one App", "first, second", "'twoapps:<attribute>'"],
            id="module-with-two-apps",
        ),
        pytest.param(["goodapp:"], ["'goodapp:'", "module:attribute"], id="empty-attribute"),
        pytest.param([":app"], ["':app'", "module:attribute"], id="empty-module"),
        pytest.param([], ["name the app", "OMNIDAEMON_APP"], id="no-app-given"),
        pytest.param(
            ["goodapp:app", "--agents", "work,ghost"],
            ["'goodapp'", "no agent 'ghost'", "agents: work"],
            id="unknown-agent",
        ),
        pytest.param(
            ["goodapp:app", "--concurrency", "abc"],
            ["--concurrency", "'abc'", "valid integer"],
            id="concurrency-not-a-number",
        ),
        pytest.param(
            ["goodapp:app", "--concurrency", "0"],
            ["--concurrency", "'0'", "greater than or equal to 1"],
            id="concurrency-zero",
        ),
        pytest.param(
            ["goodapp:app", "--shutdown-grace", "soon"],
            ["--shutdown-grace", "'soon'"],
            id="grace-not-a-number",
        ),
        pytest.param(
            ["goodapp:app", "--no-such-option"],
            ["omnidaemon worker: error", "No such option", "--no-such-option"],
            id="unknown-option",
        ),
        pytest.param(
            ["goodapp:app:extra"], ["'goodapp:app:extra'", "module:attribute"], id="two-colons"
        ),
        pytest.param(["exits:app"], ["'exits'", "sys.exit(3)"], id="module-calls-sys-exit"),
    ],
)
def test_bad_invocation_is_one_line_and_status_2(
    project: Path, args: list[str], fragments: list[str]
) -> None:
    result = run_in_process(["worker", *args], cwd=project)

    assert_one_line_error(result, *fragments)


def test_bad_setting_in_environment_is_one_line_and_status_2(project: Path) -> None:
    result = run_in_process(
        ["worker", "goodapp:app"], cwd=project, env=cli_env(OMNIDAEMON_LOG_FORMAT="xml")
    )

    assert_one_line_error(result, "OMNIDAEMON_LOG_FORMAT", "'xml'")


def test_app_named_by_environment_is_loaded(project: Path) -> None:
    # The app is loaded from OMNIDAEMON_APP: asking it for an agent it lacks proves which app
    # was loaded without running a worker.
    result = run_in_process(
        ["worker", "--agents", "ghost"],
        cwd=project,
        env=cli_env(OMNIDAEMON_APP="goodapp:app"),
    )

    assert_one_line_error(result, "app 'goodapp' has no agent 'ghost'")


def test_bad_app_in_environment_is_reported(project: Path) -> None:
    result = run_in_process(["worker"], cwd=project, env=cli_env(OMNIDAEMON_APP="nosuchmodule:app"))

    assert_one_line_error(result, "'nosuchmodule'", "no module named")


def test_app_argument_wins_over_environment(project: Path) -> None:
    result = run_in_process(
        ["worker", "goodapp:app", "--agents", "ghost"],
        cwd=project,
        env=cli_env(OMNIDAEMON_APP="nosuchmodule:app"),
    )

    assert_one_line_error(result, "app 'goodapp' has no agent 'ghost'")


def test_syntax_error_points_at_the_users_file(project: Path) -> None:
    result = run_in_process(["worker", "syntaxerror:app"], cwd=project)

    line = assert_one_line_error(result, "'syntaxerror'", "SyntaxError", "syntaxerror.py")
    assert "importlib" not in line, line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--help"], ["worker"], id="top-level"),
        pytest.param(
            ["worker", "--help"],
            ["APP", "--agents", "--concurrency", "--shutdown-grace", "OMNIDAEMON_APP"],
            id="worker",
        ),
    ],
)
def test_help_exits_0(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    result = run_cli(args, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Usage: omnidaemon")
    for fragment in expected:
        assert fragment in result.stdout


# load_app, in process ------------------------------------------------------------------------


@pytest.fixture
def fresh_modules() -> Iterator[None]:
    """Forget the modules a test imported, so nothing leaks into other tests."""
    before = set(sys.modules)
    importlib.invalidate_caches()
    yield
    for name in set(sys.modules) - before:
        if name.startswith("e2e_"):
            del sys.modules[name]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.mark.usefixtures("fresh_modules")
class TestLoadApp:
    def test_module_and_attribute(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        name = unique("e2e_modattr")
        write_module(tmp_path, name, GOOD_APP)
        monkeypatch.syspath_prepend(str(tmp_path))

        app = load_app(f"{name}:app")

        assert isinstance(app, App)
        assert app is sys.modules[name].app
        assert app.name == "goodapp"
        assert list(app.agents) == ["work"]

    def test_package_module_and_attribute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        package = unique("e2e_pkg")
        write_module(tmp_path / package, "__init__", "")
        write_module(tmp_path / package, "agents", GOOD_APP.replace("goodapp", "pkgapp"))
        monkeypatch.syspath_prepend(str(tmp_path))

        app = load_app(f"{package}.agents:app")

        assert app is sys.modules[f"{package}.agents"].app
        assert app.name == "pkgapp"

    def test_dotted_attribute_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        name = unique("e2e_dotted")
        write_module(
            tmp_path,
            name,
            """
            from omnidaemon import App

            class Registry:
                class Apps:
                    main = App("nested")
            """,
        )
        monkeypatch.syspath_prepend(str(tmp_path))

        app = load_app(f"{name}:Registry.Apps.main")

        assert app is sys.modules[name].Registry.Apps.main
        assert app.name == "nested"

    def test_module_holding_one_app_needs_no_attribute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        name = unique("e2e_single")
        write_module(tmp_path, name, GOOD_APP.replace('App("goodapp")', 'App("single")'))
        monkeypatch.syspath_prepend(str(tmp_path))

        app = load_app(name)

        assert app is sys.modules[name].app
        assert app.name == "single"

    def test_current_directory_is_importable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # As for `python -m`: the folder the worker is started in holds the app.
        name = unique("e2e_cwd")
        write_module(tmp_path, name, GOOD_APP.replace('App("goodapp")', 'App("fromcwd")'))
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != ""])

        app = load_app(f"{name}:app")

        assert app.name == "fromcwd"

    def test_errors_are_app_load_errors(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        name = unique("e2e_notapp")
        write_module(tmp_path, name, "app = 'not an app'\n")
        monkeypatch.syspath_prepend(str(tmp_path))

        with pytest.raises(AppLoadError, match="is a str, not an omnidaemon App") as info:
            load_app(f"{name}:app")
        assert isinstance(info.value, OmniDaemonError)
        with pytest.raises(AppLoadError, match="no module named"):
            load_app(unique("e2e_missing"))
