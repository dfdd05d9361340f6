"""Hostile config input cannot stall, crash or poison training (issue 16): a YAML alias bomb or a huge
file saved into the watched config, values the optimizer would not take, a directory or a pipe in
the file's place, hyperparameters nested too deeply or containing themselves.

Real files, a real watchdog observer, a real training loop; what is asserted is behaviour (the
process goes on, the warning names the file and the limit, the configuration and the optimizer are
unchanged, the step boundary never parses), never a wall-clock time. What these edits cost the step
boundary is measured by benchmarks/hostile_config.py.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.configfile import ConfigFile
from weightslab.distributed.job import Job
from weightslab.errors import HyperparamsError
from weightslab.hyperparams import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, LiveConfig, load_yaml, parse_yaml, to_plain
from weightslab.ledger import Entry
from weightslab.watch import ConfigWatch

CONFIG = ("optimizer:\n  lr: 0.001\n  betas: [0.9, 0.999]\n  eps: 1.0e-8\n  weight_decay: 0.0\n"
          "model:\n  width: 8\nepochs: 3\n")
VALUES = {"optimizer": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
          "model": {"width": 8}, "epochs": 3}


def alias_bomb(levels: int = 9) -> str:
    """The 'billion laughs' (about 400 bytes for 9 levels: 9**9 strings once expanded)."""
    lines = [CONFIG, 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    for prev, cur in zip("abcdefghijklmnop", "bcdefghijklmnop"[: levels - 1]):
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]\n")
    return "".join(lines)


def nested(levels: int) -> str:
    """A YAML mapping whose innermost value sits in ``levels`` mappings, the top one included."""
    return CONFIG + "".join("  " * i + "k:\n" for i in range(levels - 1)) + "  " * (levels - 1) + "k: 1\n"


def save_atomically(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING]


def wait_for_warning(caplog: pytest.LogCaptureFixture, *says: str, timeout: float = 10.0) -> logging.LogRecord:
    """The first warning that says all of ``says``, waited for without any step boundary."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in warnings_of(caplog) if all(s in r.getMessage() for s in says)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no warning saying {says}: {[r.getMessage() for r in warnings_of(caplog)]}"
        time.sleep(0.01)


class Loop:
    """A small real Adam training loop whose hyperparameters come from a watched YAML file."""

    def __init__(self, root: Path, tmp_path: Path, text: str = CONFIG, **settings: Any):
        self.path = tmp_path / "config.yaml"
        self.path.write_text(text)
        settings = {"checkpoint_frequency": None, "save_on_close": False, **settings}
        self.system = wl.get_checkpoint_system(root_log_dir=root, **settings)
        self.config = wl.register_hyperparams("config", self.path)
        torch.manual_seed(0)
        self.model = wl.register_model(nn.Linear(4, 8))
        opt = self.config["optimizer"]
        self.opt = wl.register_optimizer(torch.optim.Adam(self.model.parameters(), lr=opt["lr"],
                                                          betas=tuple(opt["betas"]), eps=opt["eps"]))
        self.watched = self.system.watched_files["config"]
        self.step = 0
        self.train()
        self.first = self.system.experiment_hash

    @property
    def group(self) -> dict[str, Any]:
        return self.opt.param_groups[0]

    def train(self, n: int = 1, boundary: Callable[[int], Any] = wl.checkpoint_on_step) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            self.model(torch.randn(2, 4)).pow(2).mean().backward()
            self.opt.step()
            self.step += 1
            boundary(self.step)

    def save(self, text: str) -> None:
        """Save the file as an editor would; wait until the observer saw it (no step boundary)."""
        seen = self.watched.events
        save_atomically(self.path, text)
        assert self.watched.wait_for_events(seen + 1, timeout=10), "the watcher saw no event"

    def train_until_settled(self, boundary: Callable[[int], Any] = wl.checkpoint_on_step) -> None:
        deadline = time.monotonic() + 10
        while not (self.watched.settled and self.watched.content == self.path.read_bytes()):
            assert time.monotonic() < deadline, "the edit never reached a step boundary"
            self.train(boundary=boundary)

    def assert_unchanged(self) -> None:
        assert self.config == VALUES
        assert self.group["lr"] == 0.001 and self.group["betas"] == (0.9, 0.999)
        assert self.system.experiment_hash == self.first
        assert all(torch.isfinite(p).all() for p in self.model.parameters())


# --- 11. a hostile file costs the training thread nothing ------------------------------------------
@pytest.mark.parametrize("hostile, says", [
    (alias_bomb(9), f"more than {MAX_NODES:,} values"),
    ("optimizer:\n  lr: 0.01\ntable:\n" + "  k: 0.123456789\n" * (MAX_FILE_BYTES // 16 + 1),
     f"more than {MAX_FILE_BYTES:,} bytes"),
    (nested(MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels deep"),
])
def test_a_hostile_file_is_refused_by_the_reader_thread_and_training_goes_on(root, tmp_path, caplog, hostile, says):
    loop = Loop(root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        loop.save(hostile)
        # no step boundary runs until the refusal is logged: it is not the training thread's work
        record = wait_for_warning(caplog, str(loop.path), says, "previous configuration is kept")
        assert record.threadName != threading.current_thread().name
        loop.train(5)
        assert loop.watched.wait_until_read(timeout=10) and loop.watched.settled
    loop.assert_unchanged()
    assert len([r for r in warnings_of(caplog) if says in r.getMessage()]) == 1  # said once
    save_atomically(loop.path, CONFIG.replace("lr: 0.001", "lr: 0.002"))  # the next good version applies
    loop.train_until_settled()
    assert loop.group["lr"] == 0.002 and loop.config["optimizer"]["lr"] == 0.002
    loop.system.close()


def test_the_step_boundary_never_reads_nor_parses_the_file(root, tmp_path):
    """Functions called on the training thread during the boundaries that apply an edit (a profile
    hook, which sees only this thread): the merge runs there, the read and the parse do not."""
    loop = Loop(root, tmp_path)
    called: set[str] = set()

    def profiled(step: int) -> None:
        def hook(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                called.add(frame.f_code.co_name)
        sys.setprofile(hook)
        try:
            wl.checkpoint_on_step(step)
        finally:
            sys.setprofile(None)

    loop.save(CONFIG.replace("lr: 0.001", "lr: 0.004"))
    loop.train_until_settled(boundary=profiled)
    assert loop.group["lr"] == 0.004 and loop.system.experiment_hash != loop.first
    assert "merge_edit" in called  # the hook saw the boundary that applied the edit
    reading = called & {"parse_yaml", "read_config", "load_yaml", "_load", "_read", "get_single_node"}
    assert reading == set()
    loop.system.close()


def test_a_directory_in_place_of_the_watched_file_warns_and_close_does_not_raise(root, tmp_path, caplog):
    loop = Loop(root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        seen = loop.watched.events
        loop.path.unlink()
        loop.path.mkdir()
        assert loop.watched.wait_for_events(seen + 1, timeout=10)
        loop.train(3)
        wait_for_warning(caplog, str(loop.path), "is a directory", "previous configuration is kept")
        loop.train(3)
    loop.assert_unchanged()
    loop.system.wait()  # nothing failed: no checkpoint was lost, nothing to raise
    loop.path.rmdir()
    save_atomically(loop.path, CONFIG.replace("lr: 0.001", "lr: 0.003"))  # back: edits apply again
    loop.train_until_settled()
    assert loop.group["lr"] == 0.003
    loop.system.close()


def test_a_pipe_in_place_of_the_watched_file_does_not_block_the_reader(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    live = LiveConfig(load_yaml(path))
    watched = ConfigFile(path, live, debounce=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="weightslab"):
            path.unlink()
            os.mkfifo(path)  # opening it for reading would wait for a writer forever
            wait_for_warning(caplog, str(path), "not a regular file")
        assert watched.poll() is None and live == VALUES
    finally:
        watched.close()  # joins the reader: it is not stuck in open()


# --- 12. values bound to the optimizer are checked as the optimizer would ----------------------------
@pytest.mark.parametrize("old, new, says", [
    ("lr: 0.001", "lr: .nan", "'optimizer.lr' = nan cannot be optimizer 'main''s lr: lr must be finite"),
    ("lr: 0.001", "lr: .inf", "'optimizer.lr' = inf cannot be optimizer 'main''s lr: lr must be finite"),
    ("lr: 0.001", "lr: -1", "'optimizer.lr' = -1.0 cannot be optimizer 'main''s lr: lr must be >= 0"),
    ("betas: [0.9, 0.999]", "betas: [0.9]", "'optimizer.betas' = [0.9] cannot be optimizer 'main''s betas: betas "
                                             "must be a list of 2 values"),
    ("betas: [0.9, 0.999]", "betas: [2.0, 0.999]", "'optimizer.betas' = [2.0, 0.999] cannot be optimizer 'main''s "
                                                    "betas: each of betas must be in [0, 1)"),
    ("eps: 1.0e-8", "eps: -1.0e-8", "'optimizer.eps' = -1e-08 cannot be optimizer 'main''s eps: eps must be >= 0"),
    ("weight_decay: 0.0", "weight_decay: -0.5", "'optimizer.weight_decay' = -0.5 cannot be optimizer 'main''s "
                                                "weight_decay: weight_decay must be >= 0"),
])
def test_an_edit_the_optimizer_would_not_take_is_refused_whole(root, tmp_path, caplog, old, new, says):
    loop = Loop(root, tmp_path, checkpoint_frequency=1)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        # with another key in the same edit: the edit is refused as a whole, like a wrongly typed value
        loop.save(CONFIG.replace(old, new).replace("epochs: 3", "epochs: 4"))
        loop.train_until_settled()
        loop.train(3)  # a plain loop goes on: no optimizer.step() raises, no weight turns NaN
    messages = [r.getMessage() for r in warnings_of(caplog)]
    line = CONFIG[: CONFIG.index(old)].count("\n") + 1
    assert any(f"{loop.path}, line {line}: {says}" in m and "previous configuration is kept" in m
               for m in messages), messages
    loop.assert_unchanged()  # the run, the optimizer and the experiment: what trains is what is recorded
    loop.system.wait()
    saved = wl.load(f"{loop.first}@{loop.step}", root=root)
    assert saved["hyperparams"]["config"] == VALUES
    assert saved["optimizers"]["main"]["param_groups"][0]["lr"] == 0.001
    save_atomically(loop.path, CONFIG.replace("lr: 0.001", "lr: 0.002"))  # a good version applies again
    loop.train_until_settled()
    assert loop.group["lr"] == 0.002 and loop.config["epochs"] == 3
    loop.system.close()


def test_paths_bound_by_optimizer_keys_are_checked_too(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    live = LiveConfig(load_yaml(path))
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    watch = ConfigWatch(mode="auto", optimizer_keys={"train.learning_rate": "lr"})
    watch.attach(Entry("optimizer", "main", opt))
    watch.attach(Entry("hyperparams", "config", live, source=path))
    watched = watch.files["config"]
    job = Job()
    try:
        def take_until_settled() -> list[dict[str, Any]]:
            deadline, changes = time.monotonic() + 10, []
            while not (watched.settled and watched.content == path.read_bytes()):
                assert time.monotonic() < deadline
                changes += watch.take(1, {"config": live}, job)
                time.sleep(0.01)
            return changes

        with caplog.at_level(logging.WARNING, logger="weightslab"):
            seen = watched.events
            save_atomically(path, "train:\n  learning_rate: .inf\n")
            assert watched.wait_for_events(seen + 1, timeout=10)
            assert take_until_settled() == []
        assert live == {"train": {"learning_rate": 0.1}}
        assert any(f"{path}, line 2: 'train.learning_rate' = inf cannot be optimizer 'main''s lr: lr must be finite"
                   in r.getMessage() for r in warnings_of(caplog))
        seen = watched.events
        save_atomically(path, "train:\n  learning_rate: 0.05\n")
        assert watched.wait_for_events(seen + 1, timeout=10)
        assert [c["diff"] for c in take_until_settled()] == [["train.learning_rate: 0.1 -> 0.05"]]
        assert live == {"train": {"learning_rate": 0.05}}
    finally:
        watch.close()


# --- registration is bounded the same way ------------------------------------------------------------
@pytest.mark.parametrize("text, says", [
    (alias_bomb(6), f"expands to more than {MAX_NODES:,} values"),  # (531,441 strings: a slow accept before)
    ("a: 1\nb: &b [1, *b]\n", "line 2: an alias refers to a value that contains it"),
    ("x: &x {k: 1}\ny: &y {<<: [*x, *x]}\n" + "".join(
        f"z{i}: &z{i} {{<<: [*{p}, *{p}, *{p}, *{p}]}}\n" for i, p in enumerate(["y"] + [f"z{j}" for j in range(8)])),
     f"more than {MAX_NODES:,} values"),  # merge keys repeat what they merge too
    (nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels deep"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "does not parse"),  # libyaml's own limit (1000)
])
def test_registering_a_hostile_file_raises_naming_the_limit(root, tmp_path, text, says):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(HyperparamsError) as info:
        wl.register_hyperparams("config", path)
    assert str(path) in str(info.value) and says in str(info.value)


def test_registering_a_file_over_the_size_limit_raises_without_reading_it(root, tmp_path):
    path = tmp_path / "config.yaml"
    with open(path, "wb") as f:
        f.truncate(26 * 10**6)  # 26 MB (sparse: nothing written)
    with pytest.raises(HyperparamsError) as info:
        wl.register_hyperparams("config", path)
    assert str(info.value).startswith(f"hyperparameter file {path} is 26,000,000 bytes, more than "
                                      f"{MAX_FILE_BYTES:,} bytes, the limit for a config file")


def test_a_file_at_the_limits_is_accepted(tmp_path):
    text = nested(MAX_DEPTH) + "".join(f"v{i}: {i}\n" for i in range(MAX_NODES // 2 - 200))
    assert len(text.encode()) <= MAX_FILE_BYTES
    path = tmp_path / "config.yaml"
    path.write_text(text)
    data = load_yaml(path)
    inner = data
    for _ in range(MAX_DEPTH - 1):
        inner = inner["k"]
    assert inner == {"k": 1}


def test_registering_a_directory_says_what_to_pass(root, tmp_path):
    (tmp_path / "train.yaml").write_text(CONFIG)
    with pytest.raises(HyperparamsError) as info:
        wl.register_hyperparams("config", tmp_path)
    message = str(info.value)
    assert f"hyperparameter file {tmp_path} is a directory (YAML files in it: train.yaml)" in message
    assert f"register_hyperparams(name, {str(tmp_path / 'train.yaml')!r})" in message


# --- hyperparameters nested too deeply, or containing themselves ------------------------------------
def _deep(levels: int) -> dict[str, Any]:
    top = inner = {}
    for _ in range(levels - 1):
        inner["k"] = {}
        inner = inner["k"]
    inner["k"] = 1
    return top


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 340, 980])
def test_hyperparameters_nested_too_deeply_are_refused_at_registration(root, levels):
    with pytest.raises(HyperparamsError) as info:
        wl.register_hyperparams("deep", _deep(levels))
    assert f"nested more than {MAX_DEPTH} levels deep, the limit for hyperparameters" in str(info.value)
    assert str(info.value).startswith("hyperparameters 'deep': 'k.k.k")


def test_hyperparameters_at_the_depth_limit_save_and_load(root):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_hyperparams("deep", _deep(MAX_DEPTH))
    wl.register_model(nn.Linear(2, 2))
    wl.checkpoint_on_step(1)
    system.wait()
    saved = wl.load(f"{system.experiment_hash}@1", root=root)["hyperparams"]["deep"]
    assert saved == _deep(MAX_DEPTH)
    system.close()


@pytest.mark.parametrize("make, says", [
    (lambda d: d.__setitem__("me", d), "'me' is '<top>' itself"),
    (lambda d: d["opt"]["groups"].append(d["opt"]), "'opt.groups[0]' is 'opt' itself"),
])
def test_a_value_that_contains_itself_is_refused_naming_it(root, make, says):
    values: dict[str, Any] = {"lr": 0.1, "opt": {"groups": []}}
    make(values)
    with pytest.raises(HyperparamsError) as info:
        wl.register_hyperparams("loop", values)
    assert str(info.value).startswith(f"hyperparameters 'loop': {says}")
    shared = [1, 2]
    assert to_plain({"a": shared, "b": shared}) == {"a": [1, 2], "b": [1, 2]}  # shared, not circular: fine


def test_parse_yaml_bounds_are_checked_before_values_are_built():
    with pytest.raises(HyperparamsError, match=f"more than {MAX_NODES:,} values"):
        parse_yaml(alias_bomb(9), where="bomb.yaml")  # 9**9 strings: only the nodes are looked at
    data, marks = parse_yaml("a: &a [1, 2]\nb: *a\nc: .nan\n", where="c.yaml")
    assert data["a"] == data["b"] == [1, 2] and math.isnan(data["c"]) and marks[("c",)][0] == 3
