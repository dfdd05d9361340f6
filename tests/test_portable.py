"""Getting checkpoints out (weightslab/portable.py): load() as plain Python, export() to .safetensors and .pt.

Checkpoints come from real training runs through the real checkpoint system; every comparison is
bit for bit against the live state recorded at the step the checkpoint was taken.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import weightslab as wl
from weightslab.portable import export, load
from weightslab.storage.layout import Layout

from .support import DATA, manifests, read_manifest, run_python
WHEN = dt.datetime(2024, 5, 17, 12, 30, 15, 250, tzinfo=dt.timezone.utc)


class Net(nn.Module):
    """A model class that exists only in this test module: loading must never need it."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, width)
        self.head = nn.Linear(width, 2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.head(torch.relu(self.encoder(x)))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal values of equal types; tensors and arrays bit for bit (dtype and shape included)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Run:
    """A real training run with checkpoints at every step, and the live state at each of them."""

    def __init__(self, root: Path, *, names: tuple[str, ...] = ("main",), steps: int = 3, width: int = 6,
                 **settings: Any) -> None:
        self.system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                               **settings)
        torch.manual_seed(0)
        self.models = {name: Net(width) for name in names}
        for name, model in self.models.items():
            wl.register_model(name, model)
        params = [p for m in self.models.values() for p in m.parameters()]
        self.opt = torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99))
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        wl.register_optimizer(self.opt)
        wl.register_scheduler(self.sched)
        self.cfg = wl.register_hyperparams("config", {"lr": 0.01, "betas": (0.8, 0.99), "layers": [4, width, 2],
                                                      "data": Path("/data/train"), "when": WHEN.date()})
        self.extra: dict[str, Any] = {
            "episodes": 0, "buffer": np.arange(5.0), "counts": np.array([[1, 2], [3, 4]], dtype=np.int32),
            "pair": (1, "a"), "path": Path("/data/run"), "when": WHEN, "dtype": torch.float16,
            "device": torch.device("cpu"), "by_id": {7: "seven"}, "blob": b"\x00\xff", "nan": math.nan,
        }
        wl.register_state("env", lambda: self.extra, self.extra.update)
        self.live: dict[int, dict[str, Any]] = {}
        for step in range(1, steps + 1):
            self.step(step)
        self.system.wait()
        self.hash = self.system.experiment_hash

    def step(self, step: int) -> None:
        loss = sum(m(torch.randn(8, 4)).pow(2).mean() for m in self.models.values())
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.extra["episodes"] += 1
        self.extra["buffer"] = self.extra["buffer"] + 0.5
        assert wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
        self.live[step] = {
            "models": {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in self.models.items()},
            "optimizer": copy.deepcopy(self.opt.state_dict()),
            "scheduler": copy.deepcopy(self.sched.state_dict()),
            "hyperparams": copy.deepcopy(self.cfg),
            "custom": copy.deepcopy(self.extra),
            "loss": loss.item(),
        }


# --- load() -----------------------------------------------------------------------------------

def test_load_returns_the_live_state_of_that_step_as_plain_python(root: Path) -> None:
    run = Run(root, steps=3)
    h = run.hash
    for step in (2, 3):
        state = load(f"{h}@{step}", root=root)
        live = run.live[step]
        assert list(state) == ["ref", "experiment", "step", "reasons", "metrics", "models", "model_flags",
                               "optimizers", "schedulers", "scalers", "hyperparams", "dataloaders", "custom", "rng",
                               "exact", "archive"]
        assert state["exact"] is True and state["archive"] == {}
        assert state["ref"] == f"{h}@{step}" and state["experiment"] == h and state["step"] == step
        assert state["reasons"] == ["step"]
        assert state["metrics"] == {"loss": live["loss"]}
        assert_same(state["models"], live["models"], "models")
        assert state["model_flags"] == {"main": {"frozen": [], "eval": []}}
        assert_same(state["optimizers"], {"main": live["optimizer"]}, "optimizers")
        assert_same(state["schedulers"], {"main": live["scheduler"]}, "schedulers")
        assert_same(state["hyperparams"], {"config": live["hyperparams"]}, "hyperparams")
        assert_same(state["custom"], {"env": live["custom"]}, "custom")  # numpy arrays, tuples, paths...
        assert state["scalers"] == {} and state["dataloaders"] == {}
        assert set(state["rng"]) >= {"python", "numpy", "torch"}
        assert isinstance(state["rng"]["torch"], torch.Tensor)
    # the step-2 state really is an older one
    assert not torch.equal(load(f"{h}@2", root=root)["models"]["main"]["encoder.weight"],
                           run.live[3]["models"]["main"]["encoder.weight"])
    run.system.close()


def test_load_resolves_latest_prefixes_and_paths(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(root, steps=3)
    h = run.hash
    run.system.close()
    assert load(root=root)["ref"] == f"{h}@3"  # "latest" is the default
    assert load("latest", root=root)["ref"] == f"{h}@3"
    assert load(f"{h}@latest", root=root)["ref"] == f"{h}@3"
    assert load(f"{h[:6]}@2", root=root)["ref"] == f"{h}@2"
    manifest = Layout(root).manifest(h, 1)
    assert load(manifest, root=root)["ref"] == f"{h}@1"
    # a path names its root: no root= needed, whatever the default root is
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(root.parent / "another-root"))
    state = load(manifest)
    assert state["ref"] == f"{h}@1"
    assert_same(state["models"], run.live[1]["models"])
    assert load(Layout(root).experiment_dir(h))["ref"] == f"{h}@3"
    # the default root is $WEIGHTSLAB_ROOT
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(root))
    assert load()["ref"] == f"{h}@3"


def test_latest_is_the_newest_checkpoint_of_the_whole_root(root: Path) -> None:
    run = Run(root, steps=2)
    parent = run.hash
    run.cfg["lr"] = 0.005  # a hyperparameter change opens a child experiment
    run.step(3)
    run.system.wait()
    child = run.system.experiment_hash
    assert child != parent
    state = load(root=root)
    assert state["ref"] == f"{child}@3" and "config_change" in state["reasons"]
    assert state["hyperparams"]["config"]["lr"] == 0.005
    assert_same(state["models"], run.live[3]["models"])
    assert load(f"{parent}@latest", root=root)["ref"] == f"{parent}@2"
    run.system.close()


def test_load_records_frozen_parameters_and_eval_modules(root: Path) -> None:
    run = Run(root, steps=1)
    run.models["main"].encoder.requires_grad_(False)
    run.models["main"].head.eval()
    assert wl.checkpoint_on_state_change("freeze")
    run.system.wait()
    state = load(f"{run.hash}@1", root=root)
    assert state["model_flags"] == {"main": {"frozen": ["encoder.weight", "encoder.bias"], "eval": ["head"]}}
    run.system.close()


LOAD_IN_FRESH_PROCESS = r"""
import json, sys
sys.modules["tests"] = None  # the test package, and the model class defined in it, cannot be imported
import weightslab.portable as wx
state = wx.load(sys.argv[1], root=sys.argv[2])
print(json.dumps({
    "ref": state["ref"], "step": state["step"],
    "shapes": {n: {k: list(v.shape) for k, v in sd.items()} for n, sd in state["models"].items()},
    "values": {k: v.tolist() for k, v in state["models"]["main"].items()},
    "buffer": state["custom"]["env"]["buffer"].tolist(), "pair": list(state["custom"]["env"]["pair"]),
    "exp_avg": state["optimizers"]["main"]["state"][0]["exp_avg"].tolist(),
    "lr": state["hyperparams"]["config"]["lr"],
    "tests_imported": sorted(m for m, v in sys.modules.items() if m.startswith("tests") and v is not None),
}))
"""


def test_load_works_in_a_fresh_process_without_the_model_code(root: Path) -> None:
    run = Run(root, steps=2)
    h = run.hash
    run.system.close()
    out = json.loads(run_python(LOAD_IN_FRESH_PROCESS, args=[f"{h}@2", str(root)]).stdout)
    live = run.live[2]
    assert out["ref"] == f"{h}@2" and out["step"] == 2
    assert out["tests_imported"] == []
    assert out["shapes"] == {"main": {k: list(v.shape) for k, v in live["models"]["main"].items()}}
    for k, v in live["models"]["main"].items():  # float32 -> float -> float32 is exact
        assert torch.equal(torch.tensor(out["values"][k], dtype=v.dtype), v), k
    assert out["buffer"] == live["custom"]["buffer"].tolist() and out["pair"] == [1, "a"]
    assert torch.equal(torch.tensor(out["exp_avg"]), live["optimizer"]["state"][0]["exp_avg"])
    assert out["lr"] == 0.01


# --- export to .safetensors ---------------------------------------------------------------------

def test_export_safetensors_holds_the_weights_of_that_step(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=3)
    h = run.hash
    for step in (1, 3):
        path = export(f"{h}@{step}", tmp_path / "out" / f"step{step}.safetensors", root=root)
        assert path == tmp_path / "out" / f"step{step}.safetensors" and path.is_file()
        weights = safetensors.torch.load_file(path)
        live = run.live[step]["models"]["main"]
        assert sorted(weights) == sorted(live)
        for k, v in live.items():
            assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), k
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        assert meta == {"format": "pt", "weightslab.ref": f"{h}@{step}", "weightslab.experiment": h,
                        "weightslab.step": str(step), "weightslab.models": "main",
                        "weightslab.version": wl.__version__}
    # any safetensors reader opens it, and it loads straight into a fresh model
    fresh = Net()
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "out" / "step3.safetensors"), strict=True)
    assert torch.equal(fresh.head.weight, run.models["main"].head.weight)
    run.system.close()


def test_export_safetensors_with_several_models(root: Path, tmp_path: Path) -> None:
    run = Run(root, names=("teacher", "student"), steps=2)
    ref = f"{run.hash}@2"
    live = run.live[2]["models"]
    both = safetensors.torch.load_file(export(ref, tmp_path / "both.safetensors", root=root))
    expected = {f"{n}.{k}": v for n in ("teacher", "student") for k, v in live[n].items()}
    assert sorted(both) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(both[k], v), k
    with safe_open(tmp_path / "both.safetensors", framework="pt") as f:
        assert f.metadata()["weightslab.models"] == "teacher,student"

    student = safetensors.torch.load_file(export(ref, tmp_path / "student.safetensors", root=root, model="student"))
    assert sorted(student) == sorted(live["student"])
    for k, v in live["student"].items():
        assert torch.equal(student[k], v), k
    assert not torch.equal(student["encoder.weight"], live["teacher"]["encoder.weight"])

    with pytest.raises(ValueError, match=r"no model 'pupil'; its models: 'teacher', 'student'"):
        export(ref, tmp_path / "bad.safetensors", root=root, model="pupil")
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match=r"model= picks the weights of a \.safetensors export"):
        export(ref, tmp_path / "bad.pt", root=root, model="student")
    run.system.close()


def test_export_safetensors_of_a_checkpoint_without_models_says_so(root: Path, tmp_path: Path) -> None:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    wl.register_hyperparams("config", {"lr": 0.1})
    wl.checkpoint_on_step(1)
    system.close()
    with pytest.raises(ValueError, match=r"holds no model weights.*\.pt"):
        export("latest", tmp_path / "w.safetensors", root=root)
    state = torch.load(export("latest", tmp_path / "w.pt", root=root), weights_only=True)
    assert state["models"] == {} and state["hyperparams"] == {"config": {"lr": 0.1}}


# --- export to .pt ------------------------------------------------------------------------------

def test_export_pt_loads_with_weights_only_and_equals_the_live_state(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=3)
    h = run.hash
    for suffix in (".pt", ".pth"):
        path = export(f"{h}@2", tmp_path / f"state{suffix}", root=root)
        state = torch.load(path, weights_only=True)  # succeeds: nothing in it needs unpickling code
        live = run.live[2]
        assert state["ref"] == f"{h}@2" and state["step"] == 2 and state["experiment"] == h
        assert state["metrics"] == {"loss": live["loss"]}
        assert_same(state["models"], live["models"], "models")
        assert_same(state["optimizers"]["main"]["state"], live["optimizer"]["state"], "optimizer state")
        assert_same(state["optimizers"]["main"]["param_groups"], live["optimizer"]["param_groups"], "param_groups")
        assert state["optimizers"]["main"]["param_groups"][0]["betas"] == (0.8, 0.99)  # tuples stay tuples
        assert_same(state["schedulers"], {"main": live["scheduler"]}, "schedulers")
        cfg = live["hyperparams"]
        assert_same(state["hyperparams"], {"config": {**cfg, "data": "/data/train", "when": "2024-05-17"}})
        # the types weights_only refuses were converted; those it accepts were kept
        custom = live["custom"]
        assert_same(state["custom"]["env"], {
            **custom, "buffer": torch.from_numpy(custom["buffer"]), "counts": torch.from_numpy(custom["counts"]),
            "path": "/data/run", "when": "2024-05-17T12:30:15.000250+00:00"}, "custom")
        assert state["custom"]["env"]["dtype"] is torch.float16
        assert state["custom"]["env"]["device"] == torch.device("cpu")
        assert state["custom"]["env"]["by_id"] == {7: "seven"} and state["custom"]["env"]["blob"] == b"\x00\xff"
        numpy_rng = state["rng"]["numpy"]
        assert numpy_rng[0] == "MT19937" and numpy_rng[1].dtype == torch.uint32
        assert torch.equal(state["rng"]["torch"], load(f"{h}@2", root=root)["rng"]["torch"])
    run.system.close()


def test_exported_pt_resumes_a_fresh_model_and_optimizer(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=2)
    path = export(f"{run.hash}@2", tmp_path / "state.pt", root=root)
    run.system.close()
    state = torch.load(path, weights_only=True)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    model.load_state_dict(state["models"]["main"])
    opt.load_state_dict(state["optimizers"]["main"])
    assert_same({k: v for k, v in model.state_dict().items()}, run.live[2]["models"]["main"])
    assert_same(opt.state_dict()["state"], run.live[2]["optimizer"]["state"])
    assert opt.param_groups[0]["lr"] == run.live[2]["optimizer"]["param_groups"][0]["lr"]


# --- compressed and delta-encoded roots, and the foundation's format -----------------------------

def test_export_from_a_zstd_delta_root_is_bit_exact(root: Path, tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    run = Run(root, steps=6, width=64, compression="zstd", delta=True)
    h = run.hash
    run.system.close()
    manifest = read_manifest(root, h, 6)
    entries = manifest["tensors"].values()
    assert any("base" in e for e in entries), "the run should have stored XOR deltas"
    assert any(e.get("encoding", "raw") != "raw" for e in entries), "the run should have compressed blobs"
    for step in (1, 4, 6):
        weights = safetensors.torch.load_file(export(f"{h}@{step}", tmp_path / f"{step}.safetensors", root=root))
        for k, v in run.live[step]["models"]["main"].items():
            assert torch.equal(weights[k], v), (step, k)
        state = torch.load(export(f"{h}@{step}", tmp_path / f"{step}.pt", root=root), weights_only=True)
        assert_same(state["optimizers"]["main"]["state"], run.live[step]["optimizer"]["state"], f"step {step}")
        assert_same(load(f"{h}@{step}", root=root)["models"], run.live[step]["models"], f"step {step}")


def _tree_listing(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*") if p.is_file())


def test_reads_the_foundation_format_v1_root(tmp_path: Path) -> None:
    fixture = DATA / "root-v1"
    before = _tree_listing(fixture)
    root = tmp_path / "root-v1"
    shutil.copytree(fixture, root)  # never touch the committed fixture
    steps = manifests(root)
    h = next(h for h, found in steps.items() if 4 in found)
    assert read_manifest(root, h, 4)["format_version"] == 1
    expected = safetensors.torch.load_file(DATA / "root-v1-expected-step4.safetensors")

    state = load(f"{h}@4", root=root)
    assert state["ref"] == f"{h}@4" and state["step"] == 4
    assert sorted(state["models"]["main"]) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(state["models"]["main"][k], v), k
    assert state["optimizers"]["main"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert load(root=root)["ref"] == f"{h}@4"  # copytree keeps the commit times: step 4 is the newest

    weights = safetensors.torch.load_file(export(f"{h}@4", tmp_path / "v1.safetensors", root=root))
    assert sorted(weights) == sorted(expected)
    for k, v in expected.items():
        assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), k
    pt = torch.load(export(f"{h}@4", tmp_path / "v1.pt", root=root), weights_only=True)
    for k, v in expected.items():
        assert torch.equal(pt["models"]["main"][k], v), k
    assert _tree_listing(fixture) == before


# --- errors -------------------------------------------------------------------------------------

def test_unsupported_suffix_names_the_supported_ones(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=1)
    for name in ("model.onnx", "model", "model.bin"):
        with pytest.raises(ValueError, match=r"\.safetensors.*\.pt") as info:
            export(f"{run.hash}@1", tmp_path / name, root=root)
        assert name in str(info.value)
        assert not (tmp_path / name).exists()
    # the suffix is checked before anything is read: even a bad ref gets this error
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export("ffff@1", tmp_path / "x.onnx", root=root)
    # upper-case suffixes are the same formats
    assert safetensors.torch.load_file(export(f"{run.hash}@1", tmp_path / "M.SAFETENSORS", root=root))
    run.system.close()


def test_unknown_refs_and_roots_raise_checkpoint_not_found(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=2)
    h = run.hash
    run.system.close()
    with pytest.raises(wl.CheckpointNotFoundError, match=r"no checkpoint at step 9 .* steps: 1, 2"):
        load(f"{h}@9", root=root)
    with pytest.raises(wl.CheckpointNotFoundError, match="no experiment hash starts with 'ffff'"):
        export("ffff@1", tmp_path / "x.safetensors", root=root)
    with pytest.raises(wl.CheckpointNotFoundError, match="not a checkpoint manifest"):
        load(tmp_path / "missing.json", root=root)
    assert not (tmp_path / "x.safetensors").exists()

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    for call in (lambda: load(root=empty), lambda: export("latest", tmp_path / "e.pt", root=empty)):
        with pytest.raises(wl.CheckpointNotFoundError, match=f"no committed checkpoint under {empty}"):
            call()
    assert not (tmp_path / "e.pt").exists()

    elsewhere = tmp_path / "not-a-root"
    elsewhere.mkdir()
    with pytest.raises(wl.CheckpointNotFoundError, match="is not a weightslab root"):
        load(root=elsewhere)
    with pytest.raises(FileNotFoundError):  # catchable as the builtin
        export("latest", tmp_path / "n.safetensors", root=elsewhere)


def test_a_damaged_checkpoint_raises_and_writes_nothing(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=2)
    h = run.hash
    run.system.close()
    entry = read_manifest(root, h, 2)["tensors"]["models/main/head.weight"]
    pack = Layout(root).pack(entry["pack"])
    data = bytearray(pack.read_bytes())
    data[entry["offset"]] ^= 0x01
    pack.write_bytes(bytes(data))
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous export")
    with pytest.raises(wl.CorruptCheckpointError, match=str(pack)):
        export(f"{h}@2", target, root=root)
    with pytest.raises(wl.CorruptCheckpointError):
        load(root=root)  # "latest" reports the damage rather than quietly loading step 1
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["out.safetensors"]


def test_export_to_a_directory_is_refused(root: Path, tmp_path: Path) -> None:
    run = Run(root, steps=1)
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export(f"{run.hash}@1", tmp_path / "dir.pt", root=root)
    run.system.close()


# --- atomicity ----------------------------------------------------------------------------------

def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("name", ["w.safetensors", "s.pt"])
def test_export_replaces_an_existing_file_and_leaves_no_temporary(root: Path, tmp_path: Path, name: str) -> None:
    run = Run(root, steps=2)
    out = tmp_path / "out"
    out.mkdir()
    target = out / name
    target.write_bytes(b"an older export")
    assert export(f"{run.hash}@1", target, root=root) == target
    assert export(f"{run.hash}@2", target, root=root) == target
    assert _files(out) == [name]
    if name.endswith(".safetensors"):
        weights = safetensors.torch.load_file(target)
    else:
        weights = torch.load(target, weights_only=True)["models"]["main"]
    for k, v in run.live[2]["models"]["main"].items():
        assert torch.equal(weights[k], v), k
    # the file gets the mode of any new file (safetensors on its own would make it 0o600)
    probe = out / "probe"
    probe.write_bytes(b"")
    assert target.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    run.system.close()


def test_a_failure_midway_leaves_the_previous_file_and_no_temporary(root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(root, steps=1)
    run.system.close()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("w.safetensors", "s.pt"):
        (out / name).write_bytes(b"the previous export of " + name.encode())

    def torch_save_dies(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    def safetensors_dies(tensors: Any, filename: str, metadata: Any = None) -> None:
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_dies)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_dies)
    for name in ("w.safetensors", "s.pt"):
        with pytest.raises(OSError, match="No space left"):
            export("latest", out / name, root=root)
        assert (out / name).read_bytes() == b"the previous export of " + name.encode()
    assert _files(out) == ["s.pt", "w.safetensors"]

    # with no previous file, nothing at all is left
    with pytest.raises(OSError):
        export("latest", out / "new.pt", root=root)
    assert _files(out) == ["s.pt", "w.safetensors"]


def test_tied_weights_export_as_independent_tensors(root: Path, tmp_path: Path) -> None:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight  # tied input and output embeddings, as in language models
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    model(torch.tensor([1, 2, 3])).float().pow(2).mean().backward()
    opt.step()
    wl.checkpoint_on_step(1)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    system.close()
    # safetensors refuses tensors sharing memory: each key must come out as its own tensor
    weights = safetensors.torch.load_file(export("latest", tmp_path / "tied.safetensors", root=root))
    assert sorted(weights) == ["0.weight", "1.weight"]
    for k, v in live.items():
        assert weights[k].dtype == torch.bfloat16 and torch.equal(weights[k], v), k
    state = torch.load(export("latest", tmp_path / "tied.pt", root=root), weights_only=True)
    assert torch.equal(state["models"]["main"]["1.weight"], live["0.weight"])
