"""Issue 16, the training side: nothing committed is replaced without a word, a resume changes nothing
unless it can finish, and bad input at the API is refused at the call.

- two processes training one experiment into one root: one writes, the other is refused; a killed
  holder (even one whose forked child lives on) does not block the next run;
- a run that moves into an experiment another live process writes goes on training, its saves fail;
- a step saved twice, or going backwards, keeps the first checkpoint; a run resumed from an earlier
  checkpoint, or started fresh where checkpoints are, writes into a branch;
- a resume whose custom setter raises, whose experiment record is damaged or whose experiment is
  written by another process leaves every registered object as it was;
- steps beyond what the catalog stores, unusable metrics and misread register_* arguments.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weightslab as wl
from weightslab.fingerprint import ExperimentHashGenerator
from weightslab.storage.layout import Layout
from weightslab.storage.manifest import seal

from .support import child_env, make_model, manifests, read_manifest, run_python

# A small training run in its own process: ``--gate FILE`` waits for FILE before the first step (so
# that two of them start training at once), ``--pause-at N`` waits on stdin after step N's checkpoint
# is durable (printing READY), ``--fork-child`` forks a child there that outlives it (as DataLoader
# workers do for a few seconds), ``--resume`` resumes first.
HOLDER = r'''
import argparse, os, sys, time
import torch
import weightslab as wl

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--frequency", type=int, default=1)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--gate")
p.add_argument("--pause-at", type=int)
p.add_argument("--fork-child", action="store_true")
p.add_argument("--resume", action="store_true")
a = p.parse_args()
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=a.lr)
system = wl.get_checkpoint_system(root_log_dir=a.root, checkpoint_frequency=a.frequency, preempt_signals=())
wl.register_model(model)
wl.register_optimizer(opt)
wl.register_hyperparams("config", {"lr": a.lr})
start = system.resume() if a.resume else 0
print("START", start, flush=True)
if a.gate:
    while not os.path.exists(a.gate):
        time.sleep(0.002)
data = torch.Generator().manual_seed(a.seed)
for step in range(start + 1, a.steps + 1):
    loss = model(torch.randn(8, 4, generator=data)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    wl.checkpoint_on_step(step)
    print("STEP", step, flush=True)
    if step == a.pause_at:
        if a.fork_child:
            child = os.fork()
            if child == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                time.sleep(120)
                os._exit(0)
            print("CHILD", child, flush=True)
        system.wait()
        print("READY", flush=True)
        sys.stdin.readline()
    time.sleep(a.sleep)
system.close()
print("DONE", system.experiment_hash, flush=True)
'''


def holder(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(root), *args], env=child_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.strip())
        if line.strip() == marker:
            return seen
    raise AssertionError(f"the process ended before {marker}: {seen}\n{proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate("\n", timeout=120)
    return out, err


def runs(root: Path) -> dict[str, set[str]]:
    """``{experiment: the runs that wrote its manifests}``."""
    return {h: {read_manifest(root, h, s)["run"] for s in steps} for h, steps in manifests(root).items()}


def setup(root: Path, *, frequency: int | None = 1, lr: float = 0.1, like_holder: bool = False, **settings):
    """A run in this process; ``like_holder``: of the same experiment as HOLDER with the same ``lr``."""
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=frequency, **settings)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4) if like_holder else make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    wl.register_model(model)
    wl.register_optimizer(opt)
    config = wl.register_hyperparams("config", {"lr": lr})
    return system, model, opt, config


def train(model, opt) -> None:
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 4. one experiment, one writer -----------------------------------------------------------------

def test_two_processes_training_one_experiment_at_once_never_interleave(tmp_path: Path) -> None:
    root, gate = tmp_path / "root", tmp_path / "go"
    procs = [holder(root, "--seed", str(seed), "--gate", str(gate), "--sleep", "0.05") for seed in (1, 2)]
    for proc in procs:
        read_until(proc, "START 0")
    gate.touch()  # both take their first step now
    results = [finish(proc) for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 1], results
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    error = results[loser][1]
    assert "ExperimentInUseError" in error and "is being written by another live process" in error
    assert f"pid {procs[winner].pid} on host" in error  # who holds it
    assert "Stop the other run, give this one another root_log_dir, or" in error  # and what to do
    assert "STEP" not in results[loser][0]  # refused at its first step: it trained nothing
    # Every manifest left is the winner's: one trajectory, all 20 steps of it.
    (exp, steps), = manifests(root).items()
    assert steps == list(range(1, 21))
    assert len(runs(root)[exp]) == 1
    assert results[winner][0].split()[-1] == exp


def test_a_killed_holder_does_not_block_the_next_run_even_with_a_forked_child_alive(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = holder(root, "--pause-at", "3", "--fork-child")
    lines = read_until(proc, "READY")
    child = int(next(line.split()[1] for line in lines if line.startswith("CHILD")))
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        os.kill(child, 0)  # the holder's forked child still runs (it shared the lock's file)
        done = run_python(HOLDER, args=[str(root), "--resume", "--steps", "6"])
        assert "START 3" in done.stdout and "DONE" in done.stdout
        os.kill(child, 0)  # ... all along
    finally:
        os.kill(child, signal.SIGKILL)
    (exp, steps), = manifests(root).items()
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len({read_manifest(root, exp, s)["run"] for s in (4, 5, 6)}) == 1


def test_a_run_moving_into_an_experiment_another_process_writes_goes_on_and_its_saves_fail(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    # The other process trains lr=0.2 (no checkpoint yet) and holds that experiment.
    other = holder(root, "--lr", "0.2", "--frequency", "1000", "--pause-at", "1", "--steps", "3")
    read_until(other, "READY")
    try:
        system, model, opt, config = setup(root, like_holder=True)
        for step in (1, 2):
            train(model, opt)
            assert wl.checkpoint_on_step(step) is True
        first = system.experiment_hash
        config["lr"] = 0.2  # now this run hashes to the other process's experiment
        with caplog.at_level(logging.WARNING):
            for step in (3, 4):
                train(model, opt)
                assert wl.checkpoint_on_step(step) is False  # training goes on; nothing is written there
        held = system.experiment_hash
        assert held != first
        assert f"the run moves into experiment {held}" in caplog.text
        with pytest.raises(wl.CheckpointSaveError, match="being written by another live process") as info:
            system.wait()
        assert len(info.value.errors) == 2  # both saves, kept (said once)
    finally:
        out, err = finish(other)
    assert other.returncode == 0, err
    assert f"DONE {held}" in out
    # The other process wrote its final checkpoint there; this run may not follow it in.
    train(model, opt)
    assert wl.checkpoint_on_step(5) is False
    with pytest.raises(wl.CheckpointSaveError, match="another run wrote while this run waited"):
        system.wait()
    config["lr"] = 0.1  # back where this run writes
    train(model, opt)
    assert wl.checkpoint_on_step(6) is True
    system.close()
    assert manifests(root) == {first: [1, 2, 6], held: [3]}
    assert len(runs(root)[held]) == 1 and runs(root)[held] != runs(root)[first]


def test_a_lock_file_planted_as_a_link_is_never_written_through(root: Path, tmp_path: Path, caplog) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    system, model, opt, config = setup(root)
    h = ExperimentHashGenerator().fingerprint({"main": model}, {"config": config}).hash  # what it will claim
    (root / "checkpoints").mkdir(parents=True)
    os.symlink(victim, root / "checkpoints" / f"{h}.lock")
    with caplog.at_level(logging.WARNING):
        train(model, opt)
        assert wl.checkpoint_on_step(1) is True  # no lock here: said, and the run goes on
    system.close()
    assert "cannot lock" in caplog.text and "cannot tell whether another process writes" in caplog.text
    assert victim.read_text() == "precious"
    assert manifests(root) == {h: [1]}


# --- 5. a committed checkpoint is never replaced -----------------------------------------------------

def test_the_same_step_twice_keeps_the_first_checkpoint_and_says_so_once(root: Path, caplog) -> None:
    system, model, opt, _ = setup(root)
    train(model, opt)
    assert wl.checkpoint_on_step(10) is True
    first = weights(model)
    h = system.experiment_hash
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            train(model, opt)  # an optimizer step in between
            assert wl.checkpoint_on_step(10) is False
    system.wait()
    assert same(wl.load(f"{h}@10", root=root)["models"]["main"], first)
    assert caplog.text.count("exists already") == 1
    assert f"checkpoint {h}@10 exists already (this run took it" in caplog.text
    assert "a step that keeps growing" in caplog.text
    system.close()


def test_a_change_forced_at_a_saved_step_retakes_it_only_if_no_optimizer_step_came_since(root: Path, caplog) -> None:
    system, model, opt, _ = setup(root, frequency=10)
    train(model, opt)
    assert wl.checkpoint_on_step(10) is True
    h = system.experiment_hash
    model[0].requires_grad_(False)
    with caplog.at_level(logging.INFO):
        assert wl.checkpoint_on_state_change("freeze") is True  # the same boundary: its checkpoint, with the change
    assert f"checkpoint {h}@10 is taken again with the change forced at its step" in caplog.text
    system.wait()
    assert read_manifest(root, h, 10)["state"]["models"]["main"]["frozen"] == ["0.weight", "0.bias"]
    kept = Layout(root).manifest(h, 10).read_bytes()
    train(model, opt)  # an optimizer step: the state is no longer step 10's
    model[1].eval()
    with caplog.at_level(logging.WARNING):
        assert wl.checkpoint_on_state_change("eval") is False
    system.close()
    assert f"checkpoint {h}@10 exists already" in caplog.text and "came since" in caplog.text
    assert Layout(root).manifest(h, 10).read_bytes() == kept


def test_a_step_going_backwards_never_replaces_the_checkpoint_of_that_step(root: Path, caplog) -> None:
    system, model, opt, _ = setup(root, frequency=10)
    for step in (10, 20):
        train(model, opt)
        wl.checkpoint_on_step(step)
    system.wait()
    h = system.experiment_hash
    before = Layout(root).manifest(h, 10).read_bytes()
    with caplog.at_level(logging.WARNING):
        train(model, opt)
        assert wl.checkpoint_on_step(10) is False
    system.close()
    assert "went backwards" in caplog.text and f"{h}@10 exists already" in caplog.text
    assert Layout(root).manifest(h, 10).read_bytes() == before
    assert manifests(root) == {h: [10, 20]}


def test_a_run_resumed_from_an_earlier_checkpoint_continues_in_a_branch(root: Path, caplog) -> None:
    system, model, opt, _ = setup(root, frequency=10, save_on_close=False)
    for step in range(1, 31):
        train(model, opt)
        wl.checkpoint_on_step(step)
    h = system.experiment_hash
    system.close()
    later = Layout(root).manifest(h, 30).read_bytes()

    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=10, save_on_close=False)
    assert system.resume(f"{h}@30") == 30  # (a script may resume several checkpoints in turn)
    assert system.resume(f"{h}@20") == 20
    assert system.experiment_hash == h  # where the checkpoint is, until the run trains on from it
    with caplog.at_level(logging.WARNING):
        for step in range(21, 31):
            train(model, opt)
            wl.checkpoint_on_step(step)
    branch = system.experiment_hash
    assert branch != h
    assert caplog.text.count(f"experiment {h} holds 1 checkpoints after step 20") == 1 and branch in caplog.text
    system.close()
    assert Layout(root).manifest(h, 30).read_bytes() == later  # the other trajectory's @30 is intact
    assert manifests(root) == {h: [10, 20, 30], branch: [30]}
    record = json.loads(Layout(root).experiment_record(branch).read_text())
    assert record["parent"]["ref"] == f"{h}@20" and record["parent"]["reason"] == "rewind"
    assert record["branch"] == "rewind-1"
    # "latest" with these settings finds the newest checkpoint of the lineage: the branch's.
    system = wl.get_checkpoint_system(root_log_dir=root, save_on_close=False)
    assert system.resume() == 30 and system.experiment_hash == branch
    assert same(weights(model), wl.load(f"{branch}@30", root=root)["models"]["main"])
    system.close()


def test_a_fresh_run_where_checkpoints_are_writes_into_a_branch(root: Path, caplog) -> None:
    written = {}
    for run in range(3):
        system, model, opt, _ = setup(root, save_on_close=False)
        with caplog.at_level(logging.WARNING):
            for step in (1, 2):
                train(model, opt)
                wl.checkpoint_on_step(step)
        written[run] = system.experiment_hash
        system.close()
        wl.unregister("main")
        wl.unregister("config")
    first, second, third = written.values()
    assert len({first, second, third}) == 3
    assert {h: steps for h, steps in manifests(root).items()} == {first: [1, 2], second: [1, 2], third: [1, 2]}
    assert f"experiment {first} already holds 2 checkpoints (up to step 2) from an earlier run" in caplog.text
    for h, branch in ((second, "restart-1"), (third, "restart-2")):
        record = json.loads(Layout(root).experiment_record(h).read_text())
        assert record["branch"] == branch
        assert record["parent"]["ref"] == f"{first}@2" and record["parent"]["reason"] == "restart"
    assert all(len(r) == 1 for r in runs(root).values()) and len(set().union(*runs(root).values())) == 3


# --- 9. a resume changes nothing unless it can finish -----------------------------------------------

def test_a_setter_that_raises_leaves_every_object_as_it_was(root: Path) -> None:
    system, model, opt, config = setup(root)
    box = {"episodes": 3}
    wl.register_state("env", lambda: dict(box), lambda s: box.update(s))
    for step in (1, 2, 3):
        train(model, opt)
        wl.checkpoint_on_step(step)
    system.close()

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    config["lr"] = 0.1
    before = (weights(model), opt.state_dict()["state"][0]["momentum_buffer"] if opt.state_dict()["state"] else None)

    def broken(state) -> None:
        raise RuntimeError("the environment is gone")

    wl.register_state("env", lambda: dict(box), broken)
    rng = torch.get_rng_state()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    with pytest.raises(wl.StateError) as info:
        system.resume()
    message = str(info.value)
    assert "restoring custom state 'env' failed: RuntimeError: the environment is gone" in message
    assert "model 'main'" in message and "is back as it was before the resume" in message
    assert same(weights(model), before[0])  # the model was restored, then put back
    assert opt.state_dict()["state"] == {} and config == {"lr": 0.1}
    assert torch.equal(torch.get_rng_state(), rng) and system.start_step == 0
    wl.register_state("env", lambda: dict(box), lambda s: box.update(s))  # fixed: the resume works
    assert system.resume() == 3 and box == {"episodes": 3}
    system.close()


def test_a_damaged_experiment_record_fails_the_resume_before_anything_changes(root: Path) -> None:
    system, model, opt, _ = setup(root)
    for step in (1, 2):
        train(model, opt)
        wl.checkpoint_on_step(step)
    h = system.experiment_hash
    system.close()
    path = Layout(root).experiment_record(h)
    body = json.loads(path.read_text())
    del body["digest"]
    body.update(branch="zz", architecture=[5])  # sealed again: its digest is right, its content is not
    path.write_bytes(seal(body))
    with torch.no_grad():
        model[0].weight.fill_(7.0)
    before = weights(model)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    with pytest.raises(wl.CorruptCheckpointError, match="experiment record"):
        system.resume(f"{h}@2")
    assert same(weights(model), before) and system.start_step == 0
    system.close()


def test_a_resume_into_an_experiment_another_process_writes_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    other = holder(root, "--pause-at", "2", "--steps", "4")
    read_until(other, "READY")
    try:
        # the other process's experiment: the same architecture and settings
        system, model, _, _ = setup(root, like_holder=True, save_on_close=False)
        before = weights(model)
        with pytest.raises(wl.WeightslabError, match="being written by another live process") as info:
            system.resume()
        assert f"pid {other.pid}" in str(info.value)
        assert same(weights(model), before) and system.start_step == 0
        with pytest.raises(wl.WeightslabError, match="being written by another live process"):
            wl.checkpoint_on_step(1)  # nor does its first step write there
        system.close()
    finally:
        out, err = finish(other)
    assert other.returncode == 0, err
    (exp, steps), = manifests(root).items()
    assert steps == [1, 2, 3, 4] and len(runs(root)[exp]) == 1


# --- 10 and smaller: bad input at the call -----------------------------------------------------------

def test_steps_beyond_what_the_catalog_stores_are_refused_at_the_call(root: Path) -> None:
    system, model, opt, _ = setup(root)
    with pytest.raises(wl.InvalidStepError, match=r"<= 2\*\*63 - 1"):
        wl.checkpoint_on_step(2**63)
    assert wl.checkpoint_on_step(2**63 - 1) is True
    system.close()
    assert list(manifests(root).values()) == [[2**63 - 1]]


@pytest.mark.parametrize("metrics, expected", [
    ({"": 1.0}, "non-empty strings, got ''"),
    ({"acc": torch.tensor([0.5, 0.7])}, r"metric 'acc' is a tensor of 2 elements"),
    ({"big": 10**400}, r"metric 'big' cannot be taken as a float \(OverflowError"),
])
def test_unusable_metrics_are_refused_naming_the_metric(root: Path, metrics, expected) -> None:
    system, *_ = setup(root)
    with pytest.raises(wl.InvalidMetricsError, match=expected):
        wl.checkpoint_on_step(1, metrics=metrics)
    system.close()
    assert manifests(root) == {}


@pytest.mark.parametrize("call, expected", [
    (lambda: wl.register_model("bad", None), r"register_model\('bad', None\): the model to register is None"),
    (lambda: wl.register_dataloader("bad", None), r"register_dataloader\('bad', None\)"),
    (lambda: wl.register_optimizer("bad"), r"register_optimizer\('bad'\) got a name but no optimizer"),
    (lambda: wl.register_scheduler(None), "needs the object to register, got None"),
    (lambda: wl.register_model(torch.nn.Linear(1, 1), "net"), r"the name comes first; call register_model\('net'"),
    (lambda: wl.register_hyperparams("config", None), "the hyperparams to register is None"),
])
def test_misread_register_arguments_say_what_was_passed_and_how_to_call(call, expected) -> None:
    with pytest.raises(wl.RegistrationError, match=expected) as info:
        call()
    assert "register_" in str(info.value) and "(name, " in str(info.value) or "comes first" in str(info.value)
    assert wl.list_registered() == {}
