"""The storage engine end to end: dedup, integrity, compression and deltas, retention, gc, upgrade."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

from .support import DATA, child_env, read_manifest


def disk_bytes(root: Path) -> int:
    """Bytes a root holds in packs and manifests."""
    packs = sum(p.stat().st_size for p in (root / "objects").rglob("*.safetensors"))
    manifests = sum(p.stat().st_size for p in (root / "checkpoints").rglob("*_step_*.json"))
    return packs + manifests


def pack_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "objects").rglob("*.safetensors"))


def state_copy(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"m/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                out[f"o/{pid}/{k}"] = v.detach().clone()
    return out


def changed_bytes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for k, t in after.items() if k not in before or not torch.equal(before[k], t))


def fine_tune(width: int = 128, layers: int = 10, frozen: int = 9):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in list(model)[:frozen]:
        layer.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    loss = model(torch.randn(4, model[0].in_features)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


# --- 1. unchanged tensors cost nothing -----------------------------------------------------------

def test_a_90_percent_frozen_fine_tune_adds_only_what_changed(root: Path) -> None:
    model, opt = fine_tune()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    step(model, opt)
    wl.checkpoint_on_step(1)
    system.wait()
    previous_state, previous_bytes = state_copy(model, opt), disk_bytes(root)
    for s in range(2, 8):
        step(model, opt)
        wl.checkpoint_on_step(s)
        system.wait()
        now_state, now_bytes = state_copy(model, opt), disk_bytes(root)
        changed = changed_bytes(previous_state, now_state)
        added = now_bytes - previous_bytes
        # the frozen 90% is never written again; what is written is the trainable layer and its
        # Adam state, plus the manifest and the RNG state (a few KB)
        assert added <= 1.05 * changed + 64 * 1024, (s, added, changed)
        assert added < 0.5 * sum(t.nbytes for t in now_state.values())
        previous_state, previous_bytes = now_state, now_bytes
    system.close()


def test_unchanged_tensors_are_stored_once(root: Path) -> None:
    model, opt = fine_tune(frozen=9)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    for s in (1, 2):
        step(model, opt)
        wl.checkpoint_on_step(s)
    system.wait()
    frozen_keys = {f"models/main/{i}.{p}" for i in range(9) for p in ("weight", "bias")}
    manager = CheckpointManager(root)
    m1, m2 = (manager.read_manifest(e) for e in manager.checkpoints())
    for key in frozen_keys:  # copied and hashed again, found by digest: the same blob in the same pack
        assert m1.tensors[key].blob == m2.tensors[key].blob
    assert m1.tensors["models/main/9.weight"].blob != m2.tensors["models/main/9.weight"].blob  # it trained
    system.close()


def test_a_write_through_data_is_in_the_next_checkpoint(root: Path) -> None:
    model, opt = fine_tune(frozen=9)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.checkpoint_on_step(1)
    before = model[0].weight._version
    model[0].weight.data.mul_(2.0)  # bypasses the version counter
    assert model[0].weight._version == before
    wl.checkpoint_on_step(2)
    system.wait()
    manager = CheckpointManager(root)
    tensors = load_tensors(manager, manager.read_manifest(manager.checkpoints()[-1]))
    assert torch.equal(tensors["models/main/0.weight"], model[0].weight.detach())
    system.close()


def test_tied_weights_are_stored_once(root: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50, bias=False))
    model[1].weight = model[0].weight
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.checkpoint_on_step(1)
    system.wait()
    manager = CheckpointManager(root)
    manifest = manager.read_manifest(manager.checkpoints()[-1])
    blob = manifest.tensors["models/main/0.weight"].blob
    assert manifest.tensors["models/main/1.weight"].blob == blob
    (pack,) = manager.store.packs()
    assert [b.digest for b in pack.blobs].count(blob.digest) == 1  # one copy of the bytes in the pack
    assert len(pack.blobs) == len({t.blob.digest for t in manifest.tensors.values()})
    system.close()


def test_the_first_checkpoint_after_a_hyperparameter_change_costs_only_what_changed(root: Path) -> None:
    model, opt = fine_tune(frozen=0)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    cfg = wl.register_hyperparams({"lr": 1e-3})
    step(model, opt)
    wl.checkpoint_on_step(1)
    system.wait()
    parent, before = system.experiment_hash, pack_bytes(root)
    cfg["lr"] = 1e-4  # the change is all: no training step in between
    wl.checkpoint_on_step(2)
    system.wait()
    assert system.experiment_hash != parent
    assert pack_bytes(root) - before < 16 * 1024  # the RNG state and the like, no tensor of the model
    system.close()


def test_the_first_checkpoint_after_a_resume_costs_only_what_changed(root: Path) -> None:
    model, opt = fine_tune(frozen=9)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    step(model, opt)
    wl.checkpoint_on_step(1)
    system.close()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    assert system.resume() == 1
    before_state, before = state_copy(model, opt), disk_bytes(root)
    step(model, opt)
    wl.checkpoint_on_step(2)
    system.wait()
    added = disk_bytes(root) - before
    assert added <= 1.05 * changed_bytes(before_state, state_copy(model, opt)) + 64 * 1024
    system.close()


def test_identical_content_from_another_experiment_or_process_is_not_stored_again(root: Path) -> None:
    model, opt = fine_tune(frozen=0)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.checkpoint_on_step(1)
    system.close()
    before = pack_bytes(root)
    copy = nn.Sequential(*[nn.Linear(128, 128) for _ in range(10)])
    copy.load_state_dict(model.state_dict())  # other objects, same bytes
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(copy)
    wl.register_hyperparams({"note": "a different experiment"})
    wl.checkpoint_on_step(1)
    system.close()
    assert pack_bytes(root) - before < 16 * 1024


# --- 2. few files, one commit -------------------------------------------------------------------

def test_a_checkpoint_writes_one_pack_and_one_manifest_however_many_tensors(root: Path) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])  # 400 tensors
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.checkpoint_on_step(1)
    system.wait()
    assert len(list((root / "objects").rglob("*.safetensors"))) == 1
    assert len(list((root / "checkpoints").rglob("*_step_*.json"))) == 1
    system.close()


# --- 3. integrity ------------------------------------------------------------------------------

@pytest.fixture
def three_checkpoints(root: Path):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    for s in (1, 2, 3):
        model(torch.randn(2, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        wl.checkpoint_on_step(s)
    system.wait()
    yield system, system.experiment_hash
    system.close()


def _weight_pack(root: Path, exp: str, step_: int) -> tuple[Path, dict]:
    entry = read_manifest(root, exp, step_)["tensors"]["models/main/weight"]
    return root / "objects" / entry["pack"][:2] / f"{entry['pack'][2:]}.safetensors", entry


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damage_is_detected_named_and_fallen_back_from(root: Path, three_checkpoints, damage: str, caplog) -> None:
    system, h = three_checkpoints
    path, entry = _weight_pack(root, h, 3)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[entry["offset"] + 5] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: entry["offset"] + 10])
    else:
        path.unlink()
    with pytest.raises(wl.CorruptCheckpointError) as info:
        system.resume(f"{h}@3")
    assert str(path) in str(info.value) and f"{h}@3" in str(info.value)
    assert info.value.path == path and info.value.checkpoint == f"{h}@3"
    with caplog.at_level(logging.WARNING):
        assert system.resume("latest") == 2
    assert f"{h}@3 is damaged" in caplog.text and "falling back" in caplog.text
    report = wl.verify()
    assert not report.ok
    assert [ref for ref, _ in report.damaged] == [f"{h}@3"]
    assert str(path) in report.damaged[0][1]
    assert wl.verify(f"{h}@2").ok


def test_verify_checks_every_byte_of_a_healthy_root(root: Path, three_checkpoints) -> None:
    system, h = three_checkpoints
    report = wl.verify()
    assert report.ok and report.checked == (f"{h}@1", f"{h}@2", f"{h}@3")
    assert report.nbytes >= 3 * 64 * 65 * 4
    seen = []
    wl.verify(progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)


def test_temporary_files_of_a_dead_writer_are_swept_on_start(root: Path, three_checkpoints) -> None:
    system, h = three_checkpoints
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftovers = [root / "objects" / f".tmp.{pid}.abc.pack.safetensors",
                 Layout(root).model_dir(h) / f".tmp.{pid}.abc.{h}_step_000009.json"]
    for p in leftovers:
        p.write_bytes(b"half written")
    CheckpointManager(root)
    assert not any(p.exists() for p in leftovers)


# --- 4. compression and deltas -----------------------------------------------------------------

def test_deltas_restore_bit_for_bit_across_reanchors(root: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      compression="zstd", delta=True, reanchor_interval=3)
    wl.register_model(model)
    wl.register_optimizer(opt)
    states = {}
    for s in range(1, 9):
        step(model, opt)
        wl.checkpoint_on_step(s)
        states[s] = state_copy(model, opt)
    system.wait()
    manager = CheckpointManager(root)
    depths, weight = set(), []
    for entry in manager.checkpoints():
        manifest = manager.read_manifest(entry)
        depths.update(t.blob.depth for t in manifest.tensors.values())
        weight.append(manifest.tensors["models/main/0.weight"].blob)
        tensors = load_tensors(manager, manifest)
        for key, value in model.state_dict().items():
            assert torch.equal(tensors[f"models/main/{key}"], states[entry.step][f"m/{key}"]), (entry.step, key)
    # deltas never chain (a restore decodes at most two blobs), and every 3 versions a new anchor
    assert max(depths) == 1
    assert [b.encoding == "xor-zstd" for b in weight] == [False, True, True, False, True, True, False, True]
    assert weight[1].base.digest == weight[2].base.digest == weight[0].digest
    assert weight[4].base.digest == weight[3].digest
    assert wl.verify().ok
    h = system.experiment_hash
    assert system.resume(f"{h}@5") == 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, states[5][f"m/{key}"])
    system.close()


def test_compression_makes_compressible_state_smaller(tmp_path: Path) -> None:
    sizes = {}
    for compression in ("off", "zstd"):
        root = tmp_path / compression
        torch.manual_seed(0)
        model = nn.Linear(256, 256)
        with torch.no_grad():
            model.weight.mul_(0).add_(torch.randint(0, 4, (256, 256)).float())  # low-entropy values
        system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                          compression=compression)
        wl.register_model(model)
        wl.checkpoint_on_step(1)
        system.close()
        wl.unregister()
        sizes[compression] = pack_bytes(root)
    assert sizes["zstd"] < 0.5 * sizes["off"]


def test_compression_without_zstandard_says_which_extra_to_install(root: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(wl.ConfigError, match=r"weightslab\[zstd\]"):
        wl.get_checkpoint_system(root_log_dir=root, compression="zstd")
    with pytest.raises(wl.ConfigError, match="compression='zstd'"):
        wl.get_checkpoint_system(root_log_dir=root, delta=True)


# --- 5. retention and gc -------------------------------------------------------------------------

def test_retention_from_the_config_never_deletes_the_latest_or_the_best(root: Path) -> None:
    model, opt = fine_tune(frozen=9)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      retention={"keep_last": 2, "keep_best": 1, "metric": "loss",
                                                 "keep_changes": True})
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams({"lr": 1e-3})
    losses = {1: 5.0, 2: 0.5, 3: 4.0, 4: 3.0, 5: 2.0, 6: 6.0, 7: 7.0}
    for s, loss in losses.items():
        step(model, opt)
        if s == 4:
            model[0].requires_grad_(True)  # a state change: kept by keep_changes
        wl.checkpoint_on_step(s, metrics={"loss": loss})
    system.wait()
    steps = [e.step for e in system.manager.checkpoints([system.experiment_hash])]
    assert steps == [2, 4, 6, 7]  # best (0.5), the change, the last two
    system.close()


def test_prune_then_gc_reclaims_space_and_everything_left_verifies(root: Path) -> None:
    model, opt = fine_tune(frozen=5)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    for s in range(1, 7):
        step(model, opt)
        wl.checkpoint_on_step(s, metrics={"loss": float(10 - s)})
    system.wait()
    plan = wl.prune(keep_last=2, dry_run=True)
    assert [r.step for r in plan.delete] == [1, 2, 3, 4]
    assert len(system.manager.checkpoints()) == 6  # dry run deleted nothing
    wl.prune(keep_last=2)
    assert [e.step for e in system.manager.checkpoints()] == [5, 6]
    before = pack_bytes(root)
    dry = wl.gc(grace_seconds=0, dry_run=True)
    assert dry.bytes_freed > 0 and pack_bytes(root) == before
    report = wl.gc(grace_seconds=0)
    assert report.bytes_freed > 0 and pack_bytes(root) < before
    assert report.packs_rewritten >= 1  # the first pack held the frozen layers: rewritten, not deleted
    assert wl.verify().ok
    assert system.resume(f"{system.experiment_hash}@5") == 5
    assert wl.gc(grace_seconds=0).bytes_freed == 0  # nothing left to collect
    system.close()


def test_gc_leaves_young_packs_alone(root: Path, three_checkpoints) -> None:
    system, h = three_checkpoints
    wl.prune(keep_last=1)
    report = wl.gc(grace_seconds=3600)
    assert report.bytes_freed == 0 and report.bytes_dead_kept > 0


def test_gc_stops_before_deleting_anything_when_a_manifest_is_unreadable(root: Path, three_checkpoints) -> None:
    system, h = three_checkpoints
    wl.prune(keep_last=1)
    bad = Layout(root).manifest(h, 3)
    bad.write_text(bad.read_text()[:-50])
    before = pack_bytes(root)
    with pytest.raises(wl.WeightslabError, match="stopped before deleting anything"):
        wl.gc(grace_seconds=0)
    assert pack_bytes(root) == before


WRITER = """
import sys, torch, weightslab as wl
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)); model[0].requires_grad_(False)
opt = torch.optim.Adam(model[1].parameters(), lr=1e-3)
system = wl.get_checkpoint_system(root_log_dir=sys.argv[1], checkpoint_frequency=1, save_on_close=False,
                                  retention={"keep_last": 2})
wl.register_model(model); wl.register_optimizer(opt)
for step in range(1, int(sys.argv[2]) + 1):
    model(torch.randn(4, 32)).sum().backward(); opt.step(); opt.zero_grad()
    wl.checkpoint_on_step(step)
    print(step, flush=True)
system.close()
"""

COLLECTOR = """
import sys, weightslab as wl
freed = 0
while True:
    freed += wl.gc(root=sys.argv[1], grace_seconds=0).bytes_freed
    if sys.stdin.readline().strip() == "stop":
        break
print(freed)
"""


def test_gc_is_safe_while_another_process_is_writing(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    env = child_env()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "60"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "1"  # the root exists: start collecting concurrently
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR, str(root)], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert collector.stdin is not None
    rounds = 0
    for line in writer.stdout:  # one gc round per checkpoint the writer reports
        collector.stdin.write("go\n")
        collector.stdin.flush()
        rounds += 1
    writer.wait(timeout=120)
    out, err = collector.communicate("stop\n", timeout=120)
    assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    assert collector.returncode == 0, err
    assert int(out.strip()) > 0 and rounds >= 50  # it did collect, many times, during the writes
    manager = CheckpointManager(root)
    assert [e.step for e in manager.checkpoints()] == [59, 60]
    assert manager.verify().ok
    final = json.loads(manager.checkpoints()[-1].path.read_text())
    assert final["step"] == 60


# --- 7. upgrade path ---------------------------------------------------------------------------

def test_checkpoints_of_the_foundation_format_still_load(tmp_path: Path) -> None:
    root = tmp_path / "root-v1"
    shutil.copytree(DATA / "root-v1", root)
    manager = CheckpointManager(root)
    assert manager.verify().ok
    entry = next(e for e in manager.checkpoints() if e.step == 4)
    assert json.loads(entry.path.read_text())["format_version"] == 1
    from safetensors.torch import load_file
    expected = load_file(DATA / "root-v1-expected-step4.safetensors")
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    cfg = wl.register_hyperparams("config", {"lr": 0.01, "hidden": 3})
    assert system.resume() == 4  # latest of the lineage: the child experiment of the lr change
    assert cfg["lr"] == 0.005
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    wl.checkpoint_on_step(5)  # new checkpoints in the new format, beside the old ones
    system.wait()
    assert read_manifest(root, system.experiment_hash, 5)["format_version"] == 2
    assert wl.verify().ok
    system.close()


def test_a_damaged_delta_anchor_is_named_when_the_delta_is_restored(root: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      compression="zstd", delta=True)
    wl.register_model(model)
    wl.register_optimizer(opt)
    for s in (1, 2):
        step(model, opt)
        wl.checkpoint_on_step(s)
    system.wait()
    h = system.experiment_hash
    delta = read_manifest(root, h, 2)["tensors"]["models/main/0.weight"]
    assert delta["encoding"] == "xor-zstd"
    anchor = delta["base"]
    anchor_path = root / "objects" / anchor["pack"][:2] / f"{anchor['pack'][2:]}.safetensors"
    data = bytearray(anchor_path.read_bytes())
    data[anchor["offset"] + anchor["nbytes"] // 2] ^= 0x01
    anchor_path.write_bytes(bytes(data))
    with pytest.raises(wl.CorruptCheckpointError) as info:
        system.resume(f"{h}@2")
    assert info.value.path == anchor_path and "delta base" in str(info.value)
    system.close()


def test_latest_does_not_depend_on_file_times(tmp_path: Path) -> None:
    """A root copied without its file times (cp, git checkout) still knows its newest checkpoint."""
    root = tmp_path / "copied"
    shutil.copytree(DATA / "root-v1", root, copy_function=shutil.copy)
    manifests = sorted(root.rglob("*_step_*.json"), key=lambda p: json.loads(p.read_text())["created_ns"])
    for age, path in enumerate(manifests):  # newest manifest gets the oldest file time
        os.utime(path, ns=(10**18 - age * 10**12, 10**18 - age * 10**12))
    manager = CheckpointManager(root)
    assert [e.step for e in manager.checkpoints()] == [2, 3, 4]
    assert manager.candidates("latest")[0].step == 4
