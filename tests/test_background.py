"""Background saves: snapshot then persist, reusable buffers, back-pressure, time trigger, preemption."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.ledger import Entry, Ledger
from weightslab.cli.catalog import Catalog
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

from .support import assert_same, read_manifest, spawn, start_of, train

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(model, opt):
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


class HeldWriter:
    """Makes every commit wait until released: a writer that fell behind, for real."""

    def __init__(self, system: wl.AutomaticCheckpointSystem):
        self.release = threading.Event()
        self.started = threading.Event()
        original = system.manager.commit

        def commit(request):
            self.started.set()
            assert self.release.wait(30), "test never released the writer"
            return original(request)
        system.manager.commit = commit


# --- 1. snapshot into reusable buffers, then persist ------------------------------------------

def test_the_training_thread_only_copies_the_writer_does_the_rest(root: Path) -> None:
    model, opt = model_and_optimizer()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    held = HeldWriter(system)
    assert wl.checkpoint_on_step(1) is True  # returns while the commit has not even started writing
    assert held.started.wait(10)
    assert not (root / "checkpoints").exists() or not list(root.rglob("*_step_*.json"))
    held.release.set()
    system.wait()
    assert [e.step for e in CheckpointManager(root).checkpoints()] == [1]
    system.close()


# --- 2. bounded memory, explicit back-pressure ------------------------------------------------

def test_block_waits_for_room(root: Path) -> None:
    model, opt = model_and_optimizer()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      max_pending_saves=1, backpressure="block")
    wl.register_model(model)
    held = HeldWriter(system)
    wl.checkpoint_on_step(1)
    assert held.started.wait(10)
    returned = threading.Event()
    worker = threading.Thread(target=lambda: (wl.checkpoint_on_step(2), returned.set()))
    worker.start()
    assert not returned.wait(0.3)  # blocked: one save in flight is the limit
    held.release.set()
    assert returned.wait(10)
    worker.join()
    system.wait()
    assert [e.step for e in CheckpointManager(root).checkpoints()] == [1, 2]
    system.close()


def test_skip_drops_the_new_save_with_a_warning(root: Path, caplog) -> None:
    model, opt = model_and_optimizer()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      max_pending_saves=1, backpressure="skip")
    wl.register_model(model)
    held = HeldWriter(system)
    assert wl.checkpoint_on_step(1) is True
    assert held.started.wait(10)
    with caplog.at_level(logging.WARNING):
        train_step(model, opt)
        assert wl.checkpoint_on_step(2) is False  # returned at once, nothing taken
    assert "skipped: the writer is behind" in caplog.text and system.skipped == 1
    held.release.set()
    system.wait()
    train_step(model, opt)
    assert wl.checkpoint_on_step(3) is True
    system.wait()
    manager = CheckpointManager(root)
    assert [e.step for e in manager.checkpoints()] == [1, 3]
    latest = load_tensors(manager, manager.read_manifest(manager.checkpoints()[-1]))
    assert torch.equal(latest["models/main/0.weight"], model[0].weight.detach())  # not confused by the skip
    system.close()


def test_latest_replaces_the_save_still_queued_and_the_newest_records_what_it_replaced(root: Path, caplog) -> None:
    model, opt = model_and_optimizer()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      max_pending_saves=2, backpressure="latest")
    wl.register_model(model)
    held = HeldWriter(system)
    assert wl.checkpoint_on_step(1) is True
    assert held.started.wait(10)  # step 1 is being written, and stays so
    returned = threading.Event()

    def more_steps() -> None:
        for s in (2, 3, 4):  # 2 is queued; 3 takes its place, then 4 takes 3's: never a wait
            train_step(model, opt)
            assert wl.checkpoint_on_step(s) is True
        returned.set()
    with caplog.at_level(logging.WARNING):
        worker = threading.Thread(target=more_steps)
        worker.start()
        assert returned.wait(10), "a save waited for the disk under backpressure='latest'"
        worker.join()
    at_four = {k: v.clone() for k, v in model.state_dict().items()}
    assert "replaced by the newer" in caplog.text and system.skipped == 2
    held.release.set()
    system.wait()
    manager = CheckpointManager(root)
    assert [e.step for e in manager.checkpoints()] == [1, 4]
    manifest = manager.read_manifest(manager.checkpoints()[-1])
    assert {"kind": "superseded", "steps": [2, 3]} in manifest.changes
    with Catalog(manager) as catalog:  # what `weightslab ls` counts (CKPTS 2+2)
        assert [(r.checkpoints, r.dropped) for r in catalog.experiments()] == [(2, 2)]
    latest = load_tensors(manager, manifest)
    assert all(torch.equal(latest[f"models/main/{k}"], v) for k, v in at_four.items())
    system.close()


def test_max_pending_bytes_bounds_the_snapshots_in_flight(root: Path) -> None:
    model, opt = model_and_optimizer()
    one_save = sum(t.nbytes for t in model.state_dict().values())
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      max_pending_saves=10, max_pending_bytes=one_save, backpressure="skip")
    wl.register_model(model)
    held = HeldWriter(system)
    assert wl.checkpoint_on_step(1) is True  # admitted alone even if bigger than the bound
    assert held.started.wait(10)
    train_step(model, opt)
    assert wl.checkpoint_on_step(2) is False  # a second full snapshot would exceed the bytes
    held.release.set()
    system.wait()
    system.close()


# --- 3. nothing silent, nothing hanging ----------------------------------------------------------

def test_wait_returns_when_everything_queued_is_durable(root: Path) -> None:
    model, opt = model_and_optimizer()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      max_pending_saves=3)
    wl.register_model(model)
    for s in (1, 2, 3):
        train_step(model, opt)
        wl.checkpoint_on_step(s)
    system.flush()
    assert [e.step for e in CheckpointManager(root).checkpoints()] == [1, 2, 3]
    system.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("weightslab")]


def test_the_writer_survives_a_bad_item(root: Path) -> None:
    model, opt = model_and_optimizer()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    original = system.manager.commit
    calls = []

    def flaky(request):
        calls.append(request.step)
        if request.step == 2:
            raise OSError(28, "No space left on device")
        return original(request)
    system.manager.commit = flaky
    for s in (1, 2, 3):
        train_step(model, opt)
        wl.checkpoint_on_step(s)
    with pytest.raises(wl.CheckpointSaveError, match="No space left on device") as info:
        system.wait()
    assert len(info.value.errors) == 1 and calls == [1, 2, 3]
    manager = CheckpointManager(root)
    assert [e.step for e in manager.checkpoints()] == [1, 3]
    assert manager.verify().ok  # step 3 did not reuse anything step 2 failed to store
    system.close()


# --- 5. implicit saves: the time trigger -------------------------------------------------------

def test_every_seconds_saves_when_the_time_has_come(root: Path) -> None:
    clock = [1000.0]
    model, opt = model_and_optimizer()
    ledger = Ledger()  # a system of its own, on a clock of the test's
    system = wl.AutomaticCheckpointSystem(root_log_dir=root, checkpoint_frequency=None, every_seconds=60,
                                          save_on_close=False, ledger=ledger, clock=lambda: clock[0])
    ledger.register(Entry("model", "main", model))
    assert system.checkpoint_on_step(1) is False
    clock[0] += 59
    assert system.checkpoint_on_step(2) is False
    clock[0] += 2
    assert system.checkpoint_on_step(3) is True
    clock[0] += 30
    assert system.checkpoint_on_step(4) is False  # the clock restarts at each save
    clock[0] += 31
    assert system.checkpoint_on_step(5) is True
    system.wait()
    m = read_manifest(root, system.experiment_hash, 3)
    assert m["reasons"] == ["time"]
    system.close()


def test_a_time_triggered_implicit_run_resumes_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tmp_path / "r0", straight)
    root, out = tmp_path / "root", tmp_path / "final"
    # every boundary is "due" by time, and the loop never calls checkpoint_on_step
    train(root, out, "--implicit", "--frequency", "0", "--every-seconds", "1e-9", "--steps", "23")
    steps = [e.step for e in CheckpointManager(root).checkpoints()]
    assert steps == list(range(1, 24))
    assert start_of(train(root, out, "--implicit", "--frequency", "0", "--every-seconds", "1e-9")) == 23
    assert_same(straight, out)


def test_the_exit_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tmp_path / "r0", straight)
    root, out = tmp_path / "root", tmp_path / "final"
    train(root, out, "--steps", "23")  # not a multiple of the frequency: saved at close
    manager = CheckpointManager(root)
    assert json.loads(manager.checkpoints()[-1].path.read_text())["reasons"] == ["exit"]
    assert start_of(train(root, out)) == 23
    assert_same(straight, out)


# --- 4. preemption -----------------------------------------------------------------------------

def _until(proc: subprocess.Popen[str], marker: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == marker:
            return
    raise AssertionError(f"the child ended before printing {marker!r}: {proc.stderr.read() if proc.stderr else ''}")


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _steps(root: Path) -> dict[int, list[str]]:
    manager = CheckpointManager(root)
    return {e.step: json.loads(e.path.read_text())["reasons"] for e in manager.checkpoints()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("straight")
    train(base / "root", base / "final")
    return base / "final"


def test_sigterm_takes_a_final_checkpoint_then_dies_as_it_would_have(tmp_path: Path, straight_run: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--frequency", "1000", "--pause-at", "7")
    _until(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    code, stdout, stderr = _finish(proc)
    assert code == -signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr and "final checkpoint after SIGTERM is durable" in stderr
    assert _steps(root) == {8: ["preempt"]}  # the next step boundary
    assert CheckpointManager(root).verify().ok
    assert start_of(train(root, out, "--frequency", "1000")) == 8
    assert_same(straight_run, out)


def test_a_users_own_handler_still_runs_after_the_checkpoint(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--frequency", "1000", "--pause-at", "5", "--user-handler")
    _until(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    code, stdout, stderr = _finish(proc)
    assert code == 3 and "USER HANDLER" in stdout, stderr
    assert _steps(root) == {6: ["preempt"]}


def test_sigint_checkpoints_then_raises_keyboard_interrupt(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--frequency", "1000", "--pause-at", "4")
    _until(proc, "READY")
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    code, stdout, stderr = _finish(proc)
    assert "KeyboardInterrupt" in stderr and code != 0
    assert _steps(root) == {5: ["preempt"]}


def test_a_signal_the_process_ignores_stays_ignored(tmp_path: Path, straight_run: Path) -> None:
    # A shell's background job ignores SIGINT: the process would have gone on, so it goes on, with
    # no checkpoint taken for it and no "stopping" in the log.
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--frequency", "1000", "--pause-at", "4", sigint=signal.SIG_IGN)
    _until(proc, "READY")
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    code, stdout, stderr = _finish(proc)
    assert code == 0, stderr
    assert "SIGINT" not in stderr and "stopping" not in stderr
    assert _steps(root) == {40: ["exit"]}  # only the final checkpoint of a run that was not stopped
    assert_same(straight_run, out)


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--frequency", "1000", "--pause-at", "4")
    _until(proc, "READY")
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    for line in proc.stderr:  # the first signal was recorded: send the second
        if "SIGTERM received" in line:
            break
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = _finish(proc)
    assert code == -signal.SIGTERM
    assert _steps(root) == {}  # no step boundary came: no checkpoint, and no waiting for one


def test_no_step_boundary_within_the_timeout_stops_without_a_checkpoint(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    proc = spawn(root, out, "--frequency", "1000", "--pause-at", "4", "--preempt-timeout", "0.5")
    _until(proc, "READY")
    proc.send_signal(signal.SIGTERM)  # and the child stays blocked on stdin: no boundary will come
    code = proc.wait(timeout=60)  # (communicate() would close stdin and unblock it)
    stderr = proc.stderr.read() if proc.stderr else ""
    _finish(proc)
    assert code == -signal.SIGTERM
    assert "no step boundary within 0.5 s of SIGTERM: stopping without a final checkpoint" in stderr
    assert _steps(root) == {}


def test_no_handlers_remain_after_close(root: Path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    system = wl.get_checkpoint_system(root_log_dir=root)
    assert signal.getsignal(signal.SIGTERM) != before[0]
    system.close()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    system = wl.get_checkpoint_system(root_log_dir=root, preempt_signals=())
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    system.close()
    with pytest.raises(wl.ConfigError, match="unknown signal 'SIGFOO'"):
        wl.get_checkpoint_system(root_log_dir=root, preempt_signals=["SIGFOO"])
