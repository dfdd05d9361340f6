"""A 2-rank DDP training run on CPU (gloo) with weightslab, for tests/test_distributed.py.

    python ddp_train.py ROOT OUT RANK WORLD INIT_FILE [--steps N] [--resume]

Each rank trains a small DDP model on its shard of made-up data (a ResumableSampler), checkpoints
every 2 steps, and writes its final parameters to OUT/rank<R>.pt (torch.save; read back by the
test with weights_only=True).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import weightslab as wl
from weightslab.data import ResumableSampler

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("rank", type=int)
parser.add_argument("world", type=int)
parser.add_argument("init_file")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--resume", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=args.world)
torch.manual_seed(0)
system = wl.get_checkpoint_system(root_log_dir=args.root, checkpoint_frequency=2, save_on_close=False,
                                  preempt_signals=())
model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
x, y = torch.randn(64, 4), torch.randn(64, 1)
dataset = torch.utils.data.TensorDataset(x, y)
sampler = ResumableSampler(dataset, seed=1, rank=args.rank, world_size=args.world)
loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
wl.register_model(model)
wl.register_optimizer(opt)
wl.register_dataloader(loader)
start = system.resume() if args.resume else 0
print(f"rank {args.rank} starts at {start}", flush=True)
step = start
while step < args.steps:
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
        step += 1
        wl.checkpoint_on_step(step)
        if step == args.steps:
            break
    else:
        sampler.set_epoch(sampler.epoch + 1)
system.close()
os.makedirs(args.out, exist_ok=True)
torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, f"{args.out}/rank{args.rank}.pt")
dist.barrier()
dist.destroy_process_group()
