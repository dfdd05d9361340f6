"""A 2-process DDP save and resume: weightslab against torch.distributed.checkpoint (DCP) used directly.

Run: ``python benchmarks/ddp_save.py [--params 5000000] [--ranks 2] [--repeats 3] [--dir PATH] [--fsdp]``
(about a minute for the defaults on a 2-core machine; ``--params 25000000`` for the ~300 MB state
of the single-process benchmarks). ``--dir`` chooses where the files go (default: a temporary
directory under the current one, removed at the end); run it from outside a git work tree.

The ranks are real processes (``torch.multiprocessing.spawn``, gloo, CPU). Each builds the same
MLP of about ``--params`` parameters wrapped in ``DistributedDataParallel`` (with ``--fsdp``:
sharded with FSDP2 ``fully_shard``, which weightslab saves through DCP), with Adam, and takes
one training step so the optimizer has state. Then, ``--repeats`` times after one warm-up, it
measures on every rank and reports rank 0's median (the slowest rank sets the pace of a job, so
the maximum over ranks is printed too):

* weightslab: ``wl.checkpoint_on_step`` on a saving step (the loop is blocked this long), then
  ``system.wait()`` (durable); rank 0 writes the one checkpoint of the job, holding every rank's
  own state (see guides/distributed.md), so the other ranks' figures are what the call costs a rank
  that sends its random generators and loader position to rank 0;
* DCP ``save``: ``dcp.save({"model", "optim"})`` of ``get_state_dict`` (every rank writes its part
  of the replicated state; blocking until durable);
* DCP ``async_save``: the time until it returns (the loop is blocked this long) and until its
  future completes;
* resume: ``system.resume`` (every byte verified) against ``dcp.load`` + ``set_state_dict``;
* a step boundary without a save: ``wl.checkpoint_on_step`` when no save is due, whose cost under
  torch.distributed is the ranks' agreement (one all-reduce of a few integers), against the DDP
  training step it follows.

It prints the figures and their ratios (against DCP, and against the training step); it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def build(params: int) -> nn.Module:
    layers = 8
    d = max(16, int(round(math.sqrt(params / layers) / 16)) * 16)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(layers)])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel

    import weightslab as wl

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    torch.manual_seed(0)
    if args.fsdp:  # sharded: weightslab writes the shards with DCP from every rank
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = build(args.params)
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        d = model[0][0].in_features
    else:
        model = DistributedDataParallel(build(args.params))
        d = model.module[0][0].in_features
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        model(torch.randn(8, d)).pow(2).mean().backward()
        opt.step()

    step()
    figures: dict[str, list[float]] = {k: [] for k in ("wl_block", "wl_durable", "dcp_save", "dcp_async_block",
                                                       "dcp_async_done", "wl_resume", "dcp_load", "wl_boundary",
                                                       "train_step")}
    every = 1_000_000  # saves are taken at multiples of this step; the boundaries in between save nothing
    system = wl.get_checkpoint_system(root_log_dir=f"{tmp}/wl", checkpoint_frequency=every, save_on_close=False,
                                      preempt_signals=())
    wl.register_model(model)
    wl.register_optimizer(opt)
    for i in range(args.repeats + 1):
        step()
        dist.barrier()
        block = timed(lambda: wl.checkpoint_on_step((i + 1) * every))
        durable = block + timed(system.wait)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        save = timed(lambda: dcp.save(state, checkpoint_id=f"{tmp}/dcp-{i}"))
        dist.barrier()
        future = []
        async_block = timed(lambda: future.append(dcp.async_save(state, checkpoint_id=f"{tmp}/dcp-async-{i}")))
        result = future[0]
        wait = getattr(result, "upload_completion", result)
        async_done = async_block + timed(wait.result)
        dist.barrier()
        if i:  # the first round is a warm-up
            for key, value in (("wl_block", block), ("wl_durable", durable), ("dcp_save", save),
                               ("dcp_async_block", async_block), ("dcp_async_done", async_done)):
                figures[key].append(value)
    for i in range(args.repeats + 1):
        dist.barrier()
        resume = timed(lambda: system.resume(f"{system.experiment_hash}@{(args.repeats + 1) * every}"))
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}

        def load() -> None:
            dcp.load(state, checkpoint_id=f"{tmp}/dcp-{args.repeats}")
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        dcp_load = timed(load)
        if i:
            figures["wl_resume"].append(resume)
            figures["dcp_load"].append(dcp_load)
    for k in range(1, 201):
        dist.barrier()
        figures["train_step"].append(timed(step))
        dist.barrier()  # (so that the figure is the boundary's own cost, not a wait for a slower rank)
        figures["wl_boundary"].append(timed(lambda: wl.checkpoint_on_step((args.repeats + 1) * every + k)))
    system.close()
    medians = torch.tensor([statistics.median(v) for v in figures.values()], dtype=torch.float64)
    gathered = [torch.zeros_like(medians) for _ in range(world)]
    dist.all_gather(gathered, medians)
    if rank == 0:
        nbytes = sum(p.numel() * 4 * 3 for p in model.parameters()) // (world if args.fsdp else 1)
        print(f"{world} ranks (gloo, CPU), {'FSDP2' if args.fsdp else 'DDP'}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
              f"Adam: {nbytes / 1e6:.0f} MB of state per rank; median of {args.repeats} after a warm-up")
        print(f"{'what':<44}{'rank 0 s':>10}{'max s':>10}{'ratio':>10}")
        keys = list(figures)
        row = {k: (float(gathered[0][j]), max(float(g[j]) for g in gathered)) for j, k in enumerate(keys)}
        against = {"wl_block": "dcp_async_block", "wl_durable": "dcp_save", "wl_resume": "dcp_load",
                   "wl_boundary": "train_step"}
        labels = {"wl_block": "weightslab: loop blocked per save", "wl_durable": "weightslab: save -> durable",
                  "dcp_save": "DCP save (blocking)", "dcp_async_block": "DCP async_save: loop blocked",
                  "dcp_async_done": "DCP async_save: -> durable", "wl_resume": "weightslab resume (verified)",
                  "dcp_load": "DCP load + set_state_dict", "wl_boundary": "weightslab: boundary without a save",
                  "train_step": "DDP training step (8 samples)"}
        for key in keys:
            ratio = f"{row[key][0] / row[against[key]][0]:.2f}x" if key in against else ""
            print(f"{labels[key]:<44}{row[key][0]:>10.4g}{row[key][1]:>10.4g}{ratio:>10}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=5_000_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-bench-ddp-") as tmp:
        tmp = str(Path(tmp).resolve())  # the file:// rendezvous needs an absolute path
        print(f"torch {torch.__version__}; files under {tmp}")
        mp.spawn(worker, args=(args.ranks, args, tmp), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
