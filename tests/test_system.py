"""The automatic checkpoint system end to end, in process: layout, triggers, experiments, resume, errors."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import weightslab as wl
from weightslab.process import running_system
from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

from .support import make_model, manifests, read_manifest, run_python


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def setup_run(root: Path, *, frequency: int | None = 5, config: dict | None = None, **settings):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=frequency, **settings)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    cfg = wl.register_hyperparams("config", config if config is not None else {"lr": 0.1, "width": 8})
    return system, model, opt, cfg


def read_experiment(root: Path, exp: str) -> dict:
    return json.loads(Layout(root).experiment_record(exp).read_text())


# --- 5. layout and 6. frequency ---------------------------------------------------------------

def test_layout_and_frequency(root: Path) -> None:
    system, model, opt, cfg = setup_run(root)
    losses = {}
    for step in range(1, 13):
        loss = losses[step] = train_step(model, opt)
        wl.checkpoint_on_step(step, metrics={"loss": loss})
    h = system.experiment_hash
    system.close()

    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert manifests(root) == {h: [5, 10, 12]}  # every 5 steps, plus the final state at close
    exp_dir = root / "checkpoints" / h
    assert (exp_dir / "model" / f"{h}_step_000005.json").is_file()
    assert (exp_dir / "data").is_dir()
    assert "Linear(in_features=4, out_features=8, bias=True)" in (exp_dir / "model" / f"{h}_architecture.txt").read_text()
    assert yaml.safe_load((exp_dir / "hp" / f"{h}_config.yaml").read_text()) == {"lr": 0.1, "width": 8}
    record = read_experiment(root, h)
    assert record["experiment"] == h and record["parent"] is None
    assert record["hyperparams"] == {"config": {"lr": 0.1, "width": 8}}

    m5 = read_manifest(root, h, 5)
    assert m5["reasons"] == ["step"] and m5["step"] == 5
    assert m5["metrics"] == {"loss": losses[5]}  # the metrics passed at step 5, exactly
    assert set(m5["tensors"]) >= {"models/main/0.weight", "models/main/2.bias"}
    m12 = read_manifest(root, h, 12)
    assert m12["reasons"] == ["exit"]
    assert m12["metrics"] == {"loss": losses[12]}  # the exit checkpoint keeps the last step's metrics
    for entry in m5["tensors"].values():  # tensor data lives in the shared content-addressed store
        assert (root / "objects" / entry["pack"][:2] / f"{entry['pack'][2:]}.safetensors").is_file()


def test_checkpoint_holds_the_weights_bit_for_bit(root: Path) -> None:
    system, model, opt, _ = setup_run(root)
    for step in range(1, 6):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
    system.wait()
    manager = CheckpointManager(root)
    manifest = manager.read_manifest(manager.checkpoints()[-1])
    tensors = load_tensors(manager, manifest)
    for name, value in model.state_dict().items():
        assert torch.equal(tensors[f"models/main/{name}"], value)
    system.close()


# --- 6. change detection ----------------------------------------------------------------------

def test_in_place_hyperparameter_change_opens_a_child_experiment(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=100)
    for step in range(1, 4):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
    parent = system.experiment_hash
    cfg["lr"] = 0.01  # mutate the registered dict in place
    train_step(model, opt)
    assert wl.checkpoint_on_step(4) is True
    child = system.experiment_hash
    system.close()

    assert child != parent
    assert manifests(root)[child] == [4]
    record = read_experiment(root, child)
    assert record["parent"]["ref"] == f"{parent}@3" and record["parent"]["reason"] == "config_change"
    assert any("lr: 0.1 -> 0.01" in line for line in record["parent"]["changes"])
    m = read_manifest(root, child, 4)
    assert m["reasons"] == ["config_change"]
    assert yaml.safe_load((root / "checkpoints" / child / "hp" / f"{child}_config.yaml").read_text())["lr"] == 0.01


def test_data_and_logging_keys_never_open_an_experiment(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=100,
                                        config={"lr": 0.1, "log_every": 10, "augmentation": {"flip": True}})
    train_step(model, opt)
    wl.checkpoint_on_step(1)
    h = system.experiment_hash
    cfg["log_every"] = 50
    cfg["augmentation"]["flip"] = False
    train_step(model, opt)
    assert wl.checkpoint_on_step(2) is False
    assert system.experiment_hash == h
    system.close()
    assert list(manifests(root)) == [h]


def test_architecture_change_opens_a_child_experiment(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=100)
    train_step(model, opt)
    wl.checkpoint_on_step(1)
    parent = system.experiment_hash
    model[2] = nn.Linear(8, 3)  # resized output layer
    opt.add_param_group({"params": model[2].parameters()})
    model(torch.randn(2, 4))
    assert wl.checkpoint_on_step(2) is True
    child = system.experiment_hash
    system.close()
    assert child != parent
    record = read_experiment(root, child)
    assert record["parent"] == {**record["parent"], "experiment": parent, "step": 1, "reason": "model_change"}
    assert any("out_features=1" in c and "out_features=3" in c for c in record["parent"]["changes"])
    assert read_manifest(root, child, 2)["tensors"]["models/main/2.weight"]["shape"] == [3, 8]


def test_removing_a_layer_is_detected(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=100)
    wl.checkpoint_on_step(1)
    parent = system.experiment_hash
    del model[1]  # no registration hook fires for a deletion
    assert wl.checkpoint_on_step(2) is True
    assert system.experiment_hash != parent
    system.close()


def test_freeze_is_a_state_change_in_the_same_experiment(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=100)
    wl.checkpoint_on_step(1)
    h = system.experiment_hash
    model[0].requires_grad_(False)
    assert wl.checkpoint_on_step(2) is True
    assert system.experiment_hash == h
    system.wait()
    m = read_manifest(root, h, 2)
    assert m["reasons"] == ["state_change"]
    assert m["changes"][0]["kind"] == "freeze" and m["changes"][0]["names"] == ["0.weight", "0.bias"]
    assert m["state"]["models"]["main"]["frozen"] == ["0.weight", "0.bias"]
    system.close()


def test_eval_counts_only_when_it_lasts(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=100)
    wl.checkpoint_on_step(1)
    model.eval()  # validation around one boundary, then back: not a change of the run
    assert wl.checkpoint_on_step(2) is False
    model.train()
    assert wl.checkpoint_on_step(3) is False
    model[1].eval()  # lasting switch of one submodule
    assert wl.checkpoint_on_step(4) is False
    assert wl.checkpoint_on_step(5) is True
    system.wait()
    m = read_manifest(root, system.experiment_hash, 5)
    assert m["changes"][0]["kind"] == "eval" and m["changes"][0]["names"] == ["1"]
    system.close()


def test_explicit_change_calls_force_a_checkpoint(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=100, save_on_close=False)
    train_step(model, opt)
    wl.checkpoint_on_step(7)
    h = system.experiment_hash
    assert wl.checkpoint_on_state_change("reset") is True
    assert wl.checkpoint_on_model_change() is True
    assert wl.checkpoint_on_config_change() is True
    system.wait()
    m = read_manifest(root, h, 7)  # the same step label: the latest state of step 7 wins
    assert m["reasons"] == ["config_change"]
    assert manifests(root) == {h: [7]}
    system.close()


def test_optimizer_hook_checkpoints_a_loop_that_never_calls_checkpoint_on_step(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=3)
    for _ in range(7):
        train_step(model, opt)
    system.close()
    assert list(manifests(root).values()) == [[3, 6, 7]]


def test_hook_can_be_turned_off(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=3, hook_optimizer=False)
    for _ in range(7):
        train_step(model, opt)
    system.close()
    assert manifests(root) == {}


# --- 8. resume ---------------------------------------------------------------------------------

def test_resume_on_an_empty_root_returns_zero(root: Path) -> None:
    system, *_ = setup_run(root)
    assert system.resume() == 0
    system.close()


def test_resume_restores_every_registered_object(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    wl.register_scheduler(sched)
    extra = {"episodes": 3, "buffer": torch.arange(5.0)}
    wl.register_state("env", lambda: extra, lambda s: extra.update(s))
    for step in range(1, 5):
        train_step(model, opt)
        sched.step()
        wl.checkpoint_on_step(step)
    model[0].requires_grad_(False)
    model[1].eval()
    wl.checkpoint_on_state_change("freeze")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt, saved_sched, rng = opt.state_dict(), sched.state_dict(), torch.get_rng_state()
    system.close()

    # scramble everything, then resume into the same objects
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.requires_grad_(True)
    model.train()
    for _ in range(3):
        train_step(model, opt)
        sched.step()
    cfg["lr"] = 5.0
    extra.update({"episodes": 0, "buffer": torch.zeros(5)})
    torch.rand(10)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=4)
    cfg["lr"] = 0.1  # back to the run's configuration, so "latest" finds its lineage
    assert system.resume() == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert model[1].training is False and model[0].training is True
    assert opt.state_dict()["param_groups"] == saved_opt["param_groups"]
    assert sched.state_dict() == saved_sched
    assert extra["episodes"] == 3 and torch.equal(extra["buffer"], torch.arange(5.0))
    assert torch.equal(torch.get_rng_state(), rng)
    system.close()


def test_resume_by_hash_at_step_and_by_path(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=2)
    weights = {}
    for step in range(1, 7):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
        weights[step] = model[0].weight.detach().clone()
    h = system.experiment_hash
    system.wait()
    assert system.resume(f"{h}@4") == 4
    assert torch.equal(model[0].weight, weights[4])
    assert system.resume(f"{h[:6]}@2") == 2
    assert torch.equal(model[0].weight, weights[2])
    assert system.resume(Layout(root).manifest(h, 6)) == 6
    assert torch.equal(model[0].weight, weights[6])
    with pytest.raises(wl.CheckpointNotFoundError, match="no checkpoint at step 5 .* steps: 2, 4, 6"):
        system.resume(f"{h}@5")
    with pytest.raises(wl.CheckpointNotFoundError, match="no experiment hash starts with 'ffff'"):
        system.resume("ffff@1")
    system.close()


def test_architecture_mismatch_lists_names_and_shapes_and_changes_nothing(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=1)
    train_step(model, opt)
    wl.checkpoint_on_step(1)
    h = system.experiment_hash
    system.close()

    other = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Linear(1, 1))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    system = wl.get_checkpoint_system(root_log_dir=root)
    wl.register_model(other)
    wl.register_optimizer(torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(wl.ArchitectureMismatchError) as info:
        system.resume(f"{h}@1")
    text = str(info.value)
    assert "0.weight is [8, 4] torch.float32 in the checkpoint, [16, 4] torch.float32 in the model" in text
    assert "3.weight [1, 1] is in the model but not in the checkpoint" in text
    assert "system.peek(ref)" in text
    assert len(info.value.differences) >= 4
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    system.close()


def test_latest_follows_the_lineage_to_the_newest_descendant(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=100)
    wl.checkpoint_on_step(1)
    cfg["lr"] = 0.05
    wl.checkpoint_on_step(2)
    child = system.experiment_hash
    system.close()
    # A fresh process would rebuild the original configuration; "latest" is the child's checkpoint.
    cfg["lr"] = 0.1
    system = wl.get_checkpoint_system(root_log_dir=root)
    info = system.peek()
    assert info is not None and info.ref == f"{child}@2" and info.hyperparams["config"]["lr"] == 0.05
    assert info.parent is not None and info.parent.endswith("@1")
    assert system.resume() == 2
    assert cfg["lr"] == 0.05 and system.experiment_hash == child
    system.close()


def test_damaged_latest_falls_back_to_the_newest_that_verifies(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    system, model, opt, _ = setup_run(root, frequency=1, save_on_close=False)
    for step in (1, 2):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
    h = system.experiment_hash
    system.wait()
    pack = next(iter(read_manifest(root, h, 2)["tensors"].values()))
    pack_path = root / "objects" / pack["pack"][:2] / f"{pack['pack'][2:]}.safetensors"
    data = bytearray(pack_path.read_bytes())
    data[pack["offset"]] ^= 0x01
    pack_path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert system.resume() == 1
    assert f"{h}@2 is damaged" in caplog.text
    with pytest.raises(wl.CorruptCheckpointError, match=str(pack_path)):
        system.resume(f"{h}@2")
    system.close()


def test_resume_with_a_different_configuration_branches(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=1, save_on_close=False)
    wl.checkpoint_on_step(3)
    original = system.experiment_hash
    system.close()
    system = wl.get_checkpoint_system(root_log_dir=root, save_on_close=False)
    wl.register_hyperparams("extra", {"dropout": 0.5})  # not in the checkpoint: cannot be overwritten
    assert system.resume(f"{original}@3") == 3
    branched = system.experiment_hash
    system.wait()
    assert branched != original
    record = read_experiment(root, branched)
    assert record["parent"]["ref"] == f"{original}@3" and record["parent"]["reason"] == "resume_with_changes"
    assert read_manifest(root, branched, 3)["reasons"] == ["resume_with_changes"]
    system.close()


def test_warns_when_a_fresh_run_lands_in_an_experiment_with_checkpoints(root: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    system, model, opt, _ = setup_run(root, frequency=1)
    wl.checkpoint_on_step(1)
    system.close()
    system = wl.get_checkpoint_system(root_log_dir=root)
    with caplog.at_level(logging.WARNING):
        wl.checkpoint_on_step(1)
    assert "did not resume" in caplog.text and "system.resume()" in caplog.text
    system.close()


# --- 9. failures and bad input ----------------------------------------------------------------

def test_a_failed_save_never_stops_training_and_is_raised_from_wait(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "objects").write_text("not a directory")  # every pack write fails
    system, model, opt, _ = setup_run(root, frequency=1)
    for step in range(1, 4):
        train_step(model, opt)
        assert wl.checkpoint_on_step(step) is True  # training goes on
    with pytest.raises(wl.CheckpointSaveError, match="3 checkpoint save") as info:
        system.wait()
    assert len(info.value.errors) == 3
    system.wait()  # errors are raised once
    (root / "objects").unlink()
    train_step(model, opt)
    wl.checkpoint_on_step(4)
    system.close()
    assert list(manifests(root).values()) == [[4]]


def test_a_failing_custom_state_getter_is_kept_and_raised_from_close(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=1)
    wl.register_state("env", lambda: 1 / 0, lambda s: None)
    wl.checkpoint_on_step(1)
    with pytest.raises(wl.CheckpointSaveError, match="custom state 'env'"):
        system.close()
    assert system.closed


def test_strict_raises_at_once(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "objects").write_text("not a directory")
    system, model, opt, _ = setup_run(root, frequency=1, strict=True, save_on_close=False)
    with pytest.raises(wl.CheckpointSaveError, match=r"checkpoint [0-9a-f]{16}@1 failed"):
        wl.checkpoint_on_step(1)
    system.close()


def test_bad_input_gets_errors_that_name_the_object_and_the_fix(root: Path, tmp_path: Path) -> None:
    system, model, opt, cfg = setup_run(root)
    with pytest.raises(wl.NotRegisteredError, match=r"no model named 'student'.*register_model\('student'"):
        wl.get_model("student")
    with pytest.raises(wl.HyperparamsError, match="'model.act'"):
        wl.register_hyperparams("bad", {"model": {"act": torch.relu}})
    bad_yaml = tmp_path / "config.yaml"
    bad_yaml.write_text("lr: 0.1\nmodel:\n  width: [1, 2\n")
    with pytest.raises(wl.HyperparamsError, match=r"config.yaml, line \d+"):
        wl.register_hyperparams("file", bad_yaml)
    with pytest.raises(wl.InvalidStepError, match="integer step"):
        wl.checkpoint_on_step(1.5)
    with pytest.raises(wl.InvalidStepError):
        wl.checkpoint_on_step(-1)
    with pytest.raises(wl.InvalidMetricsError, match="'acc'"):
        wl.checkpoint_on_step(1, metrics={"acc": [0.5]})
    with pytest.raises(wl.RegistrationError, match="torch.nn.Module"):
        wl.register_model("m", {"not": "a model"})
    with pytest.raises(TypeError):  # also catchable as the builtin
        wl.checkpoint_on_step("3")
    system.close()


def test_unserializable_value_put_into_live_config_is_reported_not_fatal(root: Path) -> None:
    system, model, opt, cfg = setup_run(root, frequency=100)
    wl.checkpoint_on_step(1)
    cfg["fn"] = len
    assert wl.checkpoint_on_step(2) is False  # training goes on in the same experiment
    with pytest.raises(wl.CheckpointSaveError, match="'fn'"):
        system.wait()
    del cfg["fn"]  # fixed: the final checkpoint at close can be saved again
    system.close()
    assert list(manifests(root).values()) == [[2]]


# --- 3. the singleton --------------------------------------------------------------------------

def test_first_registration_starts_the_system_under_the_default_root(root: Path) -> None:
    assert running_system() is None
    wl.register_model(make_model())
    system = wl.get_checkpoint_system()
    assert system.root == root.absolute()
    assert wl.get_checkpoint_system() is system
    # not saved yet: new settings replace it
    again = wl.get_checkpoint_system(checkpoint_frequency=7)
    assert again is not system and system.closed and again.config.checkpoint_frequency == 7
    wl.checkpoint_on_step(7)
    with pytest.raises(wl.ConfigError, match="checkpoint_frequency: 7 -> 9.*close"):
        wl.get_checkpoint_system(checkpoint_frequency=9)
    with pytest.raises(wl.ConfigError, match="settings are: root_log_dir"):
        wl.get_checkpoint_system(frequency=9)
    with pytest.raises(wl.ConfigError, match="auto_init=False"):
        wl.get_checkpoint_system(auto_init=False)
    assert wl.get_checkpoint_system(auto_init=True) is again
    with pytest.raises(wl.ConfigError, match="positive integer"):
        wl.AutomaticCheckpointSystem(checkpoint_frequency=0)
    again.close()


def test_the_write_up_names_work_unchanged() -> None:
    from weightslab import components as c
    for name in ("get_checkpoint_system", "checkpoint_on_step", "checkpoint_on_model_change",
                 "checkpoint_on_config_change", "checkpoint_on_state_change", "ExperimentHashGenerator",
                 "CheckpointManager", "AutomaticCheckpointSystem"):
        assert getattr(c, name) is getattr(wl, name)


def test_close_is_idempotent_and_joins_the_writer(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=1)
    wl.checkpoint_on_step(1)
    writer_thread = next(t for t in threading.enumerate() if t.name == "weightslab-writer")
    system.close()
    system.close()
    assert not writer_thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("weightslab")]
    with pytest.raises(wl.ConfigError, match="closed"):
        system.checkpoint_on_step(2)


EXIT_SCRIPT = """
import os, sys, torch, weightslab as wl
from torch import nn
model = nn.Linear(2, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
wl.get_checkpoint_system(root_log_dir=sys.argv[1], checkpoint_frequency=100)
wl.register_model(model); wl.register_optimizer(opt)
for step in range(1, 8):
    model(torch.randn(1, 2)).sum().backward(); opt.step()
    wl.checkpoint_on_step(step)
if sys.argv[2] == "crash-mid-step":
    model(torch.randn(1, 2)).sum().backward(); opt.step()  # step 8 updated, never marked
    raise RuntimeError("boom")
if sys.argv[2] == "crash-at-boundary":
    raise RuntimeError("boom")
"""


@pytest.mark.parametrize("mode, expected", [("normal", {7: ["exit"]}), ("crash-mid-step", {}),
                                            ("crash-at-boundary", {})])
def test_close_runs_at_interpreter_exit(tmp_path: Path, mode: str, expected: dict) -> None:
    root = tmp_path / "r"
    proc = run_python(EXIT_SCRIPT, args=[str(root), mode], check=False)
    assert proc.returncode == (0 if mode == "normal" else 1), proc.stderr
    layout = Layout(root)
    found = {s: json.loads(p.read_text())["reasons"] for h in layout.experiments() for s, p in layout.manifests(h)}
    assert found == expected
    assert not list(root.rglob(".tmp.*")) if root.exists() else True


def test_no_file_handle_or_temp_file_left(root: Path) -> None:
    system, model, opt, _ = setup_run(root, frequency=1)
    for step in range(1, 4):
        train_step(model, opt)
        wl.checkpoint_on_step(step)
    system.close()
    assert not list(root.rglob(".tmp.*"))
    fd_dir = Path(f"/proc/{os.getpid()}/fd")
    if fd_dir.exists():
        open_paths = [os.readlink(fd) for fd in fd_dir.iterdir() if os.path.exists(fd)]
        assert not [p for p in open_paths if p.startswith(str(root))]
