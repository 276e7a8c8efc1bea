"""The peers, FastStream and Taskiq: installed into a venv of their own (`bench/.peers-venv`,
kept between runs and rebuilt when `bench/peers/requirements.txt` changes), each driven by a
small script under `bench/peers/` that runs in that venv and prints JSON on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.cases.raw import latencies
from bench.common import ROOT, BenchError, Children, Config, RedisServer, progress

PEERS = ("faststream", "taskiq")
VENV = ROOT / "bench" / ".peers-venv"
REQUIREMENTS = ROOT / "bench" / "peers" / "requirements.txt"
_MARKER = VENV / ".bench-requirements"  # the requirements last installed successfully


def _wanted() -> str:
    """The peers' requirements; with redis-py's C parser (hiredis) when the project's venv
    has it, so that the peers parse Redis replies the way omnidaemon and the raw loop do."""
    wanted = REQUIREMENTS.read_text()
    try:
        hiredis = version("hiredis")
    except PackageNotFoundError:
        return wanted
    return wanted + f"# as in the project's venv\nhiredis=={hiredis}\n"


def ensure_venv() -> tuple[Path | None, str]:
    """The peers venv's python, installing it if needed; or None and why not."""
    wanted = _wanted()
    python = VENV / "bin" / "python"
    if python.exists() and _MARKER.exists() and _MARKER.read_text() == wanted:
        return python, ""
    progress("installing FastStream and Taskiq into bench/.peers-venv (once; kept between runs)")
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(VENV)],
                check=True,
                capture_output=True,
                timeout=300,
            )
        requirements = VENV / "bench-requirements.txt"
        requirements.write_text(wanted)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, "-r", str(requirements)], check=True, capture_output=True, timeout=900
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        return None, f"installing the peers failed ({' '.join(tail) or exc})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"installing the peers failed ({exc})"
    _MARKER.write_text(wanted)
    return python, ""


def _run(
    python: Path, children: Children, peer: str, args: list[str], out: Path, timeout: float
) -> dict[str, Any]:
    log = out / f"{peer}-driver.log"
    script = ROOT / "bench" / "peers" / f"{peer}_driver.py"
    proc = children.start([str(python), str(script), *args], stdout=subprocess.PIPE, log=log)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        Children.stop(proc)
        raise BenchError(f"the {peer} driver did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"the {peer} driver exited with {proc.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    if not result.get("acked", True):
        raise BenchError(f"{peer}: events were left unacknowledged")
    return result


def versions(python: Path, children: Children, peer: str, out: Path) -> dict[str, str]:
    result = _run(python, children, peer, ["versions"], out, timeout=60)
    found: dict[str, str] = result["versions"]
    return found


def drain(
    python: Path, children: Children, server: RedisServer, cfg: Config, out: Path, peer: str
) -> dict[str, float]:
    args = ["drain", "--url", server.url, "-n", str(cfg.n)]
    result = _run(python, children, peer, args, out, timeout=120 + cfg.n / 200)
    if result["count"] != cfg.n:
        raise BenchError(f"{peer} handled {result['count']} events, not {cfg.n}")
    return {f"{peer}.drain": result["rate"]}


def latency(
    python: Path, children: Children, server: RedisServer, cfg: Config, out: Path, peer: str
) -> dict[str, float]:
    args = ["latency", "--url", server.url, "--rate", str(cfg.rate)]
    args += ["--seconds", str(cfg.latency_seconds), "--warmup", str(cfg.warmup_seconds)]
    result = _run(python, children, peer, args, out, timeout=120 + 2 * cfg.latency_seconds)
    if result["published_rate"] < 0.95 * cfg.rate:
        progress(f"  note: the {peer} publisher reached only {result['published_rate']:,.0f}/s")
    # The driver already left out the warm-up's events.
    return latencies(peer, result["latencies"], 0)
