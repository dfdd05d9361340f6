"""Helpers shared by tests (not a test module: pytest collects nothing here; fixtures live in conftest).

- the deterministic subprocess environment (``DETERMINISTIC_ENV``, ``child_env``) and running Python
  in a fresh interpreter with it (``run_python``), or the ``weightslab`` console script (``run_cli``);
- the exact-training script tests/scripts/exact_train.py (``EXACT_SCRIPT``): running it to the end
  (``train``), spawning it (``spawn``), killing it at a marker line (``kill_when``), reading the step
  it resumed from (``start_of``) and comparing two final states byte for byte (``assert_same``);
- reading a root: checking it is consistent (``assert_root_consistent``), listing the steps of its
  manifests (``manifests``), reading one manifest (``read_manifest``);
- the small model the in-process system tests train (``make_model``).

Test modules import from here (``from .support import ...``), never from each other or from conftest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
EXACT_SCRIPT = REPO / "tests" / "scripts" / "exact_train.py"

#: The environment an exactness test's subprocesses need (DESIGN.md, Determinism): MKL's strict
#: conditional-numerical-reproducibility mode, set before torch loads, and one thread.
DETERMINISTIC_ENV = {
    "MKL_CBWR": "AVX2,STRICT",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}


# --- subprocesses ----------------------------------------------------------------------------------

def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``DETERMINISTIC_ENV`` and ``extra``, and this checkout first
    on ``PYTHONPATH``: what a child Python process of a test runs with."""
    env = {**os.environ, **DETERMINISTIC_ENV, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_python(code: str | None = None, *, script: Path | None = None, args: list[str] | None = None,
               env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run Python code or a script in a fresh interpreter with the deterministic environment."""
    cmd = [sys.executable, *(["-c", code] if code is not None else [str(script)]), *(args or [])]
    proc = subprocess.run(cmd, env=child_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed with {proc.returncode}:\n--- stdout\n{proc.stdout}\n"
                             f"--- stderr\n{proc.stderr}")
    return proc


def run_cli(*args: str, root: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed ``weightslab`` console script (without NO_COLOR; ``root`` as WEIGHTSLAB_ROOT)."""
    script = Path(sys.executable).with_name("weightslab")
    assert script.exists(), f"the console script is not installed next to {sys.executable}: pip install -e ."
    full_env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    full_env.update(env or {})
    if root is not None:
        full_env["WEIGHTSLAB_ROOT"] = str(root)
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=full_env, timeout=120)


# --- the exact-training script -------------------------------------------------------------------

def train(root: Path | str, out: Path, *extra: str) -> str:
    """Run the exact-training script to its end (resuming from ``root``); return its stdout."""
    return run_python(script=EXACT_SCRIPT, args=[str(root), str(out), *extra]).stdout


def start_of(stdout: str) -> int:
    """The step a run of the exact-training script resumed from (its ``START`` line)."""
    return int(next(line for line in stdout.splitlines() if line.startswith("START")).split()[1])


def spawn(root: Path | str, out: Path, *extra: str, sigint: Any = signal.SIG_DFL) -> subprocess.Popen[str]:
    """Start the exact-training script with pipes for stdin, stdout and stderr, and ``sigint`` as
    its disposition of SIGINT (``signal.SIG_IGN``: as in a shell's background job)."""
    # A shell that starts the tests in the background ignores SIGINT, and children inherit that
    # (Python then installs no KeyboardInterrupt handler): give the child the default disposition.
    return subprocess.Popen([sys.executable, str(EXACT_SCRIPT), str(root), str(out), *extra], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def kill_when(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """Read the child's output until ``marker``, then SIGKILL it; return the lines seen."""
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.strip())
        if line.strip() == marker:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"child was not killed by us: {proc.returncode}, saw {seen[-3:]}, " \
                                              f"stderr: {proc.stderr.read() if proc.stderr else ''}"
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()
    return seen


def assert_same(a: Path, b: Path) -> None:
    """Two final states written by the exact-training script are the same, byte for byte."""
    for suffix in (".safetensors", ".json"):
        left, right = Path(str(a) + suffix).read_bytes(), Path(str(b) + suffix).read_bytes()
        assert left == right, f"final states differ ({suffix})"


# --- reading a root ------------------------------------------------------------------------------

def assert_root_consistent(root: Path) -> list[int]:
    """Every committed checkpoint verifies, and no temporary file is left; return their steps
    (oldest commit first)."""
    manager = CheckpointManager(root)
    steps = []
    for entry in manager.checkpoints():
        manifest = manager.read_manifest(entry)
        load_tensors(manager, manifest)  # raises CorruptCheckpointError on any bad byte
        steps.append(entry.step)
    leftovers = [p for p in root.rglob(".tmp.*")]
    assert not leftovers, f"temporary files left: {leftovers}"
    return steps


def manifests(root: Path) -> dict[str, list[int]]:
    """``{experiment hash: steps of its manifests}`` of a local root."""
    layout = Layout(root)
    return {h: [s for s, _ in layout.manifests(h)] for h in layout.experiments()}


def read_manifest(root: Path, exp: str, step: int) -> dict:
    """The manifest of ``exp`` at ``step``, as JSON."""
    return json.loads(Layout(root).manifest(exp, step).read_text())


# --- a small model -------------------------------------------------------------------------------

def make_model(width: int = 8) -> nn.Module:
    """A seeded 4 -> width -> 1 MLP."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))
