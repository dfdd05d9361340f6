"""Remote roots (fsspec URLs), against fsspec's real memory and local filesystems: the checkpoint is
uploaded after its local commit with the manifest last, discovery sees only committed checkpoints,
and a process with an empty staging root resumes exactly from the remote copy."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import weightslab as wl

from .support import assert_same, kill_when, run_cli, run_python, spawn, start_of, train

fsspec = pytest.importorskip("fsspec")
MemoryFileSystem = pytest.importorskip("fsspec.implementations.memory").MemoryFileSystem


class Run:
    def __init__(self, url: str, **settings):
        settings = {"checkpoint_frequency": 2, "save_on_close": False, **settings}
        self.system = wl.get_checkpoint_system(root_log_dir=url, **settings)
        wl.register_hyperparams({"lr": 0.01})
        torch.manual_seed(0)
        self.model = wl.register_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)))
        self.opt = wl.register_optimizer(torch.optim.Adam(self.model.parameters(), lr=0.01))

    def train(self, first: int, last: int) -> None:
        gen = torch.Generator().manual_seed(first)
        for step in range(first, last + 1):
            self.opt.zero_grad()
            self.model(torch.randn(4, 3, generator=gen)).pow(2).mean().backward()
            self.opt.step()
            wl.checkpoint_on_step(step, metrics={"loss": 1.0 / step})

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"m/{k}": v.clone() for k, v in self.model.state_dict().items()}
        for i, s in self.opt.state_dict()["state"].items():
            out.update({f"o/{i}/{k}": torch.as_tensor(v).clone() for k, v in s.items()})
        return out

    def close(self) -> None:
        self.system.close()
        wl.unregister("main")


@pytest.fixture
def url() -> str:
    return f"memory://weightslab-test-{uuid.uuid4().hex}"


@pytest.fixture
def staging(tmp_path, monkeypatch):
    """Point the staging root somewhere new; call it again for a 'new machine'."""
    def new(name: str) -> Path:
        path = tmp_path / name
        monkeypatch.setenv("WEIGHTSLAB_STAGING", str(path))
        return path
    return new


def _remote_steps(url: str) -> list[int]:
    fs, base = fsspec.core.url_to_fs(url)
    names = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{base.rstrip('/')}/checkpoints/*/model/*_step_*.json")]
    return sorted(int(n.split("_step_")[1].split(".")[0]) for n in names)


def test_a_new_machine_resumes_exactly_from_the_remote_root(url, staging):
    first = staging("machine-a")
    run = Run(url)
    run.train(1, 6)
    run.system.wait()
    assert run.system.root.is_relative_to(first)  # training wrote to the staging root
    expected = run.state()
    run.close()
    assert _remote_steps(url) == [2, 4, 6]

    second = staging("machine-b")  # nothing local: everything comes from the remote root
    again = Run(url)
    assert again.system.resume() == 6
    assert again.system.root.is_relative_to(second)
    got = again.state()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert again.system.peek("latest").step == 6
    again.train(7, 8)
    again.system.wait()
    assert _remote_steps(url) == [2, 4, 6, 8]
    again.close()


class FlakyMemory(MemoryFileSystem):
    """fsspec's memory filesystem (the same objects as memory://) under the protocol ``flakymem://``,
    whose uploads of commit objects (manifests) fail while ``failing`` is set: a network that goes
    away between a checkpoint's packs and its manifest."""

    protocol = "flakymem"
    failing = False

    def put_file(self, lpath, rpath, *args, **kwargs):
        if type(self).failing and "_step_" in rpath:
            raise ConnectionError("the network went away")
        return super().put_file(lpath, rpath, *args, **kwargs)


def test_an_upload_that_stops_before_the_manifest_is_invisible_and_retried(staging, monkeypatch, caplog):
    fsspec.register_implementation("flakymem", FlakyMemory, clobber=True)
    url = f"flakymem://weightslab-test-{uuid.uuid4().hex}"
    staging("machine-a")
    run = Run(url)
    run.train(1, 2)
    run.system.wait()
    monkeypatch.setattr(FlakyMemory, "failing", True)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        run.train(3, 4)
        with pytest.raises(wl.CheckpointSaveError, match="the network went away"):
            run.system.wait()  # never silent
    assert any("committed locally" in r.getMessage() for r in caplog.records)
    assert _remote_steps(url) == [2]  # the packs of step 4 went up, its commit object did not
    fs, base = fsspec.core.url_to_fs(url)
    assert len(fs.glob(f"{base}/objects/*/*.safetensors")) >= 2
    monkeypatch.setattr(FlakyMemory, "failing", False)
    run.train(5, 6)  # the next push uploads the missing manifest too
    run.system.wait()
    assert _remote_steps(url) == [2, 4, 6]
    run.close()


def test_retention_deletes_remote_checkpoints_too(url, staging):
    staging("machine-a")
    run = Run(url, retention={"keep_last": 2})
    run.train(1, 8)
    run.system.wait()
    assert _remote_steps(url) == [6, 8]
    run.close()


def test_names_go_up_and_resolve_on_another_machine(url, staging):
    staging("machine-a")
    run = Run(url)
    run.train(1, 4)
    exp = run.system.name_experiment("baseline")
    run.system.wait()
    run.close()
    staging("machine-b")
    again = Run(url)
    assert again.system.resume("baseline@2") == 2 and again.system.experiment_hash == exp
    again.close()


def test_a_killed_process_resumes_from_a_file_url_on_another_staging_root(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(tmp_path / "r0", straight)
    url = f"file://{tmp_path / 'remote'}"
    monkeypatch.setenv("WEIGHTSLAB_STAGING", str(tmp_path / "staging-a"))
    proc = spawn(url, tmp_path / "out", "--pause-at", "25")
    kill_when(proc, "READY")  # wait() returned: step 25 is durable locally and uploaded
    monkeypatch.setenv("WEIGHTSLAB_STAGING", str(tmp_path / "staging-b"))
    stdout = train(url, tmp_path / "out")
    assert start_of(stdout) == 25
    assert_same(straight, tmp_path / "out")


def test_without_fsspec_the_error_names_the_extra(tmp_path):
    proc = run_python("""
import sys
sys.modules["fsspec"] = None  # as if it were not installed
import weightslab as wl
try:
    wl.get_checkpoint_system(root_log_dir="s3://bucket/runs")
except wl.ConfigError as exc:
    print("ERROR", exc)
""", env={"WEIGHTSLAB_STAGING": str(tmp_path)})
    assert "ERROR" in proc.stdout and "pip install 'weightslab[remote]'" in proc.stdout


def test_the_command_line_reads_a_remote_root(tmp_path, staging):
    url = f"file://{tmp_path / 'bucket'}"
    staging("trainer")
    run = Run(url)
    run.train(1, 6)
    run.system.name_experiment("base")
    run.system.wait()
    run.close()
    env = {"WEIGHTSLAB_STAGING": str(tmp_path / "cli")}  # another machine: nothing local
    listing = run_cli("ls", "--json", "--root", url, env=env)
    assert listing.returncode == 0, listing.stderr
    (row,) = json.loads(listing.stdout)
    assert row["names"] == ["base"] and row["checkpoints"] == 3 and row["last_step"] == 6
    shown = run_cli("show", "base@4", "--root", url, env=env)
    assert shown.returncode == 0 and "checkpoint" in shown.stdout and "@4" in shown.stdout
    diff = json.loads(run_cli("diff", "base@2", "base@6", "--json", "--root", url, env=env).stdout)
    assert all(t["relative_l2"] > 0 for t in diff["tensors"])  # packs fetched on demand, verified
    assert run_cli("verify", "--root", url, env=env).returncode == 0
    pruned = run_cli("prune", "--keep-last", "1", "--json", "--root", url, env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert len(json.loads(pruned.stdout)["delete"]) == 2 and _remote_steps(url) == [6]
    collected = json.loads(run_cli("gc", "--grace", "0", "--json", "--root", url, env=env).stdout)
    assert collected["bytes_freed"] > 0 and collected["packs_deleted"] >= 1
    staging("after-gc")  # what is left still resumes, every byte verified
    again = Run(url)
    assert again.system.resume() == 6
    again.close()
    missing = run_cli("ls", "--root", f"file://{tmp_path / 'nothing'}", env=env)
    assert missing.returncode == 3 and "not a weightslab root" in missing.stderr


def test_gc_of_a_remote_root_deletes_only_old_unreferenced_objects(url, staging):
    staging("machine-a")
    run = Run(url)
    run.train(1, 4)
    run.system.wait()
    run.close()
    fs, base = fsspec.core.url_to_fs(url)
    live = sorted(fs.glob(f"{base}/objects/*/*.safetensors"))
    fan = next(f"{i:02x}" for i in range(256) if not fs.exists(f"{base}/objects/{i:02x}"))
    fs.pipe(f"{base}/objects/{fan}/{'0' * 62}.safetensors", b"an orphan pack")  # no manifest names it
    fs.pipe(f"{base}/objects/{fan}/.tmp.dead.upload.safetensors", b"a dead upload")
    fs.pipe(f"{base}/objects/zz/{'0' * 62}.safetensors", b"not named like a pack")  # not ours: never deleted
    young = wl.gc(root=url)  # default grace: both are too young to judge
    assert young.packs_deleted == 0 and young.bytes_dead_kept == len(b"an orphan pack") + len(b"a dead upload")
    dry = wl.gc(root=url, grace_seconds=0, dry_run=True)
    assert dry.packs_deleted == 2 and len(fs.glob(f"{base}/objects/{fan}/*")) == 2  # a dry run deletes nothing
    report = wl.gc(root=url, grace_seconds=0)
    assert report.packs_deleted == 2 and report.bytes_freed == len(b"an orphan pack") + len(b"a dead upload")
    assert sorted(p for p in fs.glob(f"{base}/objects/*/*.safetensors") if "/zz/" not in p) == live
    assert not fs.exists(f"{base}/objects/{fan}/.tmp.dead.upload.safetensors")
    assert fs.exists(f"{base}/objects/zz/{'0' * 62}.safetensors")
    staging("machine-b")
    again = Run(url)
    assert again.system.resume() == 4
    again.close()


def test_the_python_functions_take_a_remote_root_too(tmp_path, url, staging):
    staging("machine-a")
    run = Run(url)
    run.train(1, 4)
    run.system.wait()
    expected = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.close()
    staging("machine-b")
    state = wl.load("latest", root=url)  # no system: a mirror of the bucket, packs fetched on demand
    assert state["step"] == 4
    assert all(torch.equal(state["models"]["main"][k], v) for k, v in expected.items())
    report = wl.verify(root=url)
    assert report.ok and len(report.checked) == 2
    out = wl.export("latest", tmp_path / "w.safetensors", root=url)
    from safetensors.torch import load_file
    assert set(load_file(str(out))) == set(expected)
    plan = wl.prune(keep_last=1, root=url)
    assert len(plan.delete) == 1 and _remote_steps(url) == [4]  # deleted in the bucket, not only the mirror


def test_an_archived_checkpoint_replaces_its_remote_manifest_and_reads_on_another_machine(url, staging):
    staging("machine-a")
    system = wl.get_checkpoint_system(root_log_dir=url, checkpoint_frequency=1, save_on_close=False,
                                      retention={"keep_last": 2, "archive": "lc"})
    torch.manual_seed(0)
    model = wl.register_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    opt = wl.register_optimizer(torch.optim.Adam(model.parameters(), lr=0.01))
    for step in range(1, 6):
        opt.zero_grad()
        model(torch.randn(16, 64)).pow(2).mean().backward()
        opt.step()
        wl.checkpoint_on_step(step)
    system.wait()
    exp = system.experiment_hash
    system.close()
    fs, base = fsspec.core.url_to_fs(url)
    remote = [json.loads(fs.cat(f"{base.rstrip('/')}/checkpoints/{exp}/model/{exp}_step_{s:06d}.json"))
              for s in range(1, 6)]
    assert [m.get("exact", True) for m in remote] == [True, False, False, True, True]  # the anchor, 2 archived, the ring
    staging("machine-b")  # a new mirror: the archived manifests and their payload packs come from the bucket
    state = wl.load(f"{exp}@3", root=url)
    assert state["exact"] is False and state["archive"]["chain"] == 2
    assert wl.verify(root=url).ok
