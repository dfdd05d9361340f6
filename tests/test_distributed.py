"""torch.distributed on CPU: real gloo ranks in subprocesses, preempted with real signals and killed
with SIGKILL. Rank 0 writes the one manifest of each checkpoint; it holds every rank's own random
generators, loader position and custom state, so a DDP run with per-rank randomness stopped and
resumed ends bit for bit where an uninterrupted one does, on every rank."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager

from .support import REPO, child_env

SCRIPT = REPO / "tests" / "scripts" / "ddp_train.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


class Ranks:
    """The processes of one job, their output collected line by line as it comes."""

    def __init__(self, tmp: Path, root: Path, out: Path, *extra: str, world: int = 2):
        env = child_env()
        init = tmp / f"init-{out.name}"
        self.procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), str(rank), str(world),
                                        str(init), *extra], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True) for rank in range(world)]
        self.lines: list[list[str]] = [[] for _ in self.procs]
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(world)]
        for reader in self._readers:
            reader.start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            with self._changed:
                self.lines[i].append(line)
                self._changed.notify_all()

    def wait_for(self, rank: int, text: str, timeout: float = 120) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: any(text in line for line in self.lines[rank])
                                          or self.procs[rank].poll() is not None, timeout):
                raise AssertionError(f"rank {rank} never printed {text!r}:\n{self.log(rank)}")
        assert any(text in line for line in self.lines[rank]), f"rank {rank} ended first:\n{self.log(rank)}"

    def finish(self, timeout: float = 240) -> list[int]:
        codes = [p.wait(timeout=timeout) for p in self.procs]
        for reader in self._readers:
            reader.join(timeout=10)
        return codes

    def log(self, rank: int) -> str:
        return "".join(self.lines[rank])


def _run(tmp: Path, root: Path, out: Path, *extra: str, world: int = 2) -> Ranks:
    ranks = Ranks(tmp, root, out, *extra, world=world)
    codes = ranks.finish()
    for rank, code in enumerate(codes):
        assert code == 0, f"rank {rank} failed ({code}):\n{ranks.log(rank)}"
    return ranks


def _final(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def test_a_preempted_and_killed_ddp_run_resumes_bit_for_bit_on_every_rank(tmp_path):
    straight = tmp_path / "straight"
    _run(tmp_path, tmp_path / "root0", straight, "--steps", "12")
    expected = [_final(straight, rank) for rank in range(2)]
    # Each rank draws its own numbers: restoring rank 0's generators on rank 1 would not do.
    assert not torch.equal(expected[0]["next_torch"], expected[1]["next_torch"])

    root = tmp_path / "root"
    # 1. Preemption reaching one rank only: both agree at the next step boundary, take one final
    #    checkpoint there, and stop as the signal would have stopped them (death by SIGTERM).
    job = Ranks(tmp_path, root, tmp_path / "first", "--steps", "12", "--sleep", "0.3")
    job.wait_for(1, "step 3")
    job.procs[1].send_signal(signal.SIGTERM)
    assert job.finish() == [-signal.SIGTERM, -signal.SIGTERM], job.log(0) + job.log(1)
    manager = CheckpointManager(root)
    entries = manager.checkpoints()
    final = entries[-1]
    assert "preempt" in manager.read_manifest(final).reasons and final.step >= 3
    # Both stopped inside checkpoint_on_step of the agreed step, before printing it.
    assert all(f"step {final.step - 1} " in job.log(r) and f"step {final.step} " not in job.log(r)
               for r in range(2)), job.log(0) + job.log(1)
    doc = json.loads(final.path.read_text())
    assert doc["format_version"] == 3 and doc["state"]["ranks"]["world_size"] == 2
    assert len({e.step for e in entries}) == len(entries) and len({json.loads(e.path.read_text())["run"]
                                                                  for e in entries}) == 1  # one writer
    rng_keys = [doc["state"]["ranks"]["states"][r]["rng"]["torch"]["key"] for r in range(2)]
    assert doc["tensors"][rng_keys[0]]["digest"] != doc["tensors"][rng_keys[1]]["digest"]
    assert manager.verify().ok

    # 2. Resume, then SIGKILL both ranks mid-run (perhaps mid-save): the latest committed checkpoint
    #    is complete for every rank.
    job = Ranks(tmp_path, root, tmp_path / "second", "--steps", "12", "--resume", "--sleep", "0.2")
    job.wait_for(0, f"starts at {final.step}")
    job.wait_for(0, f"step {final.step + 3}")
    for proc in job.procs:
        proc.kill()
    assert job.finish() == [-signal.SIGKILL, -signal.SIGKILL]
    assert CheckpointManager(root).verify().ok
    latest = CheckpointManager(root).checkpoints()[-1].step
    assert latest >= final.step

    # 3. Resume to the end: every rank ends where the uninterrupted run did, bit for bit.
    job = _run(tmp_path, root, tmp_path / "third", "--steps", "12", "--resume")
    assert all(f"starts at {latest}" in job.log(r) for r in range(2))
    for rank in range(2):
        got = _final(tmp_path / "third", rank)
        assert got.keys() == expected[rank].keys()
        for key in expected[rank]:
            assert torch.equal(got[key], expected[rank][key]), (rank, key)


def test_another_world_size_refuses_per_rank_state_it_cannot_map(tmp_path):
    root = tmp_path / "root"
    _run(tmp_path, root, tmp_path / "two", "--steps", "4")
    # One rank cannot take two ranks' different random generators and statistics: refused, by name.
    job = Ranks(tmp_path, root, tmp_path / "one", "--steps", "6", "--resume", world=1)
    assert job.finish() == [1]
    log = job.log(0)
    assert "RankStateError" in log and "saved by 2 ranks and this job runs 1" in log
    assert "random generators" in log and "custom state 'stats'" in log and "rank_state='rank0'" in log
    assert [e.step for e in CheckpointManager(root).checkpoints()] == [2, 4]  # nothing changed
    # Accepting rank 0's: the run continues from step 4, saying what it gave up.
    job = _run(tmp_path, root, tmp_path / "one", "--steps", "6", "--resume", "--rank-state", "rank0", world=1)
    assert "starts at 4" in job.log(0) and "every rank takes rank 0's" in job.log(0)
    manifest = Layout(root).manifest(CheckpointManager(root).checkpoints()[-1].experiment, 6)
    assert "ranks" not in json.loads(manifest.read_text())["state"]  # one process: a plain checkpoint


def test_per_rank_state_equal_on_every_rank_resumes_on_another_world_size(tmp_path):
    root = tmp_path / "root"
    _run(tmp_path, root, tmp_path / "two", "--steps", "4", "--same-seed", "--no-stats")
    # Every rank drew the same numbers (same seed, same draws): nothing is lost on one rank.
    job = _run(tmp_path, root, tmp_path / "one", "--steps", "4", "--resume", "--same-seed", "--no-stats", world=1)
    assert "starts at 4" in job.log(0) and "RankStateError" not in job.log(0)
    assert "rank 0's" not in job.log(0)  # no warning: nothing was given up


def test_a_config_edit_seen_by_rank_0_changes_every_rank_at_the_same_step(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("optimizer:\n  lr: 0.01\n")
    job = Ranks(tmp_path, tmp_path / "root", tmp_path / "out", "--steps", "12", "--sleep", "0.25",
                "--config", str(config), "--no-stats")
    job.wait_for(0, "step 3 ")
    config.write_text("optimizer:\n  lr: 0.002\n")
    assert job.finish() == [0, 0], job.log(0) + job.log(1)

    def lrs(rank: int) -> dict[int, float]:
        return {int(line.split()[1]): float(line.split()[3]) for line in job.lines[rank] if line.startswith("step ")}

    first = [min(step for step, lr in lrs(rank).items() if lr == 0.002) for rank in range(2)]
    assert first[0] == first[1] and 3 < first[0] < 12, first  # the same step on both ranks
    assert lrs(0) == lrs(1)
    # Every step used the same learning rate on both ranks, so DDP kept them identical.
    finals = [_final(tmp_path / "out", rank) for rank in range(2)]
    for key in (k for k in finals[0] if k.startswith("param.")):
        assert torch.equal(finals[0][key], finals[1][key]), key
    experiments = {e.experiment for e in CheckpointManager(tmp_path / "root").checkpoints()}
    assert len(experiments) == 2  # the edit opened a child experiment, once for the whole job


FSDP = REPO / "tests" / "scripts" / "fsdp_train.py"


def _fsdp(tmp: Path, root: Path | str, out: Path, *extra: str, staging: Path | None = None) -> list[str]:
    env = child_env()
    if staging is not None:
        env["WEIGHTSLAB_STAGING"] = str(staging)
    init = tmp / f"init-{out.name}"
    procs = [subprocess.Popen([sys.executable, str(FSDP), str(root), str(out), str(rank), "2", str(init), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0 and "fully_shard" in log and "NotImplementedError" in log:
            pytest.skip(f"FSDP2 fully_shard does not run on CPU with this torch: {log.splitlines()[-1]}")
        assert p.returncode == 0, f"rank {rank} failed ({p.returncode}):\n{log}"
    return logs


def test_an_fsdp_run_saves_its_shards_with_dcp_and_resumes_bit_for_bit(tmp_path):
    _fsdp(tmp_path, tmp_path / "root0", tmp_path / "straight", "--steps", "8")
    expected = [_final(tmp_path / "straight", rank) for rank in range(2)]
    assert bool(expected[0]["sharded"].all())  # the parameters really are DTensors

    root = tmp_path / "root"
    _fsdp(tmp_path, root, tmp_path / "first", "--steps", "5")  # checkpoints at 2 and 4
    manager = CheckpointManager(root)
    entries = manager.checkpoints()
    assert [e.step for e in entries] == [2, 4]
    doc = json.loads(entries[-1].path.read_text())
    sharded = doc["state"]["sharded"]
    assert doc["format_version"] == 3 and "models/main/0.weight" in sharded["tensors"]
    assert not any(k.startswith("models/") for k in doc["tensors"])  # no rank wrote a whole sharded tensor
    assert "optimizers/main/state/0/exp_avg" in sharded["tensors"]
    shard_dir = entries[-1].path.parent.parent / sharded["directory"]
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(sharded["files"]["files"])  # one file per rank
    assert len(sharded["files"]["files"]) == 2
    assert manager.verify().ok

    logs = _fsdp(tmp_path, root, tmp_path / "final", "--steps", "8", "--resume")
    assert all("starts at 4" in log for log in logs)
    for rank in range(2):
        got = _final(tmp_path / "final", rank)
        assert got.keys() == expected[rank].keys()
        for key in expected[rank]:
            assert torch.equal(got[key], expected[rank][key]), (rank, key)

    # wl.load / wl.export read the shards whole in one process, without any process group.
    import weightslab as wl

    whole = wl.load("latest", root=root)
    assert whole["step"] == 8
    for name, value in whole["models"]["main"].items():
        assert torch.equal(value, expected[0][f"param.{name}"]), name
    assert torch.equal(whole["optimizers"]["main"]["state"][0]["exp_avg"], expected[0]["adam.0.exp_avg"])

    # A crafted manifest claiming a shape its shard files cannot hold: refused before any allocation.
    from weightslab.storage.manifest import seal

    latest = CheckpointManager(root).checkpoints()[-1]
    original = latest.path.read_bytes()
    doc = json.loads(original)
    doc["state"]["sharded"]["tensors"]["models/main/0.weight"]["shape"] = [10**6, 10**6]
    latest.path.write_bytes(seal(doc))
    with pytest.raises(wl.CorruptCheckpointError, match="sharded tensors"):
        wl.load(latest.ref, root=root)
    latest.path.write_bytes(original)

    # A flipped byte in one rank's shard file: verify names the file, and a resume falls back to
    # the checkpoint before (on both ranks alike).
    latest = CheckpointManager(root).checkpoints()[-1]
    doc = json.loads(latest.path.read_text())
    victim = latest.path.parent.parent / doc["state"]["sharded"]["directory"] / sorted(
        doc["state"]["sharded"]["files"]["files"])[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    report = CheckpointManager(root).verify()
    assert [ref for ref, _ in report.damaged] == [latest.ref] and victim.name in report.damaged[0][1]
    logs = _fsdp(tmp_path, root, tmp_path / "again", "--steps", "8", "--resume")
    assert all("starts at 6" in log and "damaged" in log for log in logs)

    # A remote root: the shard files go up before the manifest, and a machine with an empty staging
    # root fetches them to resume.
    bucket = f"file://{tmp_path / 'bucket'}"
    _fsdp(tmp_path, bucket, tmp_path / "remote1", "--steps", "5", staging=tmp_path / "staging1")
    assert list((tmp_path / "bucket" / "checkpoints").glob("*/shards/*/*.safetensors"))
    logs = _fsdp(tmp_path, bucket, tmp_path / "remote2", "--steps", "8", "--resume", staging=tmp_path / "staging2")
    assert all("starts at 4" in log for log in logs)
    for rank in range(2):
        got = _final(tmp_path / "remote2", rank)
        for key in expected[rank]:
            assert torch.equal(got[key], expected[rank][key]), (rank, key)


def test_retention_and_gc_reclaim_the_shards_of_deleted_checkpoints(tmp_path):
    import weightslab as wl

    root = tmp_path / "root"
    _fsdp(tmp_path, root, tmp_path / "out", "--steps", "6", "--retention", "1")
    manager = CheckpointManager(root)
    assert [e.step for e in manager.checkpoints()] == [6]
    shards = manager.layout.shards_dir(manager.checkpoints()[0].experiment)
    assert len(list(shards.iterdir())) == 3  # retention deletes manifests; gc reclaims the rest
    report = wl.gc(root=root, grace_seconds=0)
    assert report.shard_sets_deleted == 2
    kept = json.loads(manager.checkpoints()[0].path.read_text())["state"]["sharded"]["directory"]
    assert [p.name for p in shards.iterdir()] == [kept.split("/")[1]]
    assert CheckpointManager(root).verify().ok
