"""The public surface: what `import omnidaemon` offers; every module says what it exports."""

import importlib
import importlib.metadata
import importlib.resources
import pkgutil
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

import omnidaemon

DOCUMENTED_NAMES = {
    "AgentFailed",
    "AgentSpec",
    "App",
    "AppLoadError",
    "Backoff",
    "Budget",
    "BusUnavailable",
    "Cancelled",
    "ConfigurationError",
    "Context",
    "DeadLetter",
    "DelayTooLong",
    "Envelope",
    "OmniDaemonError",
    "OutputStream",
    "PayloadTooLarge",
    "PayloadValidationError",
    "RateLimit",
    "Reject",
    "Result",
    "Retry",
    "RetryPolicy",
    "RunSummary",
    "StreamChunk",
    "Trace",
    "__version__",
}

# Where each public name is defined, so `omnidaemon.X` is the very object the module defines.
DEFINED_IN = {
    "AgentFailed": "omnidaemon.errors",
    "AgentSpec": "omnidaemon.agents",
    "App": "omnidaemon.app",
    "AppLoadError": "omnidaemon.errors",
    "Backoff": "omnidaemon.retry",
    "Budget": "omnidaemon.flow.limits",
    "RateLimit": "omnidaemon.flow.limits",
    "BusUnavailable": "omnidaemon.errors",
    "Cancelled": "omnidaemon.errors",
    "ConfigurationError": "omnidaemon.errors",
    "Context": "omnidaemon.context",
    "DeadLetter": "omnidaemon.dead_letters",
    "DelayTooLong": "omnidaemon.errors",
    "Envelope": "omnidaemon.envelope",
    "OmniDaemonError": "omnidaemon.errors",
    "OutputStream": "omnidaemon.streaming.stream",
    "PayloadTooLarge": "omnidaemon.errors",
    "PayloadValidationError": "omnidaemon.errors",
    "Reject": "omnidaemon.retry",
    "Result": "omnidaemon.results",
    "Retry": "omnidaemon.retry",
    "RetryPolicy": "omnidaemon.retry",
    "StreamChunk": "omnidaemon.streaming.stream",
    "RunSummary": "omnidaemon.traces.reading",
    "Trace": "omnidaemon.traces.tree",
}

# `python -m omnidaemon` entry point: a script, not a module anyone imports names from.
NOT_LIBRARY_MODULES = {"omnidaemon.__main__"}

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def all_module_names() -> list[str]:
    walked = pkgutil.walk_packages(omnidaemon.__path__, prefix="omnidaemon.")
    names = [info.name for info in walked if info.name not in NOT_LIBRARY_MODULES]
    return sorted(["omnidaemon", *names])


MODULES = all_module_names()


def test_all_is_exactly_the_documented_names() -> None:
    assert len(omnidaemon.__all__) == len(set(omnidaemon.__all__)), "duplicates in __all__"
    assert set(omnidaemon.__all__) == DOCUMENTED_NAMES


@pytest.mark.parametrize("name", sorted(DOCUMENTED_NAMES))
def test_each_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from omnidaemon import {name}", namespace)
    assert namespace[name] is getattr(omnidaemon, name)


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from omnidaemon import *", namespace)
    namespace.pop("__builtins__", None)
    assert set(namespace) == DOCUMENTED_NAMES


@pytest.mark.parametrize(("name", "module"), sorted(DEFINED_IN.items()))
def test_public_names_are_the_objects_their_modules_define(name: str, module: str) -> None:
    assert getattr(omnidaemon, name) is getattr(importlib.import_module(module), name)


def test_errors_share_one_base() -> None:
    for name in ("AppLoadError", "ConfigurationError", "PayloadValidationError"):
        assert issubclass(getattr(omnidaemon, name), omnidaemon.OmniDaemonError)
    assert issubclass(omnidaemon.OmniDaemonError, Exception)


def test_version_matches_the_distribution() -> None:
    assert isinstance(omnidaemon.__version__, str)
    assert omnidaemon.__version__ == importlib.metadata.version("omnidaemon")
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as f:
        assert omnidaemon.__version__ == tomllib.load(f)["project"]["version"]


def test_modules_are_found() -> None:
    # A sanity check on the walk itself, so the per-module tests cannot pass vacuously.
    for expected in ("omnidaemon.agents", "omnidaemon.envelope", "omnidaemon.worker.runner"):
        assert expected in MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_every_module_declares_all_and_every_name_exists(module_name: str) -> None:
    module: ModuleType = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} does not declare __all__"
    assert isinstance(exported, list | tuple)
    assert all(isinstance(name, str) for name in exported)
    assert len(exported) == len(set(exported)), f"duplicates in {module_name}.__all__"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module_name}.__all__ names what it does not define: {missing}"


def test_py_typed_ships_in_the_package() -> None:
    marker = importlib.resources.files("omnidaemon") / "py.typed"
    assert marker.is_file()
    assert Path(omnidaemon.__file__).parent.joinpath("py.typed").is_file()
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["omnidaemon"]
