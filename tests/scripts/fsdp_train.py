"""A 2-rank FSDP2 (``fully_shard``) training run on CPU (gloo) with weightslab, for
tests/test_distributed.py: the parameters and Adam's moments are DTensors, sharded over the ranks,
so weightslab saves them with torch.distributed.checkpoint.

    python fsdp_train.py ROOT OUT RANK WORLD INIT_FILE [--steps N] [--resume] [--retention K]

Each rank trains on its own made-up data with its own input noise, checkpoints every 2 steps and
prints ``step N`` after each. At the end it writes OUT/rank<R>.pt (torch.save; read back by the test
with weights_only=True): the full parameters and Adam state, gathered, and the next random draws.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import weightslab as wl

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("rank", type=int)
parser.add_argument("world", type=int)
parser.add_argument("init_file")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--retention", type=int, default=None, help="keep the last K checkpoints")
args = parser.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=args.world)
mesh = init_device_mesh("cpu", (args.world,))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
fully_shard(model, mesh=mesh)
opt = torch.optim.Adam(model.parameters(), lr=0.01)
torch.manual_seed(100 + args.rank)  # from here on, each rank draws its own numbers
data = torch.Generator().manual_seed(7 + args.rank)
batches = [(torch.randn(8, 4, generator=data), torch.randn(8, 3, generator=data)) for _ in range(4)]

system = wl.get_checkpoint_system(root_log_dir=args.root, checkpoint_frequency=2, save_on_close=False,
                                  preempt_signals=(), retention={"keep_last": args.retention} if args.retention else None)
wl.register_model(model)
wl.register_optimizer(opt)
start = system.resume() if args.resume else 0
print(f"rank {args.rank} starts at {start}", flush=True)
for step in range(start + 1, args.steps + 1):
    x, y = batches[step % len(batches)]
    opt.zero_grad()
    nn.functional.mse_loss(model(x + 0.1 * torch.randn_like(x)), y).backward()
    opt.step()
    wl.checkpoint_on_step(step)
    print(f"step {step}", flush=True)
system.close()


def full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


state = {f"param.{k}": full(v) for k, v in model.state_dict().items()}
for index, entry in opt.state_dict()["state"].items():
    state.update({f"adam.{index}.{k}": full(v) for k, v in entry.items()})
state["next_torch"] = torch.rand(3)
state["sharded"] = torch.tensor([isinstance(p, DTensor) for p in model.parameters()])
os.makedirs(args.out, exist_ok=True)
torch.save(state, f"{args.out}/rank{args.rank}.pt")
dist.barrier()
dist.destroy_process_group()
