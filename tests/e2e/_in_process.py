"""Run the `omnidaemon` command line inside the test process, as if it were a subprocess.

A `python -m omnidaemon ...` subprocess costs about half a second of interpreter start-up (more
on a loaded machine); calling `omnidaemon.cli.main` costs milliseconds. Tests that only check
what a command prints and its exit status call it here, with the environment, folder and
standard input a subprocess would get; what needs a process of its own (start-up, signals, the
entry point itself, `| head`) stays a subprocess.

The call leaves the test process as it found it: the environment, the working folder,
`sys.path`, the app modules the command imported from the folder (so the next test may write a
module of the same name elsewhere), and the logging configuration `omnidaemon worker` sets up
before it loads the app. Not thread-safe (standard output and the environment are the
process's): run the commands one after the other.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from omnidaemon.cli import main
from tests.e2e._support import cli_env

__all__ = ["Ran", "run_in_process"]


@dataclass
class Ran:
    """What a command did: the fields of `subprocess.CompletedProcess` the tests read."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Undo `configure_logging` (structlog's configuration, the root logger's handlers)."""
    configured = structlog.is_configured()
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    try:
        yield
    finally:
        if configured:
            structlog.configure(**config)
        else:
            structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(httpx_level)


@contextlib.contextmanager
def _imports_forgotten(folder: Path) -> Iterator[None]:
    """Restore `sys.path` and forget the modules imported from `folder` (the app modules)."""
    path = sys.path[:]
    before = set(sys.modules)
    importlib.invalidate_caches()  # the test may just have written the module
    try:
        yield
    finally:
        sys.path[:] = path
        inside = str(folder.resolve())
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(inside + os.sep):
                del sys.modules[name]


def run_in_process(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> Ran:
    """`omnidaemon ARGS`, run by `omnidaemon.cli.main` in `cwd` with exactly the environment
    `env` (default: `cli_env()`) and `stdin` as standard input (default: none, as /dev/null)."""
    out, err = io.StringIO(), io.StringIO()
    status: int | str | None = 0
    with (
        _environment(env if env is not None else cli_env()),
        contextlib.chdir(cwd),
        _imports_forgotten(cwd),
        _logging_kept(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        saved_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin or "")
        try:
            main(list(args))
        except SystemExit as exited:
            status = exited.code
        finally:
            sys.stdin = saved_stdin
    if isinstance(status, str):  # `sys.exit("message")`: printed, status 1, as Python does
        err.write(status + "\n")
        status = 1
    return Ran(list(args), status or 0, out.getvalue(), err.getvalue())
