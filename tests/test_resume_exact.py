"""A run killed with SIGKILL and resumed in a fresh process ends bit for bit where an uninterrupted run does.

Each run is a real subprocess (tests/scripts/exact_train.py) with MKL's strict reproducibility mode
and one thread (DESIGN.md, Determinism). Final states are compared byte for byte.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .support import assert_root_consistent, assert_same, kill_when, spawn, start_of, train

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("straight")
    out = base / "final"
    train(base / "root", out)
    return out


@pytest.fixture(scope="module")
def straight_implicit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("straight-implicit")
    out = base / "final"
    train(base / "root", out, "--implicit")
    return out


def test_killed_at_step_25_and_resumed_matches_straight_run(tmp_path: Path, straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--pause-at", "25")
    kill_when(proc, "READY")
    assert not Path(str(out) + ".json").exists()
    steps = assert_root_consistent(root)
    assert steps == [5, 10, 15, 20, 25]  # wait() before READY made 25 durable

    stdout = train(root, out)
    assert start_of(stdout) == 25
    assert_same(straight, out)


def test_killed_at_an_arbitrary_moment_resumes_exactly(tmp_path: Path, straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    # No pause: the kill lands wherever the child is, possibly in the middle of a background save.
    kill_when(spawn(root, out, "--steps", "40", "--frequency", "2"), "STEP 9")
    steps = assert_root_consistent(root)
    # Saves are due at steps 2, 4, 6, 8; one writer thread commits them in order, and a save is
    # handed to it only once at most one earlier save is still queued or being written (the
    # default max_pending_saves=2, backpressure "block"). "STEP 9" is printed after
    # checkpoint_on_step(8) returned, so the save of step 8 was handed over, so at most the save
    # of step 6 was still pending: steps 2 and 4 were committed before the kill, whatever it hit.
    assert {2, 4} <= set(steps), steps

    stdout = train(root, out, "--frequency", "2")
    start = start_of(stdout)
    assert start > 0 and start == max(steps)  # the newest checkpoint committed before the kill
    assert_root_consistent(root)
    assert_same(straight, out)


def test_implicit_checkpoints_from_the_optimizer_hook_resume_exactly(tmp_path: Path, straight_implicit: Path,
                                                                     straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    kill_when(spawn(root, out, "--implicit", "--pause-at", "17"), "READY")
    steps = assert_root_consistent(root)
    assert steps == [5, 10, 15]  # the loop never called checkpoint_on_step: the hook found the steps

    stdout = train(root, out, "--implicit")
    assert start_of(stdout) == 15
    assert_same(straight_implicit, out)
    assert_same(straight, out)  # implicit and explicit boundaries hold the same state


def test_killed_mid_epoch_with_loader_workers_and_two_models_resumes_exactly(tmp_path: Path) -> None:
    args = ["--loader", "--workers", "2", "--two-models"]
    straight = tmp_path / "straight"
    train(tmp_path / "r0", straight, *args)
    root, out = tmp_path / "root", tmp_path / "final"
    kill_when(spawn(root, out, *args, "--pause-at", "21"), "READY")  # epoch 2, batch 5 of 8
    assert assert_root_consistent(root)[-1] == 20
    stdout = train(root, out, *args)
    assert start_of(stdout) == 20
    assert_same(straight, out)


def test_killed_while_a_background_copy_is_in_flight_resumes_exactly_from_the_previous_checkpoint(
        tmp_path: Path, straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    kill_when(spawn(root, out, "--slow-copy-at", "25"), "COPYING")  # step 25's copy had not finished
    assert assert_root_consistent(root)[-1] == 20  # nothing of step 25 committed; 20 intact
    stdout = train(root, out)
    assert start_of(stdout) == 20
    assert_same(straight, out)
