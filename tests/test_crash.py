"""Kills at random moments (a fixed seed), many times: everything committed verifies, resumes are exact.

The long version: ``python tests/crash_soak.py --kills 1000``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .crash_soak import run_soak

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def test_random_kills_with_a_loader_mid_epoch_and_two_models(tmp_path: Path) -> None:
    report = run_soak(tmp_path, kills=10, seed=11, max_steps_per_round=5,
                      args=["--steps", "40", "--frequency", "1", "--loader", "--two-models", "--ballast", "8",
                            "--page-cache"])
    assert report.kills == 10
    # (through the page cache a pack takes longer to write than with O_DIRECT: kills land in it)
    assert report.mid_write >= 1, "no kill landed in the middle of a write: the test lost its point"
    assert len(set(report.resumed_from)) >= 5


def test_random_kills_of_a_loop_checkpointed_by_the_optimizer_hook(tmp_path: Path) -> None:
    report = run_soak(tmp_path, kills=7, seed=23, max_steps_per_round=5,
                      args=["--steps", "40", "--frequency", "1", "--implicit", "--ballast", "8"])
    assert report.kills == 7
