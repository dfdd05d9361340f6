"""torch.distributed on CPU: two real gloo ranks in subprocesses. Until ranks are coordinated
(issue 8), only rank 0 writes; every rank resumes from its checkpoints, and a DDP run killed and
resumed ends bit for bit where an uninterrupted one does, on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightslab.manager import CheckpointManager

from .conftest import DETERMINISTIC_ENV, REPO

SCRIPT = REPO / "tests" / "scripts" / "ddp_train.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _run_ranks(tmp: Path, root: Path, out: Path, *extra: str, world: int = 2) -> list[str]:
    init = tmp / f"init-{out.name}"
    env = {**os.environ, **DETERMINISTIC_ENV, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), str(rank), str(world), str(init),
                               *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, f"rank failed ({p.returncode}):\n{stdout}\n{stderr}"
    return [stdout + stderr for stdout, stderr in results]


def _params(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def test_only_rank_0_writes_and_a_resumed_ddp_run_matches_an_uninterrupted_one(tmp_path):
    straight = tmp_path / "straight"
    _run_ranks(tmp_path, tmp_path / "root0", straight, "--steps", "8")

    root, out = tmp_path / "root", tmp_path / "final"
    logs = _run_ranks(tmp_path, root, tmp_path / "first", "--steps", "5")  # checkpoints at 2 and 4
    for rank, log in enumerate(logs):
        assert f"only rank 0 writes checkpoints (this is rank {rank})" in log
    manager = CheckpointManager(root)
    entries = manager.checkpoints()
    assert [e.step for e in entries] == [2, 4]  # once per step, not once per rank
    runs = {json.loads(e.path.read_text())["run"] for e in entries}
    assert len(runs) == 1  # all written by one process
    assert manager.verify().ok

    logs = _run_ranks(tmp_path, root, out, "--steps", "8", "--resume")
    assert all("starts at 4" in log for log in logs)
    for rank in range(2):
        final, expected = _params(out, rank), _params(straight, rank)
        assert final.keys() == expected.keys()
        for key in expected:
            assert torch.equal(final[key], expected[key]), (rank, key)
    assert [e.step for e in CheckpointManager(root).checkpoints()] == [2, 4, 6, 8]
