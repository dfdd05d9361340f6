"""A run killed with SIGKILL and resumed in a fresh process ends bit for bit where an uninterrupted run does.

Each run is a real subprocess (tests/scripts/exact_train.py) with MKL's strict reproducibility mode
and one thread (DESIGN.md, Determinism). Final states are compared byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from weightslab.manager import CheckpointManager

from .conftest import DETERMINISTIC_ENV, REPO, run_python

SCRIPT = REPO / "tests" / "scripts" / "exact_train.py"

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def _train(root: Path, out: Path, *extra: str) -> str:
    return run_python(script=SCRIPT, args=[str(root), str(out), *extra]).stdout


def _start_of(stdout: str) -> int:
    return int(next(line for line in stdout.splitlines() if line.startswith("START")).split()[1])


def _spawn(root: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, **DETERMINISTIC_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), *extra], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen[str], marker: str) -> list[str]:
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


def _assert_same(a: Path, b: Path) -> None:
    for suffix in (".safetensors", ".json"):
        left, right = Path(str(a) + suffix).read_bytes(), Path(str(b) + suffix).read_bytes()
        assert left == right, f"final states differ ({suffix})"


def _assert_root_consistent(root: Path) -> list[int]:
    """Every committed checkpoint verifies, and no temporary file is left."""
    manager = CheckpointManager(root)
    steps = []
    for entry in manager.checkpoints():
        manifest = manager.read_manifest(entry)
        manager.load_tensors(manifest)  # raises CorruptCheckpointError on any bad byte
        steps.append(entry.step)
    leftovers = [p for p in root.rglob(".tmp.*")]
    assert not leftovers, f"temporary files left: {leftovers}"
    return steps


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("straight")
    out = base / "final"
    _train(base / "root", out)
    return out


@pytest.fixture(scope="module")
def straight_implicit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("straight-implicit")
    out = base / "final"
    _train(base / "root", out, "--implicit")
    return out


def test_killed_at_step_25_and_resumed_matches_straight_run(tmp_path: Path, straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = _spawn(root, out, "--pause-at", "25")
    _kill_when(proc, "READY")
    assert not Path(str(out) + ".json").exists()
    steps = _assert_root_consistent(root)
    assert steps == [5, 10, 15, 20, 25]  # wait() before READY made 25 durable

    stdout = _train(root, out)
    assert _start_of(stdout) == 25
    _assert_same(straight, out)


def test_killed_at_an_arbitrary_moment_resumes_exactly(tmp_path: Path, straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    # No pause: the kill lands wherever the child is, possibly in the middle of a background save.
    _kill_when(_spawn(root, out, "--steps", "40", "--frequency", "2"), "STEP 9")
    _assert_root_consistent(root)

    stdout = _train(root, out, "--frequency", "2")
    start = _start_of(stdout)
    assert start % 2 == 0 and start < 40
    _assert_root_consistent(root)
    _assert_same(straight, out)


def test_implicit_checkpoints_from_the_optimizer_hook_resume_exactly(tmp_path: Path, straight_implicit: Path,
                                                                     straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    _kill_when(_spawn(root, out, "--implicit", "--pause-at", "17"), "READY")
    steps = _assert_root_consistent(root)
    assert steps == [5, 10, 15]  # the loop never called checkpoint_on_step: the hook found the steps

    stdout = _train(root, out, "--implicit")
    assert _start_of(stdout) == 15
    _assert_same(straight_implicit, out)
    _assert_same(straight, out)  # implicit and explicit boundaries hold the same state


def test_killed_mid_epoch_with_loader_workers_and_two_models_resumes_exactly(tmp_path: Path) -> None:
    args = ["--loader", "--workers", "2", "--two-models"]
    straight = tmp_path / "straight"
    _train(tmp_path / "r0", straight, *args)
    root, out = tmp_path / "root", tmp_path / "final"
    _kill_when(_spawn(root, out, *args, "--pause-at", "21"), "READY")  # epoch 2, batch 5 of 8
    assert _assert_root_consistent(root)[-1] == 20
    stdout = _train(root, out, *args)
    assert _start_of(stdout) == 20
    _assert_same(straight, out)
