"""Every checkpoint holds, byte for byte, the registered state at the end of its step, however the
tensors were written (weightslab/snapshot.py): through ``.data``, a numpy view, a manual SGD update,
an EMA copy; and the background copy of parameters is waited for before the next step changes them.

Each test checkpoints at every step and compares every checkpoint with the live state captured at
its step, not just the last one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.snapshot import BufferPool, Snapshotter, TornCopyError
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors


def checkpoints(root: Path) -> dict[int, dict[str, torch.Tensor]]:
    """step -> every tensor of the checkpoint of that step, read back verified."""
    manager = CheckpointManager(root)
    return {e.step: load_tensors(manager, manager.read_manifest(e)) for e in manager.checkpoints()}


def live(model: nn.Module, name: str = "main") -> dict[str, torch.Tensor]:
    return {f"models/{name}/{k}": v.detach().clone() for k, v in model.state_dict().items()}


def assert_holds(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], step: int) -> None:
    for key, value in expected.items():
        assert torch.equal(saved[key], value), f"checkpoint of step {step}: {key} does not hold the live bytes"


# --- whatever way the tensors were written ------------------------------------------------------------

def test_embedding_rows_written_through_data_are_in_every_checkpoint(root: Path):
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(emb)
    expected = {}
    for step in range(1, 26):
        emb.weight.data[(step * 37) % 1000] += 1  # one row: no version counter moves, no sample sees it
        expected[step] = live(emb)
        wl.checkpoint_on_step(step)
    system.wait()
    saved = checkpoints(root)
    assert sorted(saved) == list(range(1, 26))
    for step, state in expected.items():
        assert_holds(saved[step], state, step)
    system.close()


def test_manual_sgd_through_data_and_numpy_views_are_in_every_checkpoint(root: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)  # no optimizer: the loop updates the parameters itself
    expected = {}
    for step in range(1, 23):
        model.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.05)  # manual SGD
        model[2].bias.detach().numpy()[0] += 0.25  # a write through a numpy view
        expected[step] = live(model)
        wl.checkpoint_on_step(step)
    system.wait()
    saved = checkpoints(root)
    for step, state in expected.items():
        assert_holds(saved[step], state, step)
    system.close()


def test_an_ema_copy_updated_through_data_is_in_every_checkpoint(root: Path):
    torch.manual_seed(0)
    model = nn.Linear(6, 6)
    ema = nn.Linear(6, 6)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model("model", model)
    wl.register_model("ema", ema)
    wl.register_optimizer(opt)
    expected = {}
    for step in range(1, 21):
        opt.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
        for e, p in zip(ema.parameters(), model.parameters()):
            e.data.mul_(0.9).add_(p.data, alpha=0.1)
        expected[step] = {**live(model, "model"), **live(ema, "ema")}
        wl.checkpoint_on_step(step)
    system.wait()
    saved = checkpoints(root)
    for step, state in expected.items():
        assert_holds(saved[step], state, step)
    system.close()


def test_batchnorm_running_stats_are_those_of_the_step_while_parameters_copy_in_the_background(root: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    expected = {}
    for step in range(1, 21):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()  # this forward moves the running stats
        opt.step()
        expected[step] = {**live(model), **{f"optimizers/main/state/{i}/{k}": v.clone()
                                             for i, s in opt.state_dict()["state"].items() for k, v in s.items()}}
        wl.checkpoint_on_step(step)  # the next forward runs while the parameters are being copied
    system.wait()
    saved = checkpoints(root)
    for step, state in expected.items():
        assert_holds(saved[step], state, step)
    system.close()


# --- the background copy is waited for ----------------------------------------------------------------

class SlowToCopy(nn.Parameter):
    """A parameter whose copy by weightslab's copier thread takes a second or so (every operation
    on it there takes 0.3 s): long enough that an optimizer step that did not wait for the copy
    would change it first."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if threading.current_thread().name == "weightslab-copier":
            time.sleep(0.3)
        # (the default Tensor behaviour, which keeps the subclass, where nn.Parameter turns it off)
        return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs or {})


def test_the_next_optimizer_step_waits_for_the_copy(root: Path):
    model = nn.Linear(4, 4)
    model.weight = SlowToCopy(model.weight.detach().clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    at_one = model.weight.detach().clone()
    wl.checkpoint_on_step(1)
    opt.step()  # right after the boundary, no forward in between: the pre-step hook must wait
    assert not torch.equal(model.weight.detach(), at_one)
    system.wait()
    assert torch.equal(checkpoints(root)[1]["models/main/weight"], at_one)
    system.close()


def test_an_in_place_change_during_the_copy_fails_that_checkpoint_instead_of_tearing_it(root: Path, caplog):
    model = nn.Linear(4, 4)
    model.weight = SlowToCopy(model.weight.detach().clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.checkpoint_on_step(1)
    with torch.no_grad():
        model.weight.add_(1.0)  # between the boundary and the next step, while the copy runs
    with pytest.raises(wl.CheckpointSaveError, match="changed in place while its copy was in flight") as info:
        system.wait()
    assert isinstance(info.value.errors[0], TornCopyError)
    assert checkpoints(root) == {}  # nothing torn was committed
    wl.checkpoint_on_step(2)  # training goes on: the next checkpoint is whole
    system.wait()
    assert torch.equal(checkpoints(root)[2]["models/main/weight"], model.weight.detach())
    system.close()


def test_without_a_registered_optimizer_everything_is_copied_at_the_boundary(root: Path):
    model = nn.Linear(4, 4)
    model.weight = SlowToCopy(model.weight.detach().clone())
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)  # no optimizer: the loop writes the parameters itself, anywhere
    wl.checkpoint_on_step(1)
    at_one = model.weight.detach().clone()
    model.weight.data[0] += 1.0  # right after the boundary, before any forward
    system.wait()
    assert torch.equal(checkpoints(root)[1]["models/main/weight"], at_one)
    system.close()


def test_overlap_off_copies_everything_at_the_boundary(root: Path):
    model = nn.Linear(4, 4)
    model.weight = SlowToCopy(model.weight.detach().clone())
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False, overlap=False)
    wl.register_model(model)
    wl.checkpoint_on_step(1)
    at_one = model.weight.detach().clone()
    model.weight.data.add_(1.0)  # a loop that changes parameters right after the boundary
    system.wait()
    assert torch.equal(checkpoints(root)[1]["models/main/weight"], at_one)
    system.close()


# --- the snapshotter itself ------------------------------------------------------------------------------

def test_buffers_are_reused_from_one_snapshot_to_the_next():
    snapshotter = Snapshotter()
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(10)}
    first = snapshotter.take(tensors, later={"a"})
    first.copied()
    pointers = {k: t.data_ptr() for k, t in first.copies.items()}
    assert all(torch.equal(first.copies[k], tensors[k]) for k in tensors)
    snapshotter.release(first)
    tensors["a"].add_(1)
    second = snapshotter.take(tensors, later={"a"})
    second.before_mutation()
    assert {k: t.data_ptr() for k, t in second.copies.items()} == pointers  # no fresh memory
    assert torch.equal(second.copies["a"], tensors["a"])
    snapshotter.release(second)
    assert snapshotter.pool.nbytes == sum(t.nbytes for t in tensors.values())
    snapshotter.close()
    assert snapshotter.pool.nbytes == 0


def test_aliases_share_one_copy_and_an_alias_of_a_buffer_is_copied_at_once():
    snapshotter = Snapshotter()
    weight = torch.randn(5, 3)
    snap = snapshotter.take({"encoder": weight, "decoder": weight, "other": torch.zeros(2)}, later={"encoder"})
    assert snap.copies["encoder"] is snap.copies["decoder"]
    assert snap.pending is None  # "decoder" is not step-only, so the shared copy was made at once
    assert snap.copied_bytes == weight.nbytes + 8
    snapshotter.release(snap)
    snapshotter.close()


def test_buffer_pool_keys_by_shape_and_dtype():
    pool = BufferPool()
    a = pool.lease(torch.zeros(3, dtype=torch.float16))
    pool.give_back([a])
    assert pool.lease(torch.zeros(3, dtype=torch.float32)) is not a
    assert pool.lease(torch.zeros(3, dtype=torch.float16)) is a
