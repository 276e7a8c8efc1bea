"""Finding the App a command line names: `module:attribute`, a dotted module path, or a file
path (`./myapp.py`, `agents/myapp.py:app`)."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
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


def _suggest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to `word`, if any is close enough to be a typo of it."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _missing_module_hint(missing: str) -> str:
    """`; did you mean 'x'?` for a top-level module of the current folder close to `missing`."""
    if "." in missing:
        return ""
    here = [m.name for m in pkgutil.iter_modules([os.getcwd()])]
    guess = _suggest(missing, here)
    return f"; did you mean {guess!r}?" if guess else ""


def _import(module_name: str) -> object:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            hint = _missing_module_hint(missing)
            raise AppLoadError(
                f"cannot import {module_name!r}: no module named {missing!r}"
                + (hint or " (run from the folder that holds it, or add that folder to PYTHONPATH)")
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


def _import_file(text: str) -> object:
    """Import the Python file `path` as the module named by its stem, its folder importable
    (so its own `import sibling` lines work, as with `python path`)."""
    path = Path(text)
    if not path.is_file():
        raise AppLoadError(f"no file {text!r} (from {os.getcwd()!r})")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path.resolve()):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise AppLoadError(f"{text!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as `import` does, so dataclasses and pickling find it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_file_path(target: str) -> bool:
    head = target.rpartition(":")[0] if target.count(":") == 1 else target
    return head.endswith(".py") or "/" in head or os.sep in head


def load_app(target: str) -> App:
    """Import and return the `App` that `target` names.

    `target` is `module:attribute` (`myapp:app`, `pkg.agents:app`), a dotted module path
    holding exactly one `App` (`myapp`), or a file path (`./myapp.py`, `agents/main.py:app`)
    with or without `:attribute`. The current directory is importable, as for `python -m`; a
    file's own folder is too, as for `python path`.

    Raises:
        AppLoadError: with one line saying what is wrong (with a suggestion for a near miss).
    """
    from omnidaemon.app import App

    target = target.strip()
    if _is_file_path(target):
        path_text, _, attribute = (
            target.rpartition(":") if target.count(":") == 1 else (target, "", "")
        )
        label, kind = path_text, "file"
        module: object = _imported(label, lambda: _import_file(path_text))
    else:
        label, _, attribute = target.partition(":")
        kind = "module"
        if not label or (":" in target and not attribute) or ":" in attribute:
            raise AppLoadError(f"{target!r} is not 'module:attribute' (for example 'myapp:app')")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = _import(label)
    if attribute:
        obj: object = module
        for part in attribute.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise AppLoadError(_no_attribute(kind, label, module, attribute, App)) from None
    else:
        apps = {name: value for name, value in vars(module).items() if isinstance(value, App)}
        if len(apps) != 1:
            found = ", ".join(sorted(apps)) if apps else "none"
            raise AppLoadError(
                f"{kind} {label!r} must hold exactly one App to be named without an "
                f"attribute (found: {found}); use '{label}:<attribute>'"
            )
        obj = next(iter(apps.values()))
    if not isinstance(obj, App):
        raise AppLoadError(f"{target!r} is a {type(obj).__name__}, not an omnidaemon App")
    return obj


def _imported(label: str, load: Callable[[], object]) -> object:
    """Run `load()` (which imports `label`), turning its failures into one-line errors."""
    try:
        return load()
    except AppLoadError:
        raise
    except SystemExit as exc:
        raise AppLoadError(f"importing {label!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise AppLoadError(
            f"importing {label!r} failed: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None


def _no_attribute(kind: str, label: str, module: object, attribute: str, app_type: type) -> str:
    """`module 'x' has no attribute 'y'`, with the closest name when it looks like a typo
    (App instances first: they are what was meant)."""
    names = vars(module)
    apps = [n for n, v in names.items() if isinstance(v, app_type)]
    others = [n for n in names if not n.startswith("_")]
    guess = _suggest(attribute, apps) or _suggest(attribute, others)
    hint = f"; did you mean '{label}:{guess}'?" if guess else ""
    return f"{kind} {label!r} has no attribute {attribute!r}{hint}"
