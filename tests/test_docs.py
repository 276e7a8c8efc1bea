"""Every code sample of the documentation runs, and the site builds.

The convention, for whoever writes a page of `docs/` (or `README.md`):

- **Python blocks** (```` ```python ````) run. The blocks of one page run in order in one
  namespace, so a page can build an example up step by step; each page starts from a fresh
  namespace, in a fresh temporary directory, with `OMNIDAEMON_BROKER_URL=memory://<page>` (a
  private in-process bus) and the `OMNIDAEMON_*`, `EVENT_BUS_TYPE`, `REDIS_URL` and `NATS_URL`
  variables of the test run removed. Top-level `await` (and `async with`, `async for`) is
  allowed: a page runs on one asyncio event loop, and must finish within `PAGE_TIMEOUT`
  seconds, so show a worker as `async with app.running(): ...` or with `omnidaemon.testing`,
  never a loop that runs forever. After the last block, every function the page defined whose
  name starts with `test_` is called (and awaited if async), as pytest would.
- **Pytest pages.** A page that contains `<!-- docs-test: pytest -->` is run by pytest instead,
  in a subprocess: each block goes to the file its `title="..."` names (`conftest.py`,
  `myapp.py`, `test_pipeline.py`); a block without a title continues the previous block's file
  (the first goes to `test_page.py`). Blocks keep their line numbers, so a traceback's line
  numbers are the page's. The run must pass at least one test.
- **Includes.** A block whose only line is `--8<-- "path"` (pymdownx.snippets) runs the file it
  includes, relative to the repository root.
- **Shell blocks** (```` ```bash ````): each line that runs `omnidaemon ...` or
  `python -m omnidaemon ...` (after an optional `$ ` prompt and `VAR=value` assignments, up to
  the first `|`, `&&`, `;` or redirection) must parse against the real command line, so an
  option that no longer exists fails here. `bash FILE` and `python FILE.py` must name a file
  of the repository, and `python -m MODULE` an importable module. In ```` ```text ```` blocks
  (transcripts: output, not code) only the lines starting with `$ omnidaemon` or
  `$ python -m omnidaemon` are parsed.
- **Opting out.** `<!-- docs-test: skip REASON -->` on the line right before a fence skips
  that block; each opt-out is reported as a skipped test with its reason. Keep them rare.
- Every fence names its language, one of `PYTHON`, `SHELL`, `TEXT` or `OTHER` below (data and
  configuration: json, yaml, http, ...), so that no code escapes these checks by accident.

A failure names the page and the line of the block (`docs/tutorial.md:42`).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.exceptions import Exit

from omnidaemon.cli.main import build_cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
PAGE_TIMEOUT = 10.0

PYTHON = frozenset({"python", "py"})
SHELL = frozenset({"bash", "sh", "shell", "console"})
TEXT = frozenset({"text"})
# Not run: data, configuration and diagrams. A language outside these sets fails the test, so
# that a typo (```pyhton) cannot hide a sample from it.
OTHER = frozenset(
    {
        "json", "jsonc", "http", "toml", "yaml", "yml", "ini", "cfg", "dotenv", "csv",
        "mermaid", "dockerfile", "promql", "html", "xml", "diff", "sql", "nginx", "markdown",
    }
)  # fmt: skip

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<directive>\S+)\s*(?P<arg>.*?)\s*-->\s*$")
_TITLE = re.compile(r"""\btitle=(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>\S+))""")
_INCLUDE = re.compile(r"""^--8<--\s+["'](?P<path>[^"']+)["']\s*$""")
_SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", ";;", "<", ">", ">>", "(", ")"})


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # the line of the block's first code line, 1-based
    lang: str
    title: str | None
    code: str
    skip: str | None  # the opt-out reason, if the block is opted out

    @property
    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


@dataclass(frozen=True)
class Page:
    path: Path
    blocks: tuple[Block, ...]
    pytest_mode: bool
    problems: tuple[str, ...]  # malformed markers and fences

    def python(self) -> list[Block]:
        return [b for b in self.blocks if b.lang in PYTHON and b.skip is None]


def parse_page(path: Path) -> Page:
    """The fenced blocks and `docs-test` markers of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pytest_mode = False
    pending_skip: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        text = lines[index]
        marker = _MARKER.match(text)
        fence = _FENCE.match(text)
        if marker:
            directive, arg = marker["directive"], marker["arg"]
            if directive == "pytest" and not arg:
                pytest_mode = True
            elif directive == "skip" and arg:
                pending_skip = (index + 1, arg)
            else:
                problems.append(
                    f"{rel(path)}:{index + 1}: unknown docs-test marker {text.strip()!r} "
                    "(use 'skip REASON' or 'pytest')"
                )
            index += 1
            continue
        if fence is None:
            if pending_skip is not None and text.strip():
                problems.append(
                    f"{rel(path)}:{pending_skip[0]}: a skip marker must precede a fence"
                )
                pending_skip = None
            index += 1
            continue
        indent, mark, info = fence["indent"], fence["fence"], fence["info"]
        lang = info.split(None, 1)[0].lower() if info else ""
        title_match = _TITLE.search(info)
        title = None
        if title_match:
            title = title_match["dq"] or title_match["sq"] or title_match["bare"]
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = lines[index].strip()
            if closing.startswith(mark[0] * len(mark)) and not closing.strip(mark[0]):
                break
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        else:
            problems.append(f"{rel(path)}:{index - len(body)}: unclosed fence")
        start = index - len(body) + 1  # 1-based line of the first code line
        if not lang:
            problems.append(
                f"{rel(path)}:{start - 1}: a fence without a language; name one "
                "(python, bash, text, json, ...)"
            )
        skip = None
        if pending_skip is not None:
            skip = pending_skip[1]
            pending_skip = None
        blocks.append(Block(path, start, lang, title, "\n".join(body) + "\n", skip))
        index += 1
    return Page(path, tuple(blocks), pytest_mode, tuple(problems))


def source_of(block: Block) -> tuple[str, str, int]:
    """`(code, filename, first line)` to compile a block with, resolving a whole-block include
    so that tracebacks name the included file and its lines."""
    stripped = block.code.strip()
    include = _INCLUDE.match(stripped)
    if include:
        included = ROOT / include["path"]
        return included.read_text(encoding="utf-8"), str(included), 1
    return block.code, str(block.page), block.line


def compile_block(block: Block) -> types.CodeType:
    code, filename, first = source_of(block)
    # Pad with blank lines so that line numbers in tracebacks are the page's own (and the
    # traceback shows each line, read from the page).
    compiled: types.CodeType = compile(
        "\n" * (first - 1) + code,
        filename,
        "exec",
        flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        dont_inherit=True,
    )
    return compiled


ALL_PAGES = [parse_page(path) for path in PAGES]


def _page_id(page: Page) -> str:
    return rel(page.path)


# Running python blocks ----------------------------------------------------------------------


class BlockFailed(Exception):
    pass


@pytest.fixture
def sample_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory and a private memory bus; the environment is restored afterwards
    (samples may set variables of their own)."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("OMNIDAEMON_") or name in ("EVENT_BUS_TYPE", "REDIS_URL", "NATS_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OMNIDAEMON_HOME", str(tmp_path / ".omnidaemon"))
    monkeypatch.setenv("OMNIDAEMON_LOG_LEVEL", "WARNING")
    monkeypatch.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _describe_failure(block: Block, exc: BaseException) -> str:
    frames = "".join(traceback.format_exception(exc))
    return f"{block.where}: this python block failed:\n\n{block.code}\n{frames}"


async def _run_blocks(blocks: list[Block], namespace: dict[str, Any]) -> None:
    where = blocks[0].where
    try:
        with anyio.fail_after(PAGE_TIMEOUT):
            for block in blocks:
                where = block.where
                await _run_block(block, namespace)
            await _run_tests(blocks, namespace)
    except TimeoutError:
        raise BlockFailed(
            f"{where}: the page did not finish within {PAGE_TIMEOUT:g} s (a worker that runs "
            "forever? use `async with app.running(): ...`)"
        ) from None


async def _run_block(block: Block, namespace: dict[str, Any]) -> None:
    try:
        code = compile_block(block)
    except SyntaxError as exc:
        raise BlockFailed(_describe_failure(block, exc)) from None
    try:
        result = eval(code, namespace)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        raise BlockFailed(_describe_failure(block, exc)) from None


async def _run_tests(blocks: list[Block], namespace: dict[str, Any]) -> None:
    """Call the `test_*` functions the page defined, as pytest would."""
    module = namespace["__name__"]
    tests = [
        (name, value)
        for name, value in namespace.items()
        if name.startswith("test_")
        and inspect.isfunction(value)
        and getattr(value, "__module__", None) == module
    ]
    for name, function in tests:
        where = f"{rel(blocks[0].page)}:{function.__code__.co_firstlineno}"
        if any(
            p.default is inspect.Parameter.empty
            for p in inspect.signature(function).parameters.values()
        ):
            raise BlockFailed(
                f"{where}: {name}() takes fixtures: mark the page "
                "<!-- docs-test: pytest --> to run it with pytest"
            )
        try:
            outcome = function()
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            raise BlockFailed(
                f"{where}: {name}() failed:\n" + "".join(traceback.format_exception(exc))
            ) from None


def run_python_page(page: Page) -> None:
    blocks = page.python()
    slug = re.sub(r"\W", "_", rel(page.path).removesuffix(".md"))
    module_name = f"docs_sample_{slug}"
    module = types.ModuleType(module_name)
    module.__file__ = str(page.path)
    sys.modules[module_name] = module
    os.environ["OMNIDAEMON_BROKER_URL"] = f"memory://{module_name}"
    failure: str | None = None
    try:
        anyio.run(_run_blocks, blocks, module.__dict__)
    except BlockFailed as exc:
        failure = str(exc)
    finally:
        del sys.modules[module_name]
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def run_pytest_page(page: Page, directory: Path) -> None:
    files: dict[str, list[Block]] = {}
    current = "test_page.py"
    for block in page.python():
        current = block.title or current
        files.setdefault(current, []).append(block)
    for name, blocks in files.items():
        text = ""
        for block in blocks:
            code, _, first = source_of(block)
            padding = max(0, first - 1 - text.count("\n"))
            text += "\n" * padding + code
        (directory / name).write_text(text, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(directory), str(ROOT)])
    env["OMNIDAEMON_BROKER_URL"] = "memory://docs"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:valkey",
            "--rootdir",
            str(directory),
            str(directory),
        ],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0 or " passed" not in output:
        pytest.fail(
            f"{rel(page.path)}: its tests failed under pytest (files "
            f"{', '.join(files)}; line numbers are the page's):\n{output}",
            pytrace=False,
        )


PYTHON_PAGES = [page for page in ALL_PAGES if page.python()]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_page_id)
def test_python_samples_run(page: Page, sample_env: Path) -> None:
    if page.pytest_mode:
        run_pytest_page(page, sample_env)
    else:
        run_python_page(page)


# Shell lines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShellLine:
    page: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def shell_lines(page: Page) -> list[ShellLine]:
    """The command lines of a page's shell blocks, and the `$ ` lines of its transcripts."""
    found: list[ShellLine] = []
    for block in page.blocks:
        if block.skip is not None or block.lang not in SHELL | TEXT:
            continue
        pending = ""
        start = 0
        for offset, raw in enumerate(block.code.splitlines()):
            if not pending:
                start = block.line + offset
            if block.lang in TEXT and not pending and not raw.startswith("$ "):
                continue
            line = raw[2:] if not pending and raw.startswith("$ ") else raw
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            full = (pending + line).strip()
            pending = ""
            if full and not full.startswith("#"):
                found.append(ShellLine(page.path, start, full))
    return found


def words(command: str) -> list[str]:
    """The words of a command up to the first shell operator, without `VAR=value` prefixes."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens: list[str] = []
    for token in lexer:
        if token in _SHELL_OPERATORS or set(token) <= set("();<>|&"):
            break
        tokens.append(token)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    return tokens


def omnidaemon_args(tokens: list[str]) -> list[str] | None:
    """The arguments given to omnidaemon, or None when the command is something else."""
    if not tokens:
        return None
    program = Path(tokens[0]).name
    if program == "omnidaemon":
        return tokens[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and tokens[1:3] == ["-m", "omnidaemon"]:
        return tokens[3:]
    return None


_CLI = typer.main.get_command(build_cli())


def parse_cli(args: list[str]) -> None:
    """Parse `args` as the real command line would, down to the subcommand, without running
    it. Raises click's `UsageError` for an unknown command, option or bad value."""
    try:
        ctx = _CLI.make_context("omnidaemon", list(args))
        rest = [*ctx._protected_args, *ctx.args]
        while rest and hasattr(ctx.command, "resolve_command"):
            name, command, rest = ctx.command.resolve_command(ctx, rest)
            if command is None or name is None:
                raise UsageError(f"no such command {rest[0]!r}", ctx)
            ctx = command.make_context(name, rest, parent=ctx)
            rest = [*ctx._protected_args, *ctx.args]
        if rest:
            raise UsageError(f"unexpected arguments {rest}", ctx)
    except NoArgsIsHelpError:
        pass  # `omnidaemon bus` alone prints its help
    except Exit as exc:
        if exc.exit_code != 0:
            raise


def check_shell_line(line: ShellLine) -> str | None:
    """What is wrong with a documented command line, or None."""
    tokens = words(line.text)
    args = omnidaemon_args(tokens)
    if args is not None:
        try:
            parse_cli(args)
        except UsageError as exc:
            return f"{line.where}: `{line.text}` does not parse: {exc.format_message()}"
        return None
    if not tokens:
        return None
    program = Path(tokens[0]).name
    if program == "bash" and len(tokens) > 1 and not (ROOT / tokens[1]).is_file():
        return f"{line.where}: `{line.text}`: no file {tokens[1]} in the repository"
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and len(tokens) > 1:
        if tokens[1] == "-m" and len(tokens) > 2:
            if importlib.util.find_spec(tokens[2]) is None:
                return f"{line.where}: `{line.text}`: no module {tokens[2]}"
        elif tokens[1].endswith(".py") and not (ROOT / tokens[1]).is_file():
            return f"{line.where}: `{line.text}`: no file {tokens[1]} in the repository"
    return None


ALL_SHELL_LINES = [line for page in ALL_PAGES for line in shell_lines(page)]


def test_documented_command_lines_parse() -> None:
    problems = [p for line in ALL_SHELL_LINES if (p := check_shell_line(line)) is not None]
    assert not problems, "\n".join(problems)
    assert any(omnidaemon_args(words(line.text)) is not None for line in ALL_SHELL_LINES)


def test_the_command_line_check_catches_what_it_should() -> None:
    def problem(text: str) -> str | None:
        return check_shell_line(ShellLine(ROOT / "README.md", 1, text))

    assert problem("omnidaemon worker app:app --concurrency 4 --processes 2") is None
    assert problem("OMNIDAEMON_BROKER_URL=redis://h python -m omnidaemon bus list --json") is None
    assert problem("omnidaemon graph app:app --format dot | dot -Tsvg") is None
    assert problem("omnidaemon worker --help") is None
    assert problem("omnidaemon worker app:app --no-such-option")
    assert problem("omnidaemon bus inspect --stream analysis.completed")  # OmniDaemon's syntax
    assert problem("omnidaemon frobnicate")
    assert problem("omnidaemon worker app:app --concurrency 0")
    assert problem("bash scripts/no-such-script.sh")
    assert problem("python -m no_such_module_here")


# The pages themselves ------------------------------------------------------------------------


def test_pages_are_well_formed() -> None:
    problems = [problem for page in ALL_PAGES for problem in page.problems]
    assert not problems, "\n".join(problems)
    unknown = [
        f"{block.where}: unknown fence language {block.lang!r}"
        for page in ALL_PAGES
        for block in page.blocks
        if block.lang and block.lang not in PYTHON | SHELL | TEXT | OTHER
    ]
    assert not unknown, "\n".join(unknown)


def test_the_collector_finds_the_samples() -> None:
    assert sum(len(page.python()) for page in ALL_PAGES) >= 60
    readme = next(page for page in ALL_PAGES if page.path.name == "README.md")
    assert readme.python()


OPT_OUTS = [block for page in ALL_PAGES for block in page.blocks if block.skip is not None]


@pytest.mark.parametrize(
    "block", OPT_OUTS or [None], ids=lambda b: b.where if isinstance(b, Block) else "none"
)
def test_opted_out_blocks_are_reported(block: Block | None) -> None:
    if block is not None:
        pytest.skip(f"{block.where}: opted out of docs tests: {block.skip}")


# The site ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (tmp_path / "site" / "index.html").is_file()
