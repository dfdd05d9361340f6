"""A DDP training run on CPU (gloo) with weightslab and state that differs per rank, for
tests/test_distributed.py.

    python ddp_train.py ROOT OUT RANK WORLD INIT_FILE [--steps N] [--resume] [--rank-state MODE]
                        [--sleep S] [--same-seed] [--no-stats] [--config YAML]

Each rank trains a small DDP model with dropout on its shard of made-up data (a ResumableSampler),
adds its own input noise (every rank seeds its generators with its rank, so dropout masks and noise
differ per rank), keeps its own running statistics as custom state, and checkpoints every 2 steps.
It prints ``step N lr LR`` after each step. At the end it writes OUT/rank<R>.pt (torch.save; read back by
the test with weights_only=True): the parameters, the custom state and the next random draws.
"""

import argparse
import os
import random
import time

import numpy as np
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
parser.add_argument("--rank-state", default=None)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step, so a test can signal mid-run")
parser.add_argument("--same-seed", action="store_true", help="seed every rank alike (equal random generators)")
parser.add_argument("--no-stats", action="store_true", help="do not register the per-rank statistics")
parser.add_argument("--config", help="a YAML file whose optimizer.lr is watched and bound to the optimizer")
args = parser.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=args.world)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))  # same init on every rank
x, y = torch.randn(64, 4), torch.randn(64, 1)
seed = 0 if args.same_seed else 100 + args.rank  # from here on each rank draws its own numbers
torch.manual_seed(seed)
random.seed(seed)
np.random.seed(seed)

system = wl.get_checkpoint_system(root_log_dir=args.root, checkpoint_frequency=2, save_on_close=False,
                                  preempt_signals=("SIGTERM",))
model = DistributedDataParallel(net)
opt = torch.optim.Adam(model.parameters(), lr=0.01)
dataset = torch.utils.data.TensorDataset(x, y)
sampler = ResumableSampler(dataset, seed=1, rank=args.rank, world_size=args.world)
loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
stats = {"loss_sum": 0.0, "noise": []}
wl.register_model(model)
wl.register_optimizer(opt)
wl.register_dataloader(loader)
if args.config:
    wl.register_hyperparams("config", args.config)
if not args.no_stats:
    wl.register_state("stats", lambda: {"loss_sum": stats["loss_sum"], "noise": list(stats["noise"])},
                      lambda value: stats.update(loss_sum=value["loss_sum"], noise=list(value["noise"])))
start = system.resume(rank_state=args.rank_state) if args.resume else 0
print(f"rank {args.rank} starts at {start}", flush=True)
step = start
while step < args.steps:
    for xb, yb in loader:
        noise = 0.1 * torch.randn_like(xb) + random.random() * 0.01 + float(np.random.rand()) * 0.01
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(xb + noise), yb)
        loss.backward()
        opt.step()
        stats["loss_sum"] += loss.item()
        stats["noise"].append(round(float(noise.sum()), 6))
        step += 1
        wl.checkpoint_on_step(step)
        print(f"step {step} lr {opt.param_groups[0]['lr']}", flush=True)
        time.sleep(args.sleep)
        if step == args.steps:
            break
    else:
        sampler.set_epoch(sampler.epoch + 1)
system.close()
os.makedirs(args.out, exist_ok=True)
state = {f"param.{k}": v.detach().clone() for k, v in model.module.state_dict().items()}
state["loss_sum"] = torch.tensor(stats["loss_sum"], dtype=torch.float64)
state["noise"] = torch.tensor(stats["noise"], dtype=torch.float64)
state["next_torch"] = torch.rand(3)
state["next_python"] = torch.tensor([random.random()], dtype=torch.float64)
state["next_numpy"] = torch.from_numpy(np.random.rand(2))
torch.save(state, f"{args.out}/rank{args.rank}.pt")
dist.barrier()
dist.destroy_process_group()
