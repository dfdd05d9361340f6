"""One rank of a gloo job that exercises weightslab.distributed.sharded, for tests/test_sharded.py.

    python sharded_worker.py RANK WORLD INIT_FILE WORKDIR

Before anything else, pickle.load, pickle.loads and torch.load are replaced by a function that
raises, for the whole run: every save and load below must work without them (the first check
proves the replacement does catch stock DCP, which unpickles its metadata). Each check runs on
every rank in the same order; each rank writes WORKDIR/rank<R>.json mapping check names to "ok",
"skip: <reason>", a value for the test to compare, or the traceback of a failure.
"""

import datetime
import json
import pickle
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


class Unpickled(AssertionError):
    pass


def _forbidden(*args, **kwargs):
    raise Unpickled("something unpickled during a load")


pickle.load = pickle.loads = torch.load = torch.serialization.load = _forbidden

from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402

from weightslab.distributed import sharded  # noqa: E402
from weightslab.errors import ArchitectureMismatchError, CheckpointSaveError, CorruptCheckpointError  # noqa: E402

rank, world, init_file, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
mesh = init_device_mesh("cpu", (world,))
results: dict = {}


def check(fn):
    try:
        out = fn()
        results[fn.__name__] = "ok" if out is None else out
    except BaseException:  # noqa: BLE001 - recorded for the test to show
        results[fn.__name__] = traceback.format_exc()
    return fn


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def expect_raises(kind, fn):
    try:
        fn()
    except kind as exc:
        return exc
    raise AssertionError(f"expected {kind.__name__}")


# The full tensors of the main checkpoint, identical on every rank (same seed), and how to place them.
torch.manual_seed(0)
FULL = {
    "w": torch.randn(5, 3),                       # Shard(0), uneven: 3 + 2 rows
    "v": torch.randn(4, 6),                       # Shard(1)
    "h": torch.randn(7).to(torch.bfloat16),       # another dtype, uneven
    "tiny": torch.randn(1, 4),                    # rank 1's shard is empty
    "i": torch.arange(10, dtype=torch.int64),
    "r": torch.randn(3),                          # a replicated DTensor
    "step": torch.tensor(7.0),                    # a plain (replicated) 0-d tensor
}
PLACEMENTS = {"w": [Shard(0)], "v": [Shard(1)], "h": [Shard(0)], "tiny": [Shard(0)], "i": [Shard(0)],
              "r": [Replicate()], "step": None}


def placed(values: dict) -> dict:
    return {k: v.clone() if PLACEMENTS[k] is None else distribute_tensor(v.clone(), mesh, PLACEMENTS[k])
            for k, v in values.items()}


def zeroed() -> dict:
    return placed({k: torch.zeros_like(v) for k, v in FULL.items()})


def all_zero(tensors: dict) -> bool:
    return all(not full(t).count_nonzero() for t in tensors.values())


@check
def stock_dcp_unpickles():
    # The replacement above must catch what it is there to catch: stock DCP's pickled metadata.
    import torch.distributed.checkpoint as dcp

    source = {"w": distribute_tensor(FULL["w"].clone(), mesh, [Shard(0)])}
    dcp.save(source, storage_writer=dcp.FileSystemWriter(str(work / "stock")))
    try:
        dcp.load({"w": distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)])},
                 storage_reader=dcp.FileSystemReader(str(work / "stock")))
    except BaseException as exc:  # DCP wraps it in a CheckpointException (a BaseException)
        assert "something unpickled" in str(exc), str(exc)
        return None
    raise AssertionError("stock DCP loaded without unpickling: the replacement of pickle catches nothing")


@check
def dtensor_roundtrip():
    source = placed(FULL)
    assert sharded.is_sharded(source["w"]) and sharded.is_sharded(source["r"])
    assert not sharded.is_sharded(source["step"])
    files = sharded.save(source, work / "dt")
    targets = zeroed()
    locals_before = {k: (t.to_local() if isinstance(t, DTensor) else t).data_ptr() for k, t in targets.items()}
    sharded.load(targets, work / "dt", files)
    for k, t in targets.items():
        assert (t.to_local() if isinstance(t, DTensor) else t).data_ptr() == locals_before[k], f"{k}: not in place"
        assert same_bytes(full(t), FULL[k]), k
    if rank == 0:
        save_file({k: v.contiguous() for k, v in FULL.items()}, str(work / "expected.safetensors"))
    return {"files": files.to_json()}


@check
def fsdp2():
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        fully_shard(model, mesh=mesh)
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def train(model, opt, seed):
        g = torch.Generator().manual_seed(seed * 10 + rank)  # each rank its own data, as in data parallelism
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    def live(model, opt):
        # The state_dict values: DTensors (and Adam's plain 'step') that share storage with the model.
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        for index, state in opt.state_dict()["state"].items():
            tensors.update({f"optim/{index}/{k}": v for k, v in state.items()})
        return tensors

    def snapshot(model, opt):
        return {k: full(v).clone() for k, v in live(model, opt).items()}

    try:
        model, opt = build(0)
        train(model, opt, 1)
    except Exception as exc:  # noqa: BLE001 - reported as the reason to skip
        return f"skip: fully_shard on CPU with gloo failed here: {type(exc).__name__}: {exc}"
    train(model, opt, 2)
    assert all(sharded.is_sharded(p) for p in model.parameters())
    tensors = live(model, opt)
    assert any(isinstance(v, DTensor) for k, v in tensors.items() if k.startswith("optim/")), "no sharded Adam state"
    files = sharded.save(tensors, work / "fsdp")
    train(model, opt, 3)
    expected = snapshot(model, opt)

    other, other_opt = build(1)
    train(other, other_opt, 9)  # different weights and optimizer state, to be overwritten
    sharded.load(live(other, other_opt), work / "fsdp", files)
    train(other, other_opt, 3)
    got = snapshot(other, other_opt)
    assert got.keys() == expected.keys()
    for k in expected:
        assert same_bytes(got[k], expected[k]), f"{k} differs after resume"
    return None


@check
def async_roundtrip():
    first = {"w": distribute_tensor(FULL["w"].clone(), mesh, [Shard(0)]), "step": torch.tensor(3.0)}
    second = {"v": distribute_tensor(FULL["v"].clone(), mesh, [Shard(1)])}
    handle = sharded.async_save(first, work / "async1")
    first["w"].to_local().add_(1.0)  # training goes on: the save holds the values at the call
    first["step"].add_(1.0)
    handle2 = sharded.async_save(second, work / "async2")  # waits for the first on the same group
    files, files2 = handle.result(), handle2.result()
    assert handle.done() and handle2.done()
    targets = {"w": distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)]), "step": torch.tensor(0.0)}
    sharded.load(targets, work / "async1", files)
    assert same_bytes(targets["w"].full_tensor(), FULL["w"]) and targets["step"].item() == 3.0
    targets2 = {"v": distribute_tensor(torch.zeros(4, 6), mesh, [Shard(0)])}  # other placement
    sharded.load(targets2, work / "async2", files2)
    assert same_bytes(targets2["v"].full_tensor(), FULL["v"])
    return None


@check
def one_rank_save_loads_on_two():
    group0 = dist.new_group([0], backend="gloo")  # every rank makes it; only rank 0 saves with it
    if rank == 0:
        files = sharded.save({"w": FULL["w"].clone(), "v": FULL["v"].clone()}, work / "one", group=group0)
        assert files.world_size == 1 and len(files.files) == 1, files
        (work / "one.json").write_text(json.dumps(files.to_json()))
    dist.barrier()
    files = sharded.ShardedFiles.from_json(json.loads((work / "one.json").read_text()))
    targets = {"w": distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)]),
               "v": distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])}
    sharded.load(targets, work / "one", files)
    assert targets["w"].to_local().shape[0] == (3 if rank == 0 else 2)
    assert same_bytes(targets["w"].full_tensor(), FULL["w"]) and same_bytes(targets["v"].full_tensor(), FULL["v"])
    return None


def _files() -> sharded.ShardedFiles:
    return sharded.ShardedFiles.from_json(results["dtensor_roundtrip"]["files"])


def _damaged_load(directory: Path) -> dict:
    targets = zeroed()
    exc = expect_raises(CorruptCheckpointError, lambda: sharded.load(targets, directory, _files()))
    assert all_zero(targets), "a refused load changed the targets"
    return {"message": str(exc), "path": exc.path.name if exc.path else None}


@check
def flipped_byte():
    names = sorted(_files().files)
    if rank == 0:
        shutil.copytree(work / "dt", work / "bad")
        victim = work / "bad" / names[1]  # hashed by rank 1 on load: rank 0 learns of it only by agreeing
        data = bytearray(victim.read_bytes())
        data[len(data) - 5] ^= 0x01
        victim.write_bytes(bytes(data))
    dist.barrier()
    return _damaged_load(work / "bad")


@check
def missing_file():
    names = sorted(_files().files)
    if rank == 0:
        shutil.copytree(work / "dt", work / "missing")
        (work / "missing" / names[0]).unlink()
    dist.barrier()
    return _damaged_load(work / "missing")


@check
def wrong_shape():
    targets = zeroed()
    targets["w"] = distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)])
    exc = expect_raises(ArchitectureMismatchError, lambda: sharded.load(targets, work / "dt", _files()))
    assert any("w: shape (6, 3) here, (5, 3)" in d for d in exc.differences), exc.differences
    return None


@check
def used_directory():
    exc = expect_raises(CheckpointSaveError, lambda: sharded.save(placed(FULL), work / "dt"))
    return {"message": str(exc)}


(work / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
dist.barrier()
dist.destroy_process_group()
