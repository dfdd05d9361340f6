"""The events of a checkpoint system (weightslab.events): every event's payload, the thread callbacks
run on, their order, what a failing or slow callback does (nothing to training), and that ``saved``
comes only once the checkpoint is durable (a process killed inside its callback leaves it verified)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import weightslab as wl
from weightslab.events import BeforeSave, CallbackError, ExperimentOpened, Load, Pruned, Saved, Verified
from weightslab.ledger import LEDGER
from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager
from weightslab.storage.manifest import Manifest

from .support import make_model, manifests, read_manifest, run_cli, run_python


def setup_run(root: Path, **settings: Any):
    settings.setdefault("checkpoint_frequency", 1)
    system = wl.get_checkpoint_system(root_log_dir=root, **settings)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.1})
    return system, model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def recorder(into: list, *, label: str | None = None) -> Callable[[Any], None]:
    def record(event: Any) -> None:
        into.append((label, event, threading.current_thread().name) if label is not None
                    else (event, threading.current_thread().name))
    return record


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Until ``condition()`` holds (a liveness bound, not a speed limit: it normally holds at once)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


# --- saved --------------------------------------------------------------------------------------

def test_saved_comes_from_the_events_thread_once_the_manifest_is_on_disk(root: Path) -> None:
    system, model, opt = setup_run(root, checkpoint_frequency=2)
    seen = []

    @system.on("saved")
    def check(event: Saved) -> None:
        # on disk and complete when the callback runs: the manifest reads and its every blob verifies
        report = CheckpointManager(root).verify(event.ref)
        seen.append((event, threading.current_thread().name, report.ok, Manifest.read(event.path)))

    assert check.__name__ == "check"  # the decorator returns the function
    losses = {}
    for step in range(1, 5):
        losses[step] = train_step(model, opt)
        wl.checkpoint_on_step(step, metrics={"loss": losses[step]})
    h = system.experiment_hash
    system.wait()

    assert [e.ref for e, *_ in seen] == [f"{h}@2", f"{h}@4"]
    for (event, thread, ok, manifest), step in zip(seen, (2, 4)):
        assert thread == "weightslab-events" and ok
        assert (event.event, event.experiment, event.step, event.reasons) == ("saved", h, step, ("step",))
        assert event.metrics == {"loss": losses[step]}
        assert event.path == Layout(root).manifest(h, step) and event.root == root
        assert event.nbytes == manifest.total_bytes > 0
        assert event.metadata == {}
    # the first save stored every tensor; the bytes written are those, plus the manifest
    first, _, _, manifest = seen[0]
    tensor_bytes = sum({e.blob.digest: e.blob.nbytes for e in manifest.tensors.values()}.values())
    assert first.bytes_written == tensor_bytes + first.path.stat().st_size

    # nothing changed since step 4 (no optimizer step, no random draw): nothing but the manifest is written
    wl.checkpoint_on_step(6)
    system.wait()
    last = seen[-1][0]
    assert last.step == 6 and last.bytes_written == last.path.stat().st_size
    system.close()


def test_before_save_metadata_goes_into_the_manifest(root: Path) -> None:
    system, model, opt = setup_run(root, checkpoint_frequency=3)
    seen = []

    @system.on("before_save")
    def tag(event: BeforeSave) -> None:
        seen.append((event.ref, event.reasons, dict(event.metrics), threading.current_thread().name,
                     len(manifests(root).get(event.experiment, []))))
        event.metadata["git"] = "abc123"
        event.metadata["sizes"] = (1, [2.5, None], {"ok": True})  # a tuple is written as a list

    saved = []
    system.on("saved", recorder(saved))
    for step in range(1, 4):
        wl.checkpoint_on_step(step, metrics={"loss": float(step)})
        train_step(model, opt)
    h = system.experiment_hash
    system.wait()

    # on the training thread, before the save: no manifest yet
    assert seen == [(f"{h}@3", ("step",), {"loss": 3.0}, threading.current_thread().name, 0)]
    expected = {"git": "abc123", "sizes": [1, [2.5, None], {"ok": True}]}
    assert read_manifest(root, h, 3)["metadata"] == expected
    assert saved[0][0].metadata == expected
    assert system.peek(f"{h}@3").metadata == expected
    assert wl.get_checkpoint_system().events.errors == ()

    system.off("before_save", tag)
    wl.checkpoint_on_step(4)
    system.close()
    # a checkpoint without metadata is written as before: no field at all
    assert "metadata" not in read_manifest(root, h, 4)
    assert Manifest.read(Layout(root).manifest(h, 4)).metadata == {}


def test_metadata_that_is_not_plain_json_is_taken_back_and_reported(root: Path, caplog) -> None:
    system, model, opt = setup_run(root)

    def good(event: BeforeSave) -> None:
        event.metadata["run"] = "r1"

    def bad(event: BeforeSave) -> None:
        event.metadata["run"] = "changed"
        event.metadata["when"] = {"nested": {1, 2}}  # a set: not JSON

    def nan(event: BeforeSave) -> None:
        event.metadata["loss"] = float("nan")

    system.on("before_save", good, priority=2)
    system.on("before_save", bad, priority=1)
    system.on("before_save", nan)
    with caplog.at_level(logging.WARNING):
        assert wl.checkpoint_on_step(1) is True
    h = system.experiment_hash
    system.wait()  # not strict: nothing raised

    assert read_manifest(root, h, 1)["metadata"] == {"run": "r1"}  # both bad callbacks' changes taken back
    errors = system.events.errors
    assert [(e.event, e.callback) for e in errors] == [
        ("before_save", f"{__name__}.test_metadata_that_is_not_plain_json_is_taken_back_and_reported.<locals>.bad"),
        ("before_save", f"{__name__}.test_metadata_that_is_not_plain_json_is_taken_back_and_reported.<locals>.nan")]
    assert "metadata['when']['nested'] is a builtins.set, not plain JSON" in str(errors[0])
    assert "metadata['loss'] is nan" in str(errors[1])
    assert "the 'before_save' callback" in caplog.text and "<locals>.bad added metadata that is not plain JSON" \
        in caplog.text
    system.close()


# --- failures of callbacks -----------------------------------------------------------------------

def boom(event: Any) -> None:
    raise RuntimeError(f"boom at {event.event}")


def test_a_failing_callback_does_not_stop_training_and_is_reported(root: Path, caplog) -> None:
    system, model, opt = setup_run(root)
    after = []
    system.on("saved", boom, priority=1)
    system.on("saved", recorder(after))  # a later callback of the same event still runs
    system.on("before_save", boom)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 4):
            train_step(model, opt)
            assert wl.checkpoint_on_step(step) is True
        h = system.experiment_hash
        system.wait()  # not strict: reported, not raised
        system.close()

    assert manifests(root) == {h: [1, 2, 3]}
    assert [e.step for e, _ in after] == [1, 2, 3]
    assert f"the 'saved' callback {__name__}.boom raised RuntimeError: boom at saved (training goes on)" \
        in caplog.text
    assert f"the 'before_save' callback {__name__}.boom raised RuntimeError: boom at before_save" in caplog.text
    assert "Traceback" in caplog.text and 'raise RuntimeError(f"boom at {event.event}")' in caplog.text
    errors = system.events.errors
    assert sorted(e.event for e in errors) == ["before_save"] * 3 + ["saved"] * 3
    assert all(e.callback == f"{__name__}.boom" and isinstance(e.error, RuntimeError) for e in errors)


def test_under_strict_a_failing_callback_is_raised_from_wait_and_close_only(root: Path) -> None:
    system, model, opt = setup_run(root, strict=True)
    system.on("saved", boom)
    train_step(model, opt)
    assert wl.checkpoint_on_step(1) is True  # not raised here
    h = system.experiment_hash
    with pytest.raises(CallbackError) as info:
        system.wait()
    error = info.value
    assert isinstance(error, wl.CheckpointSaveError)  # what strict code around wait() catches already
    assert (error.event, error.callback) == ("saved", f"{__name__}.boom")
    assert isinstance(error.error, RuntimeError) and str(error.error) == "boom at saved"
    assert error.__cause__ is error.error
    system.wait()  # raised once

    system.on("before_save", boom)
    train_step(model, opt)
    assert wl.checkpoint_on_step(2) is True
    with pytest.raises(CallbackError) as info:
        system.close()
    assert [(e.event, e.callback) for e in info.value.errors] == [("before_save", f"{__name__}.boom"),
                                                                 ("saved", f"{__name__}.boom")]
    assert "2 event callbacks raised" in str(info.value)
    assert manifests(root) == {h: [1, 2]}


def test_a_callback_that_exits_does_not_end_the_events_thread(root: Path) -> None:
    system, model, opt = setup_run(root)
    seen = []
    system.on("saved", lambda event: sys.exit(3), priority=1)
    system.on("saved", recorder(seen))
    for step in range(1, 3):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
    system.wait()  # returns: the thread went on after the SystemExit
    assert [e.step for e, _ in seen] == [1, 2]
    assert [type(e.error) for e in system.events.errors] == [SystemExit, SystemExit]
    system.close()


# --- order --------------------------------------------------------------------------------------

def test_callbacks_run_by_priority_then_in_the_order_they_subscribed(root: Path) -> None:
    system, model, opt = setup_run(root)
    calls = []

    def make(label: str) -> Callable[[Any], None]:
        def callback(event: Any) -> None:
            calls.append((event.event, label))
        callback.__qualname__ = label
        return callback

    a, b, c, d, e = (make(x) for x in "abcde")
    for event in ("before_save", "saved"):
        system.on(event, a)
        system.on(event, b, priority=5)
        system.on(event, c)
        system.on(event, d, priority=5)
        system.on(event, e, priority=-1)
    system.on("saved", a, priority=0)  # subscribed again: replaces its subscription, now after c
    assert system.off("before_save", c) is True and system.off("before_save", c) is False
    wl.checkpoint_on_step(1)
    system.wait()
    assert calls == [("before_save", x) for x in "bdae"] + [("saved", x) for x in "bdcae"]
    system.close()


def test_unknown_events_and_bad_subscriptions_are_refused_by_name(root: Path) -> None:
    system, _, _ = setup_run(root)
    with pytest.raises(wl.ConfigError) as info:
        system.on("after_save", print)
    assert str(info.value) == ("unknown event 'after_save'; the events are: before_save, saved, save_failed, "
                               "before_load, loaded, verified, experiment_opened, pruned")
    with pytest.raises(wl.ConfigError, match="unknown event 'durable'"):
        wl.on("durable", print)
    with pytest.raises(wl.ConfigError, match="unknown event 'durable'"):
        wl.off("durable", print)
    with pytest.raises(wl.ConfigError, match="priority must be an integer"):
        system.on("saved", print, priority=1.5)
    with pytest.raises(wl.ConfigError, match="needs a callable"):
        system.on("saved", "print")
    with pytest.raises(wl.ConfigError, match="callback_timeout must be a number of seconds"):
        wl.CheckpointConfig(root_log_dir=root, callback_timeout=-1)
    system.close()


def test_wl_on_subscribes_on_the_running_system_and_survives_its_reconfiguration(root: Path) -> None:
    seen = []

    @wl.on("saved", priority=3)
    def first(event: Saved) -> None:
        seen.append(("first", event.step))

    wl.on("saved", lambda event: seen.append(("second", event.step)))
    # the settings come after: the default system wl.on started is replaced, with the subscriptions
    system, model, opt = setup_run(root)
    wl.checkpoint_on_step(1)
    system.wait()
    assert seen == [("first", 1), ("second", 1)]
    assert wl.off("saved", first) is True
    wl.checkpoint_on_step(2)
    system.close()
    assert seen == [("first", 1), ("second", 1), ("second", 2)]
    assert wl.off("saved", first) is False  # no system runs


# --- a slow callback ----------------------------------------------------------------------------

def test_a_slow_callback_holds_neither_training_nor_the_writer(root: Path) -> None:
    system, model, opt = setup_run(root, max_pending_saves=1)
    gate, entered, seen = threading.Event(), threading.Event(), []

    @system.on("saved")
    def upload(event: Saved) -> None:
        seen.append(event.step)
        entered.set()
        assert gate.wait(60), "the test never opened the gate"

    try:
        train_step(model, opt)
        wl.checkpoint_on_step(1)
        assert entered.wait(60)
        # the callback blocks; training goes on and every next save still commits (with one save in
        # flight at most, a writer held by the callback would block checkpoint_on_step at step 3)
        for step in range(2, 7):
            train_step(model, opt)
            assert wl.checkpoint_on_step(step) is True
        h = system.experiment_hash
        wait_for(lambda: manifests(root).get(h) == [1, 2, 3, 4, 5, 6], "the saves committed")
        assert seen == [1] and not gate.is_set()  # ... while the first callback was still blocked
    finally:
        gate.set()
    system.wait()
    assert seen == [1, 2, 3, 4, 5, 6]
    system.close()


def test_close_waits_for_a_stuck_callback_only_callback_timeout_seconds(root: Path, caplog) -> None:
    system, model, opt = setup_run(root, callback_timeout=0.5)
    gate, entered, seen = threading.Event(), threading.Event(), []

    def stuck(event: Saved) -> None:
        seen.append(event.step)
        entered.set()
        gate.wait(60)

    system.on("saved", stuck)
    try:
        train_step(model, opt)
        wl.checkpoint_on_step(1)
        train_step(model, opt)
        wl.checkpoint_on_step(2)
        assert entered.wait(60)
        with caplog.at_level(logging.WARNING):
            system.close()  # returns although the callback is still blocked
        assert not gate.is_set() and seen == [1]
        assert (f"event callbacks did not finish within 0.5 s (callback_timeout): the 'saved' callback "
                f"{__name__}.test_close_waits_for_a_stuck_callback_only_callback_timeout_seconds.<locals>.stuck "
                "is still running and 1 queued events are not delivered") in caplog.text
    finally:
        gate.set()
    assert manifests(root) == {system.experiment_hash: [1, 2]}  # the saves themselves were all waited for


# --- save_failed --------------------------------------------------------------------------------

def test_save_failed_carries_the_error_and_training_goes_on(root: Path) -> None:
    system, model, opt = setup_run(root)
    failed, saved = [], []
    system.on("save_failed", recorder(failed))
    system.on("saved", recorder(saved))
    broken = {"on": False}

    def getter() -> dict:
        if broken["on"]:
            raise ValueError("the state cannot be read now")
        return {"epoch": 1}

    wl.register_state("extra", getter, lambda value: None)
    train_step(model, opt)
    wl.checkpoint_on_step(1)
    broken["on"] = True
    train_step(model, opt)
    assert wl.checkpoint_on_step(2) is False  # a failure on the training thread
    broken["on"] = False
    h = system.experiment_hash
    with pytest.raises(wl.CheckpointSaveError) as first:  # not strict: kept, and raised here
        system.wait()
    # a failure on the writer: the experiment's directory became a symbolic link, which is never written through
    elsewhere = root.parent / "elsewhere"
    (root / "checkpoints" / h).rename(elsewhere)
    (root / "checkpoints" / h).symlink_to(elsewhere)
    train_step(model, opt)
    assert wl.checkpoint_on_step(3) is True  # taken, then refused by the writer
    with pytest.raises(wl.CheckpointSaveError) as second:
        system.wait()
    (root / "checkpoints" / h).unlink()
    elsewhere.rename(root / "checkpoints" / h)
    train_step(model, opt)
    wl.checkpoint_on_step(4)
    system.close()

    assert [(e.ref, e.step, type(e.error).__name__, thread) for e, thread in failed] == [
        (f"{h}@2", 2, "StateError", "weightslab-events"), (f"{h}@3", 3, "WeightslabError", "weightslab-events")]
    assert "the state cannot be read now" in str(failed[0][0].error)
    assert "is a symbolic link" in str(failed[1][0].error)
    assert first.value.errors + second.value.errors == [e.error for e, _ in failed]  # the very errors wait() raised
    assert [e.step for e, _ in saved] == [1, 4]
    assert manifests(root) == {h: [1, 4]}


# --- before_load, loaded, experiment_opened -----------------------------------------------------

def test_resume_and_fork_tell_before_and_after_loading(root: Path) -> None:
    system, model, opt = setup_run(root)
    system.on("before_save", lambda event: event.metadata.update(note=f"step {event.step}"))
    for step in range(1, 4):
        train_step(model, opt)
        wl.checkpoint_on_step(step, metrics={"loss": 0.5 * step})
    h = system.experiment_hash
    saved_weight = model[0].weight.detach().clone()
    system.close()
    LEDGER.clear()

    system, model, opt = setup_run(root)
    fresh_weight = model[0].weight.detach().clone()
    assert not torch.equal(fresh_weight, saved_weight)  # (make_model is seeded, the training moved it)
    seen: list[tuple[str, Load, torch.Tensor]] = []
    opened: list[ExperimentOpened] = []
    for name in ("before_load", "loaded"):
        system.on(name, lambda event: seen.append((event.event, event, model[0].weight.detach().clone())))
    system.on("experiment_opened", opened.append)

    assert system.resume(f"{h}@2") == 2
    (before, b, w_before), (after, a, w_after) = seen
    assert (before, after) == ("before_load", "loaded")
    assert torch.equal(w_before, fresh_weight)  # before: nothing registered had changed yet
    for event in (b, a):
        assert (event.kind, event.ref, event.experiment, event.step) == ("resume", f"{h}@2", h, 2)
        assert event.path == Layout(root).manifest(h, 2)
        assert event.metrics == {"loss": 1.0} and event.metadata == {"note": "step 2"}
    assert not torch.equal(w_after, fresh_weight)  # after: the checkpoint's weights
    assert opened == []  # a resume into the checkpoint's own experiment opens nothing

    seen.clear()
    assert system.fork(f"{h}@3", name="lr-low", lr=0.01) == 3
    assert [(n, e.kind, e.ref, e.step) for n, e, _ in seen] == [("before_load", "fork", f"{h}@3", 3),
                                                               ("loaded", "fork", f"{h}@3", 3)]
    assert [(o.parent, o.reason, o.branch) for o in opened] == [(f"{h}@3", "fork", "lr-low")]
    assert opened[0].experiment == system.experiment_hash != h
    assert opened[0].differences == ("config.lr: 0.1 -> 0.01",)
    system.close()


def test_experiment_opened_once_per_new_experiment_with_parent_and_reason(root: Path) -> None:
    opened: list[ExperimentOpened] = []
    wl.on("experiment_opened", opened.append)
    system, model, opt = setup_run(root)
    cfg = wl.get_hyperparams("config")
    train_step(model, opt)
    wl.checkpoint_on_step(1)
    first = system.experiment_hash
    cfg["lr"] = 0.05  # a config change at the next boundary: a child experiment
    train_step(model, opt)
    wl.checkpoint_on_step(2)
    second = system.experiment_hash
    cfg["lr"] = 0.1  # back: the first experiment again, not a new one
    train_step(model, opt)
    wl.checkpoint_on_step(3)
    assert system.experiment_hash == first
    system.close()

    assert [(o.experiment, o.parent, o.reason, o.branch) for o in opened] == [
        (first, None, None, None), (second, f"{first}@1", "config_change", None)]
    assert opened[0].differences == () and opened[1].differences == ("config.lr: 0.1 -> 0.05",)
    assert all(o.event == "experiment_opened" for o in opened)


# --- verified, pruned ---------------------------------------------------------------------------

def test_verified_and_pruned(root: Path) -> None:
    system, model, opt = setup_run(root, retention={"keep_last": 2})
    verified: list[Verified] = []
    pruned: list[tuple[Pruned, str]] = []
    system.on("verified", verified.append)
    system.on("pruned", recorder(pruned))
    for step in range(1, 5):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
    h = system.experiment_hash
    system.wait()
    assert [(p.refs, thread) for p, thread in pruned] == [((f"{h}@1",), "weightslab-events"),
                                                         ((f"{h}@2",), "weightslab-events")]
    assert pruned[0][0].root == root

    report = wl.verify()
    assert verified == [Verified(event="verified", root=root, ref=None, report=report)]
    assert report.ok and sorted(report.checked) == [f"{h}@3", f"{h}@4"]
    wl.verify(f"{h}@4")
    assert verified[-1].ref == f"{h}@4" and verified[-1].report.checked == (f"{h}@4",)

    wl.prune(keep_last=1, dry_run=True)  # deletes nothing: no event
    wl.prune(keep_last=1)
    system.wait()
    assert [p.refs for p, _ in pruned] == [(f"{h}@1",), (f"{h}@2",), (f"{h}@3",)]
    system.close()


# --- durability: a process killed inside its saved callback ---------------------------------------

KILLED_IN_CALLBACK = r"""
import os, signal, sys
import torch
import weightslab as wl

root = sys.argv[1]
system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
wl.register_model(model)
wl.register_optimizer(opt)

@system.on("saved")
def die(event):
    print("SAVED", event.ref, event.path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)   # nothing after the callback may be needed for the checkpoint

for step in range(1, 1000):
    model(torch.randn(8, 64)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    wl.checkpoint_on_step(step)
print("NOT KILLED", flush=True)
"""


def test_saved_means_durable_a_process_killed_in_its_callback_leaves_a_verified_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "killed"
    proc = run_python(KILLED_IN_CALLBACK, args=[str(root)], check=False)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert "NOT KILLED" not in proc.stdout
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("SAVED ")]
    _, ref, path = line.split()
    assert Path(path).is_file() and Manifest.read(Path(path)).ref == ref

    report = CheckpointManager(root).verify(ref)
    assert report.ok and report.checked == (ref,) and report.blobs > 0
    cli = run_cli("verify", ref, root=root)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "1 checkpoints" in cli.stdout and "all verify" in cli.stdout
    # and a new process resumes it
    resumed = run_python(r"""
import sys, torch, weightslab as wl
system = wl.get_checkpoint_system(root_log_dir=sys.argv[1], checkpoint_frequency=None, save_on_close=False)
torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
wl.register_model(model)
wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
print("RESUMED", system.resume(sys.argv[2]))
system.close()
""", args=[str(root), ref])
    assert f"RESUMED {ref.split('@')[1]}" in resumed.stdout
