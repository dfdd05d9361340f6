"""A person edits the config file while a real training loop runs: the run, the lineage and the
optimizer's learning rate after each edit, with the save patterns of vim, an IDE and a plain
overwrite, and with invalid, empty and wrongly typed versions."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.storage.manager import CheckpointManager

from .support import REPO, run_python

CONFIG = "optimizer:\n  lr: 0.1\n  momentum: 0.0\nmodel:\n  width: 8\nepochs: 3\n"


# --- how editors save ----------------------------------------------------------------------------
def save_like_vim(path: Path, text: str) -> None:
    """vim's default (backupcopy=auto on a plain file): probe file, rename the original to a
    backup, write a new file, delete the backup."""
    probe = path.with_name("4913")
    probe.write_text("")
    probe.unlink()
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    backup.unlink()


def save_like_ide(path: Path, text: str) -> None:
    """JetBrains' safe write: a temporary file, the original renamed away, the temporary renamed in."""
    tmp = path.with_name(path.name + "___jb_tmp___")
    tmp.write_text(text)
    old = path.with_name(path.name + "___jb_old___")
    os.rename(path, old)
    os.rename(tmp, path)
    old.unlink()


def save_atomically(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def overwrite(path: Path, text: str) -> None:
    """Truncate and write in place, in two chunks (a reader may see the first half)."""
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        f.write(text[len(text) // 2:])


SAVES = {"vim": save_like_vim, "ide": save_like_ide, "atomic": save_atomically, "overwrite": overwrite}


class Run:
    """A small real training loop whose hyperparameters come from a watched YAML file."""

    def __init__(self, root: Path, tmp_path: Path, text: str = CONFIG, **settings):
        self.path = tmp_path / "config.yaml"
        self.path.write_text(text)
        settings = {"checkpoint_frequency": None, "save_on_close": False, **settings}
        self.system = wl.get_checkpoint_system(root_log_dir=root, **settings)
        self.config = wl.register_hyperparams("config", self.path)
        torch.manual_seed(0)
        opt = self.config.get("optimizer", {})
        self.model = nn.Linear(4, self.config.get("model", {}).get("width", 8))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=opt.get("lr", 0.1), momentum=opt.get("momentum", 0.0))
        wl.register_model(self.model)
        self.opt = wl.register_optimizer(self.opt)
        self.watched = self.system.watched_files.get("config")
        self.step = 0
        self.train()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def train(self, n: int = 1) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            self.model(torch.randn(2, 4)).pow(2).mean().backward()
            self.opt.step()
            self.step += 1
            wl.checkpoint_on_step(self.step)

    def edit(self, text: str, save: Callable[[Path, str], None] = save_atomically) -> None:
        """Save the file as an editor would, then train until the run has read it back."""
        seen = self.watched.events
        save(self.path, text)
        assert self.watched.wait_for_events(seen + 1, timeout=10), "the watcher saw no event"
        deadline = time.monotonic() + 10
        while not (self.watched.settled and self.watched.content == self.path.read_bytes()):
            assert time.monotonic() < deadline, "the edit never reached a step boundary"
            self.train()

    def record(self, experiment: str):
        self.system.wait()
        return self.system.manager.read_experiment(experiment)


@pytest.mark.parametrize("save", SAVES)
def test_an_edit_of_the_learning_rate_reaches_the_optimizer_and_opens_a_child(root, tmp_path, save):
    run = Run(root, tmp_path)
    first, lr_before = run.system.experiment_hash, run.lr
    assert lr_before == 0.1
    run.edit(CONFIG.replace("lr: 0.1", "lr: 0.01"), SAVES[save])
    assert run.lr == 0.01  # applied at the boundary, so the next step uses it
    assert run.config["optimizer"]["lr"] == 0.01
    child = run.system.experiment_hash
    assert child != first
    record = run.record(child)
    assert record.parent is not None and record.parent.experiment == first and record.parent.reason == "config_change"
    assert any("optimizer.lr: 0.1 -> 0.01" in line for line in record.parent.changes)
    assert run.record(first) is not None  # the parent's record is filed too, though it has no checkpoint
    # the child's first checkpoint records the change, and holds the new learning rate
    info = run.system.peek(f"{child}@latest")
    assert info.experiment == child and "config_change" in info.reasons
    state = wl.load(f"{child}@{info.step}", root=root)
    assert state["optimizers"]["main"]["param_groups"][0]["lr"] == 0.01
    assert state["hyperparams"]["config"]["optimizer"]["lr"] == 0.01
    run.system.close()


def test_a_second_edit_chains_the_lineage_and_an_unrelated_edit_leaves_the_optimizer(root, tmp_path):
    run = Run(root, tmp_path)
    first = run.system.experiment_hash
    run.edit(CONFIG.replace("lr: 0.1", "lr: 0.01"))
    second, at = run.system.experiment_hash, run.step
    run.edit(CONFIG.replace("lr: 0.1", "lr: 0.01").replace("epochs: 3", "epochs: 5"), save_like_vim)
    third = run.system.experiment_hash
    assert len({first, second, third}) == 3
    assert run.lr == 0.01 and run.config["epochs"] == 5
    assert run.record(third).parent.experiment == second and run.record(second).parent.experiment == first
    assert run.record(third).parent.step >= at
    run.system.close()


@pytest.mark.parametrize("text, says", [
    (CONFIG.replace("lr: 0.1", "lr: [0.1"), "the YAML does not parse"),
    ("", "the file is empty"),
    (CONFIG.replace("lr: 0.1", "lr: fast"), "'optimizer.lr' must be a float"),
])
def test_a_bad_version_keeps_the_run_going_unchanged(root, tmp_path, caplog, text, says):
    run = Run(root, tmp_path)
    first = run.system.experiment_hash
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        run.edit(text, overwrite)
        run.train(3)  # training goes on
    assert run.lr == 0.1 and run.system.experiment_hash == first
    assert run.config == {"optimizer": {"lr": 0.1, "momentum": 0.0}, "model": {"width": 8}, "epochs": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(run.path) in m and "line" in m and says in m for m in warnings), warnings
    run.edit(CONFIG.replace("lr: 0.1", "lr: 0.05"))  # the next good version applies
    assert run.lr == 0.05 and run.system.experiment_hash != first
    run.system.close()


def test_yaml_misreadings_are_coerced_and_runtime_keys_survive(root, tmp_path, caplog):
    run = Run(root, tmp_path, text=CONFIG + "activation: relu\n")
    run.config["num_classes"] = 10  # set by the run at runtime
    run.config["epochs"] = 4  # overridden by the run
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        run.edit(CONFIG.replace("lr: 0.1", "lr: 1e-3") + "activation: on\n")
    assert run.lr == 0.001 and type(run.config["optimizer"]["lr"]) is float
    assert run.config["activation"] == "on"
    assert run.config["num_classes"] == 10 and run.config["epochs"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'optimizer.lr'" in m and "YAML 1.1" in m for m in warnings)
    assert any("'activation'" in m and "YAML 1.1" in m for m in warnings)
    run.system.close()


def test_readers_on_another_thread_never_see_half_an_edit(root, tmp_path):
    run = Run(root, tmp_path, text="a: 0\nb: 0\n")
    seen_mixed: list[tuple[int, int]] = []
    stop = threading.Event()

    def reader() -> None:
        config = run.config
        while not stop.is_set():
            values = config._data  # noqa: SLF001 - one read of the reference, as any lookup does
            if values["a"] != values["b"]:
                seen_mixed.append((values["a"], values["b"]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 6):
            run.edit(f"a: {i}\nb: {i}\n")
            assert run.config == {"a": i, "b": i}
    finally:
        stop.set()
        thread.join()
    assert seen_mixed == []
    run.system.close()


def test_polling_mode_for_network_filesystems(root, tmp_path):
    run = Run(root, tmp_path, watch_files="poll")
    assert type(run.watched._observer).__name__ == "PollingObserver"
    run.edit(CONFIG.replace("lr: 0.1", "lr: 0.02"))
    assert run.lr == 0.02
    run.system.close()


def test_watch_off_and_unregister_stop_watching(root, tmp_path):
    run = Run(root, tmp_path, watch_files="off")
    assert run.system.watched_files == {}
    run.system.close()
    run = Run(root, tmp_path)
    watched = run.watched
    assert watched.watching
    wl.unregister("config", kind="hyperparams")
    assert not watched.watching and run.system.watched_files == {}
    run.system.close()


def test_close_stops_the_watcher_threads(root, tmp_path):
    before = set(threading.enumerate())
    run = Run(root, tmp_path)
    assert set(threading.enumerate()) - before  # the observer runs
    run.system.close()
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


def test_a_training_loop_on_another_thread_picks_up_edits(root, tmp_path):
    """The loop runs freely while the file is edited, as in real use."""
    run = Run(root, tmp_path)
    stop, stepped = threading.Event(), threading.Condition()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                run.train()
                with stepped:
                    stepped.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        save_like_vim(run.path, CONFIG.replace("lr: 0.1", "lr: 0.003"))
        with stepped:
            assert stepped.wait_for(lambda: run.lr == 0.003 or errors, timeout=10)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and run.lr == 0.003
    run.system.close()


def test_the_example_edits_its_config_while_training(tmp_path):
    root = tmp_path / "live"
    proc = run_python(script=REPO / "examples" / "live_config.py", env={"WEIGHTSLAB_ROOT": str(root)},
                      cwd=tmp_path, timeout=300)
    assert "finished step 400 with lr 0.01" in proc.stdout
    assert f"{root / 'config.yaml'}, line 3" in proc.stderr and "previous configuration is kept" in proc.stderr
    manager = CheckpointManager(root)
    records = {h: manager.read_experiment(h) for h in manager.experiments()}
    assert len(records) == 2
    (child, record), = [(h, r) for h, r in records.items() if r.parent is not None]
    assert record.parent.reason == "config_change" and 100 <= record.parent.step < 400
    assert record.parent.changes == ("config.optimizer.lr: 0.05 -> 0.01",)
    first = manager.checkpoints([child])[0]
    assert json.loads(first.path.read_text())["reasons"] == ["config_change"]
    assert wl.load(f"{child}@400", root=root)["optimizers"]["main"]["param_groups"][0]["lr"] == 0.01


def test_an_edit_reaches_a_loop_that_never_calls_checkpoint_on_step(root, tmp_path):
    """Implicit boundaries (the optimizer's post-step hook) apply edits the same way."""
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=None, save_on_close=False)
    config = wl.register_hyperparams("config", path)
    model = wl.register_model(nn.Linear(4, 2))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    watched = system.watched_files["config"]

    def step() -> None:
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()

    step()
    first = system.experiment_hash
    seen = watched.events
    save_like_ide(path, CONFIG.replace("lr: 0.1", "lr: 0.004"))
    assert watched.wait_for_events(seen + 1, timeout=10)
    deadline = time.monotonic() + 10
    while opt.param_groups[0]["lr"] != 0.004:
        assert time.monotonic() < deadline, "the edit never reached an implicit step boundary"
        step()
    assert config["optimizer"]["lr"] == 0.004
    step()  # the implicit save of the change completes at the next forward
    system.wait()
    child = system.experiment_hash
    assert child != first
    assert system.manager.read_experiment(child).parent.reason == "config_change"
    assert [e.step for e in system.manager.checkpoints([child])] != []
    system.close()
