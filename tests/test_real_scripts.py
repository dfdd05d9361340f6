"""What real training scripts do that the four-line example does not, and what it needs to keep working.

A script nobody here wrote (examples/manual_sgd_lm.py is written after it: manual SGD through
``.data``, batch indices instead of a DataLoader, an annealed local ``lr``, a carried LSTM hidden
state, an EMA copy, ``torch.save(model)``, ``vars(args)`` registered as the config) is killed and
resumed; and each thing it broke has its own test: a registered model deep-copied and pickled
whole, a resume given other command-line values for keys excluded from the experiment, a final
checkpoint at ``close()`` in a loop with no optimizer to hook.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import pickle
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

from .support import REPO, run_python

SCRIPT = REPO / "examples" / "manual_sgd_lm.py"


def _final(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("FINAL"))


def _reasons(root: Path) -> dict[int, list[str]]:
    manager = CheckpointManager(root)
    return {e.step: json.loads(e.path.read_text())["reasons"] for e in manager.checkpoints()}


# --- the script itself ------------------------------------------------------------------------------

def test_a_hand_written_lm_script_killed_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    straight = run_python(script=SCRIPT, args=["--root", str(tmp_path / "r0")], cwd=tmp_path, timeout=300)
    # 54 steps, a checkpoint every 10, and the last one at close() although no optimizer is hooked
    assert _final(straight.stdout).startswith("FINAL step 54 ")
    assert _reasons(tmp_path / "r0") == {10: ["step"], 20: ["step"], 30: ["step"], 40: ["step"], 50: ["step"],
                                         54: ["exit"]}
    root = tmp_path / "r1"
    killed = run_python(script=SCRIPT, args=["--root", str(root), "--kill-at", "52"], cwd=tmp_path, timeout=300,
                        check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Started with other values of keys excluded from the experiment: a resume must leave them as
    # given (the old --kill-at would kill this run again), and restore what the run learnt (the lr
    # annealed at step 45, the hidden state, the EMA copy).
    resumed = run_python(script=SCRIPT, args=["--root", str(root), "--save", "other.pt", "--log-interval", "1"],
                         cwd=tmp_path, timeout=300)
    assert "RESUMED 50" in resumed.stdout
    assert "step 51: loss" in resumed.stdout  # log_interval kept the value this process was given
    assert _final(resumed.stdout) == _final(straight.stdout)
    assert (tmp_path / "best-model.pt").exists()  # torch.save(model) of a registered model worked


# --- 1. a registered model is deep-copied and pickled whole --------------------------------------------

def test_a_registered_model_deep_copies_and_its_copy_fires_nothing(root: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_scheduler(sched)
    x = torch.randn(16, 4)
    ema = None
    for _ in range(3):  # no checkpoint_on_step: the optimizer's hook finds the boundaries
        model(x).pow(2).mean().backward()
        opt.step()  # the boundary: the save is completed at the next forward of the registered model
        opt.zero_grad()
        ema = copy.deepcopy(model) if ema is None else ema  # a copy of a hooked, registered model
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9).add_(p, alpha=0.1)
            ema(x)  # the copy's forward must not complete the save: the scheduler has not stepped yet
        sched.step()
    model(x)
    system.wait()
    manager = CheckpointManager(root)
    saved = {e.step: manager.read_manifest(e).state["schedulers"]["main"]["last_epoch"]
             for e in manager.checkpoints()}
    assert saved == {1: 1, 2: 2, 3: 3}  # each after its step's sched.step(), not before
    assert copy.deepcopy(opt).state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    system.close()


def test_a_registered_model_pickled_whole_loads_where_weightslab_is_not_installed(root: Path, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    x = torch.randn(3, 4)
    model(x).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"weightslab" not in buf.getvalue()  # the hook is not carried into the pickle
    assert b"weightslab" not in pickle.dumps(model)
    path = tmp_path / "model.pt"
    path.write_bytes(buf.getvalue())
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    run_python("import sys, torch\n"
               "sys.modules['weightslab'] = None  # importing it fails: as where it is not installed\n"
               f"model = torch.load({str(path)!r}, weights_only=False)\n"
               f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
               "assert torch.equal(model(x), y)\n")
    system.close()


# --- 2. a resume leaves the keys excluded from the experiment ------------------------------------------

def test_a_resume_keeps_this_processs_values_of_excluded_keys(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(4, 2)
    args = argparse.Namespace(lr=0.1, kill_at=5, save="run1.pt", log_interval=10, data={"device": "cpu", "width": 8})
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, exclude_keys=["kill_at", "save"])
    wl.register_model(model)
    config = wl.register_hyperparams("config", vars(args))
    for step in (1, 2, 3):
        wl.checkpoint_on_step(step)
    exp = system.experiment_hash
    system.close()

    # A new process, started with other values: excluded keys (by name at any depth, default ones
    # like log_interval and device included) keep them; the keys that define the experiment do not.
    config.update(kill_at=0, save="run2.pt", log_interval=1, lr=0.5)
    config["data"].update(device="cuda", width=16)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, exclude_keys=["kill_at", "save"])
    with caplog.at_level(logging.INFO, logger="weightslab"):
        assert system.resume(f"{exp}@3") == 3
    assert vars(args) == {"lr": 0.1, "kill_at": 0, "save": "run2.pt", "log_interval": 1,
                          "data": {"device": "cuda", "width": 8}}
    assert system.experiment_hash == exp  # excluded keys are not the experiment: still the same one
    assert "config.kill_at, config.save, config.log_interval, config.data.device" in caplog.text
    system.close()


# --- 3. the final checkpoint of a loop with no hooked optimizer ------------------------------------------

def test_a_manual_sgd_loop_gets_its_last_step_saved_at_close(root: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=10)
    wl.register_model(model)
    for step in range(1, 24):
        model(torch.randn(5, 6)).pow(2).mean().backward()
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.01)
            p.grad = None
        wl.checkpoint_on_step(step)
    system.close()
    assert _reasons(root) == {10: ["step"], 20: ["step"], 23: ["exit"]}
    manager = CheckpointManager(root)
    saved = load_tensors(manager, manager.read_manifest(manager.checkpoints()[-1]))
    for key, value in model.state_dict().items():
        assert torch.equal(saved[f"models/main/{key}"], value), key


def test_a_final_checkpoint_skipped_for_a_reason_is_a_warning_that_says_it(root: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=10)
    wl.register_model(model)
    wl.register_optimizer(opt)
    for step in range(1, 4):
        model(torch.randn(5, 6)).sum().backward()
        opt.step()
        wl.checkpoint_on_step(step)
    model(torch.randn(5, 6)).sum().backward()
    opt.step()  # an update after the last reported step: the state is no longer step 3's
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        system.close()
    assert _reasons(root) == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no final checkpoint at close" in r.getMessage() and "after the last step boundary (step 3)"
               in r.getMessage() for r in warnings), caplog.text
