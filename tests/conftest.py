"""Shared fixtures: an isolated root per test, a clean ledger and system, and no leaked threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import weightslab as wl
from weightslab import system as _system
from weightslab.ledger import LEDGER

REPO = Path(__file__).resolve().parent.parent

#: The environment an exactness test's subprocesses need (DESIGN.md, Determinism): MKL's strict
#: conditional-numerical-reproducibility mode, set before torch loads, and one thread.
DETERMINISTIC_ENV = {
    "MKL_CBWR": "AVX2,STRICT",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weightslab root; also the default root of systems the ledger starts by itself."""
    path = tmp_path / "root"
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(path))
    return path


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Every test starts with an empty ledger and no checkpoint system, and must not leak threads."""
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(tmp_path / "default-root"))
    before = set(threading.enumerate())
    yield
    system = _system._SYSTEM
    if system is not None and not system.closed:
        try:
            system._close(crashed=True)
        except wl.CheckpointSaveError:
            pass
    LEDGER.clear()
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t.name for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"


def run_python(code: str | None = None, *, script: Path | None = None, args: list[str] | None = None,
               env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run Python code or a script in a fresh interpreter with the deterministic environment."""
    full_env = {**os.environ, **DETERMINISTIC_ENV, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    cmd = [sys.executable, *(["-c", code] if code is not None else [str(script)]), *(args or [])]
    proc = subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed with {proc.returncode}:\n--- stdout\n{proc.stdout}\n"
                             f"--- stderr\n{proc.stderr}")
    return proc
