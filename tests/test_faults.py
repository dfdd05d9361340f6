"""Failures injected at each I/O step of a save: training goes on, nothing committed is damaged.

A :class:`FaultyDisk` replaces the storage layer (``weightslab.storage.atomic.DISK``) and fails the n-th
call of one operation (create, write, fsync, rename, directory fsync, mkdir) with a real errno.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.storage import atomic
from weightslab.storage.manager import CheckpointManager


class FaultyDisk(atomic.Disk):
    """The local disk, except that the ``nth`` call of ``operation`` on a path containing ``where``
    fails with ``err``."""

    def __init__(self, operation: str, nth: int = 1, err: int = errno.EIO, where: str = ""):
        self.operation, self.nth, self.err, self.where, self.calls = operation, nth, err, where, 0

    def _step(self, operation: str, path: object) -> None:
        if operation == self.operation and self.where in str(path):
            self.calls += 1
            if self.calls == self.nth:
                raise OSError(self.err, os.strerror(self.err))

    def create(self, path, **how):
        self._step("create", path)
        return super().create(path, **how)

    def write(self, f, chunk):
        self._step("write", f.name)
        return super().write(f, chunk)

    def fsync(self, f):
        self._step("fsync", f.name)
        return super().fsync(f)

    def replace(self, source, target):
        self._step("replace", target)
        return super().replace(source, target)

    def fsync_dir(self, directory):
        self._step("fsync_dir", directory)
        return super().fsync_dir(directory)

    def mkdir(self, directory):
        self._step("mkdir", directory)
        return super().mkdir(directory)


def run_with_fault(root: Path, monkeypatch, disk: FaultyDisk, *, fault_at_step: int):
    """Train 6 steps saving at each, with ``disk`` in place from ``fault_at_step`` on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    states = {}
    for step in range(1, 7):
        if step == fault_at_step:
            system.wait()
            monkeypatch.setattr(atomic, "DISK", disk)
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        assert wl.checkpoint_on_step(step) is True  # training goes on whatever the disk does
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(wl.CheckpointSaveError) as info:
        system.wait()
    return system, model, states, info.value


def assert_consistent(root: Path) -> list[int]:
    """Every visible checkpoint verifies, and no temporary file is left behind."""
    manager = CheckpointManager(root)
    assert manager.verify().ok
    assert not list(root.rglob(".tmp.*")), list(root.rglob(".tmp.*"))
    return [e.step for e in manager.checkpoints()]


PACK, MANIFEST = "objects", "checkpoints"


@pytest.mark.parametrize("operation, where, visible", [
    ("create", PACK, False),  # the pack's temporary file cannot be created
    ("write", PACK, False),  # writing the pack fails
    ("fsync", PACK, False),  # the pack cannot be made durable
    ("replace", PACK, False),  # the pack cannot be renamed into place
    ("fsync_dir", PACK, False),  # the pack is in place, its directory entry not durable: no manifest follows
    ("create", MANIFEST, False),  # the manifest's temporary file cannot be created
    ("write", MANIFEST, False),  # writing the manifest fails
    ("fsync", MANIFEST, False),
    ("replace", MANIFEST, False),  # the manifest cannot be renamed: the checkpoint never becomes visible
    ("fsync_dir", MANIFEST, True),  # the manifest is in place, the directory fsync fails: visible, reported
])
def test_a_failure_at_each_io_step_of_a_save(root: Path, monkeypatch, operation: str, where: str,
                                               visible: bool) -> None:
    nth = 1
    disk = FaultyDisk(operation, nth, where=where)
    system, model, states, error = run_with_fault(root, monkeypatch, disk, fault_at_step=4)
    assert disk.calls >= nth  # the fault really fired
    assert len(error.errors) == 1 and isinstance(error.errors[0], OSError)
    assert "Input/output error" in str(error)
    expected = [1, 2, 3, 4, 5, 6] if visible else [1, 2, 3, 5, 6]
    assert assert_consistent(root) == expected
    # the saves after the failure did not reuse anything it failed to store: they restore exactly
    for step in (5, 6, 3):
        assert system.resume(f"{system.experiment_hash}@{step}") == step
        for key, value in model.state_dict().items():
            assert torch.equal(value, states[step][key]), (step, key)
    assert system.resume("latest") == 6
    system.close()


def test_a_full_disk(root: Path, monkeypatch) -> None:
    disk = FaultyDisk("write", 1, errno.ENOSPC)
    system, model, states, error = run_with_fault(root, monkeypatch, disk, fault_at_step=3)
    assert "No space left on device" in str(error)
    assert assert_consistent(root) == [1, 2, 4, 5, 6]
    assert system.resume("latest") == 6
    system.close()


def test_a_directory_that_cannot_be_created(tmp_path: Path, monkeypatch) -> None:
    disk = FaultyDisk("mkdir", 1, errno.EACCES)
    monkeypatch.setattr(atomic, "DISK", disk)
    root = tmp_path / "root"
    model = nn.Linear(4, 4)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    assert wl.checkpoint_on_step(1) is True
    with pytest.raises(wl.CheckpointSaveError, match="Permission denied"):
        system.wait()
    assert wl.checkpoint_on_step(2) is True  # the disk works again: so does the next save
    system.wait()
    assert assert_consistent(root) == [2]
    system.close()


def test_gc_after_a_failed_save_reclaims_its_orphan_pack(root: Path, monkeypatch) -> None:
    disk = FaultyDisk("replace", 1, where=MANIFEST)  # the pack landed, the manifest did not: an orphan pack
    system, model, states, error = run_with_fault(root, monkeypatch, disk, fault_at_step=4)
    manager = CheckpointManager(root)
    before = len(manager.store.packs())
    report = wl.gc(grace_seconds=0)
    assert report.packs_deleted + report.packs_rewritten >= 1 and len(manager.store.packs()) <= before
    assert assert_consistent(root) == [1, 2, 3, 5, 6]
    system.close()
