"""Finding the App a command line names: `module:attribute` or a dotted module path."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

from omnidaemon.errors import AppLoadError

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["load_app"]


def _where(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return ""  # its message already names the file and line
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno})"


def _import(module_name: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise AppLoadError(
                f"cannot import {module_name!r}: no module named {missing!r} "
                f"(run from the folder that holds it, or add that folder to PYTHONPATH)"
            ) from None
        raise AppLoadError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None
    except SystemExit as exc:
        raise AppLoadError(f"importing {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise AppLoadError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None


def load_app(target: str) -> App:
    """Import and return the `App` that `target` names.

    `target` is `module:attribute` (`myapp:app`, `pkg.agents:app`), or a dotted module path
    holding exactly one `App` (`myapp`). The current directory is importable, as for
    `python -m`.

    Raises:
        AppLoadError: with one line saying what is wrong.
    """
    from omnidaemon.app import App

    module_name, _, attribute = target.strip().partition(":")
    if not module_name or (":" in target and not attribute) or ":" in attribute:
        raise AppLoadError(f"{target!r} is not 'module:attribute' (for example 'myapp:app')")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import(module_name)
    if attribute:
        obj: object = module
        for part in attribute.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise AppLoadError(
                    f"module {module_name!r} has no attribute {attribute!r}"
                ) from None
    else:
        apps = {name: value for name, value in vars(module).items() if isinstance(value, App)}
        if len(apps) != 1:
            found = ", ".join(sorted(apps)) if apps else "none"
            raise AppLoadError(
                f"module {module_name!r} must hold exactly one App to be named without an "
                f"attribute (found: {found}); use '{module_name}:<attribute>'"
            )
        obj = next(iter(apps.values()))
    if not isinstance(obj, App):
        raise AppLoadError(f"{target!r} is a {type(obj).__name__}, not an omnidaemon App")
    return obj
