"""weightslab.distributed.sharded: DTensors saved and loaded collectively through torch.distributed.checkpoint.

One real 2-rank gloo job (tests/scripts/sharded_worker.py) runs every collective check, with
pickle.load, pickle.loads and torch.load made to raise in both ranks; the tests below read what
each rank reported and then check, in this process without a process group, what a single
process does with the files it left: a 2-rank save loaded whole, ``verify``, and the JSON record.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightslab.distributed import sharded
from weightslab.errors import (CheckpointSaveError, CorruptCheckpointError, FormatVersionError, StateError,
                               WeightslabError)

from .support import REPO, child_env

SCRIPT = REPO / "tests" / "scripts" / "sharded_worker.py"
WORLD = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Run the 2-rank job once; its work directory and each rank's report."""
    tmp = tmp_path_factory.mktemp("sharded")
    work = tmp / "work"
    work.mkdir()
    env = child_env()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(rank), str(WORLD), str(tmp / "init"), str(work)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(WORLD)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed ({p.returncode}):\n{stdout}\n{stderr[-5000:]}"
    return work, [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _report(job: tuple[Path, list[dict]], check: str) -> list:
    """Each rank's result of ``check``; fails with the rank's traceback if it raised."""
    reports = [report[check] for report in job[1]]
    for rank, result in enumerate(reports):
        if isinstance(result, str) and result != "ok" and not result.startswith("skip:"):
            pytest.fail(f"rank {rank}, {check}:\n{result}")
    return reports


def _files(job: tuple[Path, list[dict]]) -> sharded.ShardedFiles:
    return sharded.ShardedFiles.from_json(_report(job, "dtensor_roundtrip")[0]["files"])


def test_dtensors_round_trip_bit_exact_in_place_with_the_same_record_on_every_rank(job):
    work, _ = job
    reports = _report(job, "dtensor_roundtrip")
    assert reports[0] == reports[1]  # the same ShardedFiles on every rank
    files = _files(job)
    assert files.world_size == WORLD
    on_disk = sorted(p.name for p in (work / "dt").iterdir())
    assert on_disk == list(files.files) and len(on_disk) == WORLD  # one file per rank, nothing else
    for name, (size, _) in files.files.items():
        assert (work / "dt" / name).stat().st_size == size
    assert sharded.verify(work / "dt", files) == []


def test_fsdp2_model_and_adam_state_resume_bit_exact(job):
    (result, *_) = _report(job, "fsdp2")
    if result.startswith("skip:"):
        pytest.skip(result[len("skip:"):].strip())
    assert _report(job, "fsdp2") == ["ok"] * WORLD


def test_async_save_holds_the_values_at_the_call(job):
    assert _report(job, "async_roundtrip") == ["ok"] * WORLD


def test_a_one_rank_save_loads_resharded_on_two_ranks(job):
    assert _report(job, "one_rank_save_loads_on_two") == ["ok"] * WORLD


def test_a_two_rank_save_loads_whole_in_one_process_without_unpickling(job, monkeypatch):
    from safetensors.torch import load_file

    work, _ = job
    expected = load_file(str(work / "expected.safetensors"))

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickled during a load")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(owner, name, forbidden)
    targets = {name: torch.zeros_like(tensor) for name, tensor in expected.items()}
    sharded.load(targets, work / "dt", _files(job))
    for name, tensor in expected.items():
        assert targets[name].dtype == tensor.dtype and torch.equal(targets[name], tensor), name


def test_the_job_never_unpickled_and_the_guard_catches_stock_dcp(job):
    # The worker ran every save and load with pickle.load/loads and torch.load raising; this
    # check proves that guard fires on stock DCP, whose metadata is pickled.
    assert _report(job, "stock_dcp_unpickles") == ["ok"] * WORLD


@pytest.mark.parametrize("check, directory, index", [("flipped_byte", "bad", 1), ("missing_file", "missing", 0)])
def test_a_damaged_file_raises_the_same_error_naming_it_on_every_rank(job, check, directory, index):
    work, _ = job
    files = _files(job)
    victim = list(files.files)[index]  # hashed on load by rank `index`; the other rank learns it by agreeing
    reports = _report(job, check)
    assert reports[0] == reports[1]
    assert reports[0]["path"] == victim and victim in reports[0]["message"]
    assert ("is missing" if check == "missing_file" else "digest") in reports[0]["message"]
    problems = sharded.verify(work / directory, files)
    assert len(problems) == 1 and victim in problems[0], problems


def test_tensors_that_do_not_fit_raise_on_every_rank(job):
    assert _report(job, "wrong_shape") == ["ok"] * WORLD


def test_a_used_directory_is_refused_on_every_rank(job):
    reports = _report(job, "used_directory")
    assert reports[0] == reports[1] and "fresh directory" in reports[0]["message"]


# --- one process, no process group --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's, from the async save's thread
def test_save_and_load_in_one_process(tmp_path):
    source = {"a": torch.randn(4, 3).T, "b": torch.arange(5), "c": torch.tensor(2.5, dtype=torch.float64),
              "empty": torch.zeros(0, 3), "mask": torch.tensor([True, False])}  # "a" is not contiguous
    files = sharded.save(source, tmp_path / "ck")
    assert files.world_size == 1 and list(files.files) == sorted(p.name for p in (tmp_path / "ck").iterdir())
    targets = {name: torch.zeros_like(t) for name, t in source.items()}
    sharded.load(targets, tmp_path / "ck", files)
    assert all(torch.equal(targets[name], source[name]) for name in source)

    handle = sharded.async_save({"a": source["a"]}, tmp_path / "async")
    background = handle.result()
    target = torch.zeros(3, 4)
    sharded.load({"a": target}, tmp_path / "async", background)
    assert torch.equal(target, source["a"])
    with pytest.raises(CheckpointSaveError, match="fresh directory"):
        sharded.save(source, tmp_path / "ck")

    (name, (size, _)), = files.files.items()
    path = tmp_path / "ck" / name
    path.write_bytes(path.read_bytes()[:-1])
    assert sharded.verify(tmp_path / "ck", files) == [f"{path}: {size - 1} bytes, {size} recorded at save"]
    with pytest.raises(CorruptCheckpointError, match="does not have the size recorded") as info:
        sharded.load(targets, tmp_path / "ck", files)
    assert info.value.path == path


def test_values_that_cannot_be_saved_are_refused_before_any_collective(tmp_path):
    for bad, message in (({"x": [1, 2]}, "not a tensor"), ({"x": torch.empty(2, device="meta")}, "meta device"),
                         ({1: torch.zeros(1)}, "non-empty string")):
        with pytest.raises(StateError, match=message):
            sharded.save(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not sharded.is_sharded(torch.zeros(2)) and not sharded.is_sharded(torch.nn.Parameter(torch.zeros(2)))


def test_the_record_round_trips_through_json_and_refuses_what_could_escape_its_directory():
    digest = "sha256:" + "ab" * 32
    files = sharded.ShardedFiles(files={"b.safetensors": (2, digest), "a.safetensors": (1, digest)}, world_size=2)
    data = json.loads(json.dumps(files.to_json()))
    assert sharded.ShardedFiles.from_json(data) == files
    assert list(files.files) == ["a.safetensors", "b.safetensors"] and files.nbytes == 3
    for name in ("../x.safetensors", "sub/x.safetensors", ".x.safetensors", "x.pt"):
        with pytest.raises(CorruptCheckpointError, match="malformed"):
            sharded.ShardedFiles.from_json({**data, "files": {name: {"size": 1, "digest": digest}}})
    with pytest.raises(CorruptCheckpointError):
        sharded.ShardedFiles.from_json({**data, "files": {"a.safetensors": {"size": 1, "digest": "md5:00"}}})
    with pytest.raises(FormatVersionError) as info:
        sharded.ShardedFiles.from_json({**data, "layout": "something/2"})
    assert isinstance(info.value, WeightslabError)
