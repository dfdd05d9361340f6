"""The command line on hostile input: every error is one line on stderr with its documented exit code.

Errors that are not weightslab's (the operating system's: a name too long, a file where a
directory belongs) once printed a traceback and exited 1, which the exit codes document as
"verify found damaged checkpoints". They are exit 6 now, like every other error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import weightslab as wl

from .support import run_cli


@pytest.fixture
def saved_root(root: Path) -> Path:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(nn.Linear(3, 2))
    wl.checkpoint_on_step(1)
    system.close()
    return root


def _one_line_error(proc, code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightslab: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_path_component_over_255_characters(tmp_path: Path) -> None:
    _one_line_error(run_cli("--root", str(tmp_path / ("a" * 300)), "ls"), 6, "file name too long")


def test_export_to_a_directory_names_a_file_to_pass_instead(saved_root: Path, tmp_path: Path) -> None:
    _one_line_error(run_cli("export", "latest", str(tmp_path), root=saved_root), 6, "it is a directory",
                    str(tmp_path / "model.safetensors"))


def test_export_below_a_file(saved_root: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    proc = run_cli("export", "latest", str(tmp_path / "afile" / "x.safetensors"), root=saved_root)
    _one_line_error(proc, 6, "not a directory")
    assert (tmp_path / "afile").read_text() == ""


def test_a_root_whose_checkpoints_directory_is_a_file(saved_root: Path) -> None:
    shutil.rmtree(saved_root / "checkpoints")
    (saved_root / "checkpoints").write_text("not a directory")
    for command in ("ls", "verify", "log"):
        _one_line_error(run_cli(command, root=saved_root), 6, "checkpoints", "not a directory")


def test_the_exported_weights_are_unchanged_by_the_new_checks(saved_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    proc = run_cli("export", "latest", str(out), root=saved_root)
    assert proc.returncode == 0, proc.stderr
    assert set(load_file(str(out))) == {"weight", "bias"}
    assert load_file(str(out))["weight"].dtype == torch.float32


def test_an_export_sweeps_what_a_killed_export_left_beside_its_output(saved_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "exports"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    left = out / f".tmp.{dead}.0123456789ab.w.safetensors"  # what SIGKILL left mid-export
    left.write_bytes(b"\0" * 4096)
    others = [out / f".tmp.{dead}.0123456789ab.other.safetensors",  # another output's: not this export's
              out / f".tmp.{os.getpid()}.0123456789ab.w.safetensors",  # a live writer's
              out / ".tmp.notes"]  # not ours at all
    for path in others:
        path.write_bytes(b"keep")
    proc = run_cli("export", "latest", str(out / "w.safetensors"), root=saved_root)
    assert proc.returncode == 0, proc.stderr
    assert not left.exists()
    assert all(path.read_bytes() == b"keep" for path in others)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".tmp.")) == ["w.safetensors"]
