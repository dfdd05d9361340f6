"""A root others can write (a team's shared directory, a copied root, a bucket): nothing outside the
root is read, written or deleted, and damaged or crafted metadata is a damaged checkpoint, bounded in
what reading it costs, that every command skips and reports (issue 16, items 1-3, 6-8 and 10).

A crafted manifest keeps a correct self-digest here (``seal``): the digest catches damage, not
deliberate edits, so every field is checked against its grammar when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.ledger import LEDGER
from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager
from weightslab.storage.manifest import seal

from .support import run_cli, run_python

WEIGHT = "models/main/weight"


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 8)


def _train(root: Path, steps: int = 3) -> str:
    """A root with checkpoints at steps 1..steps of one small experiment; returns its hash."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    for s in range(1, steps + 1):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        wl.checkpoint_on_step(s)
    system.wait()
    h = system.experiment_hash
    system.close()
    LEDGER.clear()
    return h


def _resumer(root: Path) -> Any:
    """A fresh system over ``root`` with the trained architecture registered (nothing resumed yet)."""
    model = _model()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=None, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    return system


def _body(root: Path, h: str, step: int) -> dict[str, Any]:
    body = json.loads(Layout(root).manifest(h, step).read_bytes())
    body.pop("digest")
    return body


def _craft(root: Path, h: str, step: int, edit: Callable[[dict[str, Any]], Any], *,
           path: Path | None = None) -> Path:
    """Rewrite the manifest of ``h@step`` edited by ``edit``, with a correct self-digest."""
    body = _body(root, h, step)
    edit(body)
    target = path or Layout(root).manifest(h, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(seal(body))
    return target


def _pack_of(root: Path, entry: dict[str, Any]) -> Path:
    return root / "objects" / entry["pack"][:2] / f"{entry['pack'][2:]}.safetensors"


# --- 1. links are never followed out of the root -----------------------------------------------

@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Someone's files outside the root: a safetensors file, one named like a pack, and a temporary
    file whose writer is dead."""
    folder = tmp_path / "victim"
    folder.mkdir()
    return folder


def _plant_victims(folder: Path, pack: Path) -> list[Path]:
    files = [folder / "model.safetensors", folder / (pack.name), folder / f".tmp.{_dead_pid()}.abc.weights"]
    for f in files:
        f.write_bytes(pack.read_bytes())
        os.utime(f, (time.time() - 7200, time.time() - 7200))
    return files


def test_gc_never_deletes_through_a_link_planted_in_objects(root: Path, victim: Path) -> None:
    h = _train(root)
    pack = _pack_of(root, _body(root, h, 1)["tensors"][WEIGHT])
    files = _plant_victims(victim, pack)
    (root / "objects" / "zz").symlink_to(victim)
    hex_name = next(f"{i:02x}" for i in range(256) if not (root / "objects" / f"{i:02x}").exists())
    (root / "objects" / hex_name).symlink_to(victim)  # a fan-out name
    proc = run_cli("gc", "--grace", "0", "--json", root=root)
    assert proc.returncode == 0, proc.stderr
    assert all(f.exists() for f in files), "gc deleted files outside the root through a link"
    report = json.loads(proc.stdout)
    assert report["links_skipped"] == 2
    assert "symbolic link" in proc.stderr and str(root / "objects" / "zz") in proc.stderr
    assert wl.verify(root=root).ok


def test_opening_a_root_never_sweeps_temporary_files_through_links(root: Path, victim: Path) -> None:
    h = _train(root)
    pack = _pack_of(root, _body(root, h, 1)["tensors"][WEIGHT])
    files = _plant_victims(victim, pack)
    (victim / "model").mkdir()
    (victim / "hp").mkdir()
    inner = [victim / d / f".tmp.{_dead_pid()}.x.json" for d in ("model", "hp")]
    for f in inner:
        f.write_bytes(b"precious")
    (root / "objects" / "ab").symlink_to(victim)
    (root / "checkpoints" / "0123456789abcdef").symlink_to(victim)  # an experiment directory
    ours = root / "objects" / f".tmp.{_dead_pid()}.abc.pack.safetensors"
    ours.write_bytes(b"half written")
    CheckpointManager(root)
    assert all(f.exists() for f in files + inner), "the sweep deleted temporary files outside the root"
    assert not ours.exists()  # the root's own leftovers are still swept


def test_gc_never_deletes_sharded_saves_through_links(root: Path, tmp_path: Path) -> None:
    h = _train(root)
    outside = tmp_path / "elsewhere"
    save = outside / f"{h}_step_000001.0abc"
    save.mkdir(parents=True)
    (save / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"precious")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.safetensors").write_bytes(b"precious")
    old = time.time() - 7200
    for p in (save, outside, other):
        os.utime(p, (old, old))
    shards = Layout(root).shards_dir(h)
    shards.symlink_to(outside)  # the whole shards/ directory is a link
    report = wl.gc(root=root, grace_seconds=0)
    assert save.is_dir() and (save / "shard-00001-model-00001-of-00001.safetensors").exists()
    shards.unlink()
    shards.mkdir()
    (shards / f"{h}_step_000009.0def").symlink_to(other)  # one save is a link
    dead = shards / f"{h}_step_000008.0fed"  # a save whose manifest is gone: collected
    mine = shards / "notes"  # not what a save writes: left alone
    for d in (dead, mine):
        d.mkdir()
        (d / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"x" * 10)
        os.utime(d, (old, old))
    report = wl.gc(root=root, grace_seconds=0)
    assert (other / "keep.safetensors").exists() and not dead.exists() and mine.is_dir()
    assert report.links_skipped == 1 and report.shard_sets_deleted == 1 and report.bytes_freed >= 10


# --- 2. a manifest's experiment and step never build a path out of the root ---------------------

def test_prune_never_deletes_outside_the_root_for_a_crafted_experiment(root: Path, tmp_path: Path) -> None:
    h = _train(root)
    evil = "../../victim"
    targets = []
    for step in (1, 2):
        # where the old code built the path it deleted: checkpoints/<experiment>/model/<experiment>_step_<step>.json
        target = Path(os.path.normpath(root / "checkpoints" / evil / "model" / f"{evil}_step_{step:06d}.json"))
        (tmp_path / "victim" / "model").mkdir(parents=True, exist_ok=True)  # so the crafted path resolves
        target.write_bytes(b"precious")
        targets.append(target)
        _craft(root, h, step, lambda b: b.update(experiment=evil))
    assert not any(t.is_relative_to(root) for t in targets)
    wl.prune(keep_last=1, root=root)
    assert all(t.read_bytes() == b"precious" for t in targets)
    report = wl.verify(root=root)
    assert sorted(ref for ref, _ in report.damaged) == [f"{h}@1", f"{h}@2"]
    assert "experiment" in report.damaged[0][1]


# --- 3. identifiers read from a manifest are validated before they touch a path -----------------

def _outside_tensor(tmp_path: Path, body: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """A safetensors-named file outside the root holding other bytes for the weight."""
    entry = dict(body["tensors"][WEIGHT])
    data = torch.full((8, 8), 7.0).numpy().tobytes()
    path = tmp_path / "elsewhere" / "weights.safetensors"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    entry.update(digest="sha256:" + hashlib.sha256(data).hexdigest(), offset=0, nbytes=len(data))
    entry.pop("check", None)
    return path, entry


@pytest.mark.parametrize("pack", ["absolute", "dotdot"])
def test_a_pack_id_that_leaves_the_root_is_a_damaged_checkpoint(root: Path, tmp_path: Path, pack: str) -> None:
    h = _train(root)
    path, entry = _outside_tensor(tmp_path, _body(root, h, 3))
    stem = str(path)[: -len(".safetensors")]
    # Layout.pack joins objects/<id[:2]>/<id[2:]>.safetensors: an id starting ".." then an absolute
    # path, or climbing with "..", named that file.
    entry["pack"] = ".." + stem if pack == "absolute" else ".." + "../" * 40 + os.path.relpath(stem, "/")
    named = root / "objects" / entry["pack"][:2] / (entry["pack"][2:] + ".safetensors")
    assert Path(os.path.normpath(named)) == path
    _craft(root, h, 3, lambda b: b["tensors"].update({WEIGHT: entry}))
    report = wl.verify(root=root)
    assert [ref for ref, _ in report.damaged] == [f"{h}@3"] and "pack" in report.damaged[0][1]
    with pytest.raises(wl.CorruptCheckpointError):
        wl.load(f"{h}@3", root=root)
    exported = run_cli("export", f"{h}@3", str(tmp_path / "out.safetensors"), root=root)
    assert exported.returncode == 5 and not (tmp_path / "out.safetensors").exists(), exported.stderr
    system = _resumer(root)
    assert system.resume("latest") == 2
    assert not torch.equal(wl.get_model().weight, torch.full((8, 8), 7.0))
    with pytest.raises(wl.CorruptCheckpointError):
        system.resume(f"{h}@3")
    system.close()


@pytest.mark.parametrize("field,value", [
    ("digest", "sha256:../../etc"), ("digest", 17), ("check", "xxh3-128:zz"), ("pack", "ab"),
    ("offset", True), ("nbytes", "256"), ("encoding", "gzip"), ("raw_nbytes", -1), ("base", {"pack": "x"}),
])
def test_every_blob_field_is_checked_against_its_grammar(root: Path, field: str, value: Any) -> None:
    h = _train(root)
    _craft(root, h, 3, lambda b: b["tensors"][WEIGHT].update({field: value}))
    report = wl.verify(root=root)
    assert [ref for ref, _ in report.damaged] == [f"{h}@3"]
    assert str(Layout(root).manifest(h, 3)) in report.damaged[0][1]
    system = _resumer(root)
    assert system.resume("latest") == 2
    system.close()


@pytest.mark.parametrize("field,value", [
    ("step", "3"), ("step", True), ("step", -3), ("step", 3.0), ("created_ns", 2**64), ("experiment", "ABC"),
    ("tensors", [1, 2]), ("state", [1]), ("metrics", [1]), ("reasons", "step"),
])
def test_a_malformed_manifest_field_is_a_damaged_checkpoint(root: Path, field: str, value: Any) -> None:
    h = _train(root)
    _craft(root, h, 3, lambda b: b.update({field: value}))
    report = wl.verify(root=root)
    assert [ref for ref, _ in report.damaged] == [f"{h}@3"]
    system = _resumer(root)
    assert system.resume("latest") == 2
    system.close()


def test_a_remote_verify_never_writes_outside_its_mirror(tmp_path: Path) -> None:
    bucket = tmp_path / "a" / "b" / "bucket"
    h = _train(bucket)
    (bucket / "x").mkdir()
    # objects/../x/../../../pwned.safetensors: two levels above the bucket, and above the mirror
    pwned_remote = tmp_path / "a" / "pwned.safetensors"
    pwned_remote.write_bytes(b"attacker's bytes")
    _craft(bucket, h, 3, lambda b: b["tensors"][WEIGHT].update(pack="..x/../../../pwned"))
    staging = tmp_path / "s1" / "s2" / "staging"
    proc = run_cli("verify", "--root", f"file://{bucket}", env={"WEIGHTSLAB_STAGING": str(staging)})
    written = [p for p in tmp_path.rglob("pwned*") if p != pwned_remote]
    assert written == [], f"verify wrote outside its mirror: {written}"
    assert proc.returncode == 1, proc.stderr
    assert f"{h}@3" in proc.stdout and "pack" in proc.stdout


# --- 6. file name and content agree ------------------------------------------------------------

def test_a_manifest_whose_step_disagrees_with_its_file_name_is_damaged(root: Path) -> None:
    h = _train(root)
    layout = Layout(root)
    # @2's content, committed later, under the name of step 9
    newer = _craft(root, h, 2, lambda b: b.update(created_ns=b["created_ns"] + 10**12), path=layout.manifest(h, 9))
    report = wl.verify(root=root)
    assert [ref for ref, _ in report.damaged] == [f"{h}@9"] and "step" in report.damaged[0][1]
    system = _resumer(root)
    assert system.resume("latest") == 3  # not "2" read from the file named 9
    system.close()
    LEDGER.clear()
    plan = wl.prune(keep_last=1, root=root)  # steps 2 and "2" no longer collide
    assert sorted(r.step for r in plan.delete) == [1, 2]
    assert newer.exists() and layout.manifest(h, 3).exists()


def test_a_manifest_whose_experiment_disagrees_with_its_directory_is_damaged(root: Path) -> None:
    h = _train(root)
    other = "0123456789abcdef"
    layout = Layout(root)
    _craft(root, h, 1, lambda b: None, path=layout.manifest(other, 1))
    report = wl.verify(root=root)
    assert [ref for ref, _ in report.damaged] == [f"{other}@1"]
    assert "experiment" in report.damaged[0][1]


# --- 7. sizes are checked against the real files before anything is allocated --------------------

_BAD_ENTRIES: dict[str, Callable[[dict[str, Any]], None]] = {
    "wrong shape": lambda e: e.update(shape=[9, 8]),
    "unknown dtype": lambda e: e.update(dtype="F33"),
    "negative offset": lambda e: e.update(offset=-8),
    "offset past int64": lambda e: e.update(offset=2**63),
    "4 TB shape": lambda e: e.update(shape=[2**20, 2**20], nbytes=2**42),
    "size past the pack": lambda e: e.update(shape=[1000, 1000], nbytes=4 * 10**6),
    "size of another blob": lambda e: e.update(shape=[1000, 1000], nbytes=4 * 10**6, pack="f" * 64),
}


@pytest.mark.parametrize("damage", list(_BAD_ENTRIES))
def test_a_manifest_with_impossible_sizes_is_damaged_and_resume_falls_back(root: Path, damage: str) -> None:
    h = _train(root)
    _craft(root, h, 3, lambda b: _BAD_ENTRIES[damage](b["tensors"][WEIGHT]))
    report = wl.verify(root=root)
    assert [ref for ref, _ in report.damaged] == [f"{h}@3"], report
    system = _resumer(root)
    assert system.resume("latest") == 2
    with pytest.raises(wl.CorruptCheckpointError) as info:
        system.resume(f"{h}@3")
    assert f"{h}@3" in str(info.value) or str(Layout(root).manifest(h, 3)) in str(info.value)
    system.close()


def test_the_storage_layer_knows_the_bridges_dtypes() -> None:
    """Manifests are checked without torch, against the storage layer's own table of dtypes."""
    from weightslab.storage.identifiers import DTYPE_SIZES
    from weightslab.tensors import DTYPE_TAGS

    assert {tag: torch.empty((), dtype=d).element_size() for d, tag in DTYPE_TAGS.items()} == DTYPE_SIZES


def test_a_location_is_still_a_hint(root: Path) -> None:
    """An offset past the end of its pack is a stale location, not damage: the digest finds the blob."""
    h = _train(root)
    _craft(root, h, 3, lambda b: b["tensors"][WEIGHT].update(offset=10**12))
    assert wl.verify(root=root).ok
    system = _resumer(root)
    assert system.resume("latest") == 3
    system.close()


def test_verify_reads_in_bounded_chunks(root: Path) -> None:
    """A manifest that says a blob is 400 MB in a pack of a few kB costs no 400 MB of memory."""
    h = _train(root)
    _craft(root, h, 3, lambda b: b["tensors"][WEIGHT].update(shape=[100 * 2**20], nbytes=400 * 2**20))
    proc = run_python(f"""
import sys
from weightslab.cli.commands import main
code = main(["--root", {str(root)!r}, "verify"])
# the peak RSS of this process image (ru_maxrss would include the parent's, from before exec)
print("PEAK", [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
sys.exit(code)
""", check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"{h}@3" in proc.stdout and "1 damaged" in proc.stdout
    peak_mb = int(proc.stdout.split("PEAK ")[1].split()[0]) / 1024
    assert peak_mb < 100, f"verify took {peak_mb:.0f} MB of RSS"


def test_verify_hashes_a_large_blob_in_chunks(root: Path) -> None:
    from weightslab.storage import store
    from weightslab.storage.store import Blob, BlobStore

    data = bytes(range(256)) * (3 * store.VERIFY_CHUNK // 256 + 7)
    blobs = BlobStore(Layout(root), direct=False)
    (ref,) = blobs.put([Blob(data=data, dtype="U8", shape=(len(data),))])
    blobs.verify_blob(ref)
    pack = Layout(root).pack(ref.pack)
    damaged = bytearray(pack.read_bytes())
    damaged[ref.offset + 2 * store.VERIFY_CHUNK + 5] ^= 1  # in the third chunk
    pack.write_bytes(bytes(damaged))
    with pytest.raises(wl.CorruptCheckpointError, match="does not match its digest"):
        BlobStore(Layout(root), direct=False).verify_blob(ref)


def test_an_encoded_blob_claiming_more_than_its_frame_holds_is_damaged(root: Path) -> None:
    pytest.importorskip("zstandard")
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.zero_()  # compresses: stored as a zstd blob
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                      compression="zstd")
    wl.register_model(model)
    wl.checkpoint_on_step(1)
    system.wait()
    h = system.experiment_hash
    system.close()
    LEDGER.clear()
    assert _body(root, h, 1)["tensors"][WEIGHT]["encoding"] == "zstd"
    _craft(root, h, 1, lambda b: b["tensors"][WEIGHT].update(shape=[2**20, 2**20], raw_nbytes=2**42))
    report = wl.verify(root=root)  # (allocating 4 TB would raise MemoryError)
    assert [ref for ref, _ in report.damaged] == [f"{h}@1"] and "zstd frame" in report.damaged[0][1]
    with pytest.raises(wl.CorruptCheckpointError, match="zstd frame"):
        wl.load(f"{h}@1", root=root)


def test_a_zstd_frame_is_checked_by_its_headers_alone() -> None:
    pytest.importorskip("zstandard")
    from weightslab.storage.encoding import check_frame, encode

    raw = bytes(4 << 20)
    frame = bytes(encode(raw, itemsize=4, encoding="zstd"))
    reads: list[int] = []

    def read(at: int, count: int) -> bytes:
        reads.append(count)
        return frame[at:at + count]

    check_frame(read, len(frame), len(raw))
    assert sum(reads) < 200  # headers only: a few bytes per 128 KiB block
    with pytest.raises(ValueError, match="holds 4194304 bytes where 4194305 were expected"):
        check_frame(read, len(frame), len(raw) + 1)
    cut = len(frame) // 2  # the header still says 4 MiB; the blocks that would regenerate them are gone
    with pytest.raises(ValueError, match="zstd frame ends after"):
        check_frame(lambda at, count: frame[:cut][at:at + count], cut, len(raw))


# --- 8. one malformed manifest does not stop any command ---------------------------------------

def _deep(root: Path, path: Path) -> None:
    path.write_bytes(b'{"kind": "weightslab.checkpoint", "state": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


@pytest.mark.parametrize("damage", ["tensors a list", "nested 100k deep", "step 2**63"])
def test_one_malformed_manifest_is_skipped_and_reported_by_every_command(root: Path, damage: str) -> None:
    h = _train(root)
    layout = Layout(root)
    if damage == "tensors a list":
        bad = _craft(root, h, 3, lambda b: b.update(tensors=list(b["tensors"].values())))
    elif damage == "nested 100k deep":
        bad = layout.manifest(h, 3)
        _deep(root, bad)
    else:
        bad = _craft(root, h, 3, lambda b: b.update(step=2**63), path=layout.manifest(h, 2**63))
    ref = f"{h}@{2**63 if damage == 'step 2**63' else 3}"
    listed = run_cli("ls", "--json", root=root)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["hash"] == h and row["checkpoints"] == (3 if damage == "step 2**63" else 2)
    assert str(bad) in listed.stderr and "Traceback" not in listed.stderr
    logged = run_cli("log", root=root)
    assert logged.returncode == 0 and h[:8] in logged.stdout, logged.stderr
    verified = run_cli("verify", root=root)
    assert verified.returncode == 1 and ref in verified.stdout, verified.stderr
    assert "Traceback" not in verified.stderr
    pruned = run_cli("prune", "--keep-last", "1", "--dry-run", "--json", root=root)  # retention leaves it alone
    assert pruned.returncode == 0 and ref not in json.loads(pruned.stdout)["delete"], pruned.stderr
    collected = run_cli("gc", "--dry-run", root=root)  # refuses, in one line: its blobs are unknown
    assert collected.returncode == 6 and str(bad) in collected.stderr and "Traceback" not in collected.stderr
    system = _resumer(root)
    assert system.resume("latest") == (3 if damage == "step 2**63" else 2)
    system.close()


def test_a_metric_no_float_holds_is_left_out_with_a_warning(root: Path) -> None:
    h = _train(root)
    _craft(root, h, 3, lambda b: b.update(metrics={"loss": 10**400, "acc": 0.5}))
    listed = run_cli("ls", "--json", root=root)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["checkpoints"] == 3 and row["best"] == {"acc": 0.5}
    assert "metric 'loss'" in listed.stderr and "Traceback" not in listed.stderr
    assert wl.prune(keep_last=1, root=root).keep_refs == (f"{h}@3",)


def test_damaged_records_and_names_do_not_stop_a_listing(root: Path) -> None:
    h = _train(root)
    layout = Layout(root)
    layout.names_dir.mkdir()
    (layout.names_dir / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (layout.names_dir / "escape.json").write_bytes(seal({"format_version": 2, "kind": "weightslab.name",
                                                         "name": "escape", "experiment": "../../x",
                                                         "created": "now"}))
    layout.experiment_record(h).write_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    listed = run_cli("ls", "--json", root=root)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["hash"] == h and row["checkpoints"] == 3 and row["names"] == []
    assert "Traceback" not in listed.stderr and "deep.json" in listed.stderr and "escape.json" in listed.stderr
    assert CheckpointManager(root).names() == {}
    logged = run_cli("log", root=root)  # the damaged record: drawn without its changes
    assert logged.returncode == 0 and h[:8] in logged.stdout and "Traceback" not in logged.stderr, logged.stderr


# --- 10. steps fit the catalog --------------------------------------------------------------------

def test_max_step_is_what_the_catalog_stores() -> None:
    import sqlite3

    from weightslab.storage.layout import MAX_STEP
    assert MAX_STEP == 2**63 - 1
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (step INTEGER)")
    db.execute("INSERT INTO t VALUES (?)", (MAX_STEP,))
    with pytest.raises(OverflowError):
        db.execute("INSERT INTO t VALUES (?)", (MAX_STEP + 1,))


def test_sizes_that_overflow_the_catalog_do_not_stop_a_listing(root: Path) -> None:
    h = _train(root)

    def huge(b: dict[str, Any]) -> None:
        e = b["tensors"][WEIGHT]
        e.update(dtype="U8", shape=[2**62], nbytes=2**62, digest="sha256:" + f"{b['step']:064x}")
        e.pop("check", None)

    for step in (1, 2, 3):  # each fits, their sum does not
        _craft(root, h, step, huge)
    listed = run_cli("ls", "--json", root=root)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["checkpoints"] == 3 and row["bytes_alone"] >= 3 * 2**62


# --- writes never go through a link either ----------------------------------------------------------

def test_the_catalog_never_writes_through_a_link(root: Path, tmp_path: Path) -> None:
    h = _train(root)
    victim = tmp_path / "someones.db"
    victim.write_bytes(b"")  # an empty file is an empty SQLite database: the index would be built in it
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    (root / "index.sqlite").symlink_to(victim)
    listed = run_cli("ls", "--json", root=root)
    assert listed.returncode == 0, listed.stderr
    assert [r["hash"] for r in json.loads(listed.stdout)] == [h]
    assert victim.read_bytes() == b"" and "symbolic link" in listed.stderr


def test_a_commit_never_goes_through_a_linked_experiment_directory(root: Path, tmp_path: Path) -> None:
    h = _train(root)
    layout = Layout(root)
    elsewhere = tmp_path / "elsewhere"
    layout.model_dir(h).rename(elsewhere)
    layout.model_dir(h).symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.checkpoint_on_step(7)
    with pytest.raises(wl.CheckpointSaveError, match="symbolic link"):
        system.wait()
    system.close()
    assert sorted(p.name for p in elsewhere.iterdir()) == before
