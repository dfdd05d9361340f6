"""A small training run for exactness tests: resumes, trains to --steps, writes its final state.

Draws from every random generator (dropout, torch, NumPy, Python), uses Adam, a StepLR scheduler, a
GradScaler and a custom registered state, so a resume that misses any of them changes the output.
The final state (parameters, optimizer, scheduler, scaler, custom state, next random draws) is
written in a canonical byte form so two runs can be compared byte for byte.

--pause-at N: after step N, print READY and block on stdin (the test kills or signals the process there).
--implicit: never call checkpoint_on_step; rely on the optimizer hook.
--every-seconds S: also save every S seconds (with --frequency 0: only on time).
--user-handler: install a SIGTERM handler of the user's before weightslab; it prints and exits 3.
--preempt-timeout S: seconds to wait for a step boundary after a preemption signal.
--loader: batches come from a registered DataLoader(shuffle=True, num_workers=--workers), epochs
          of 8 batches, so kills land mid-epoch; --two-models adds a second model and optimizer.
--ballast MB: a registered buffer of that size changed at every step, so every save writes it and
          takes long enough for kills to land in the middle of writes.
--page-cache: write packs through the page cache (direct_io=False): slower writes, so that random
          kills land in the middle of them more often.
--slow-copy-at N: the background copy of the first layer's weight at the save of step N takes
          minutes: the script prints COPYING once checkpoint_on_step(N) returned (the copy is in
          flight) and blocks on stdin (the test kills it there).
"""

import argparse
import json
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import weightslab as wl

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--frequency", type=int, default=5)
parser.add_argument("--pause-at", type=int, default=None)
parser.add_argument("--implicit", action="store_true")
parser.add_argument("--every-seconds", type=float, default=None)
parser.add_argument("--user-handler", action="store_true")
parser.add_argument("--preempt-timeout", type=float, default=60.0)
parser.add_argument("--loader", action="store_true")
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--two-models", action="store_true")
parser.add_argument("--ballast", type=float, default=0.0)
parser.add_argument("--slow-copy-at", type=int, default=None)
parser.add_argument("--page-cache", action="store_true")
args = parser.parse_args()

if args.user_handler:
    def on_term(number, frame):
        print("USER HANDLER", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, on_term)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
random.seed(1)
np.random.seed(2)
torch.manual_seed(3)

model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.Tanh(),
                      nn.Dropout(0.1), nn.Linear(32, 4))
SLOW = {"copy": False}


class SlowToCopy(nn.Parameter):
    """The same parameter, whose copy by weightslab's copier thread blocks while SLOW["copy"]."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if SLOW["copy"] and threading.current_thread().name == "weightslab-copier":
            time.sleep(600)
        return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs or {})


if args.slow_copy_at is not None:
    model[0].weight = SlowToCopy(model[0].weight.detach().clone())
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
counter = {"seen": 0, "history": []}

system = wl.get_checkpoint_system(root_log_dir=args.root, checkpoint_frequency=args.frequency or None,
                                  every_seconds=args.every_seconds, preempt_timeout=args.preempt_timeout,
                                  direct_io=not args.page_cache)
wl.register_model("model", model)
wl.register_optimizer("optimizer", optimizer)
wl.register_scheduler("scheduler", scheduler)
wl.register_scaler("scaler", scaler)
wl.register_hyperparams("config", {"lr": 1e-2, "hidden": 32, "dropout": [0.2, 0.1]})
wl.register_state("counter", lambda: counter, lambda s: counter.update(s))
if args.two_models:
    critic = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.05, momentum=0.9)
    wl.register_model("critic", critic)
    wl.register_optimizer("critic_opt", critic_opt)
if args.ballast:
    ballast = nn.Module()
    ballast.register_buffer("weight", torch.zeros(int(args.ballast * 2**20 / 4)))
    wl.register_model("ballast", ballast)
if args.loader:
    g = torch.Generator().manual_seed(7)
    dataset = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=args.workers)
    wl.register_dataloader("train", loader)


def batches():
    """Endless batches: from the loader, epoch after epoch, or drawn from the global generator."""
    while True:
        if args.loader:
            yield from loader
        else:
            yield torch.randn(16, 8), torch.randint(0, 4, (16,))

start = system.resume()
print("START", start, flush=True)

data_iter = batches()
for step in range(start + 1, args.steps + 1):
    x, y = next(data_iter)
    noise = 1.0 + 0.01 * float(np.random.normal()) + 0.01 * random.random()
    loss = F.cross_entropy(model(x), y) * noise
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if args.two_models:
        critic_loss = (critic(model(x).detach()) - y.float().unsqueeze(1)).pow(2).mean()
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()
    if args.ballast:
        ballast.weight.add_(1.0)
    counter["seen"] += 16
    counter["history"].append(round(loss.item(), 6))
    if step == args.slow_copy_at:
        system.wait()  # the checkpoints before it are durable, whatever the load on the machine
    SLOW["copy"] = step == args.slow_copy_at
    if not args.implicit:
        wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
    print("STEP", step, flush=True)
    if step == args.slow_copy_at:
        print("COPYING", flush=True)
        sys.stdin.readline()  # the test kills the process while the copy is in flight
    if step == args.pause_at:
        system.wait()
        print("READY", flush=True)
        sys.stdin.readline()  # the test kills the process while it waits here

system.close()

tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
for pid, s in optimizer.state_dict()["state"].items():
    for k, v in s.items():
        tensors[f"optim/{pid}/{k}"] = v.detach().reshape(-1).contiguous()
tensors["draw/torch"] = torch.rand(8)
if args.two_models:
    tensors.update({f"critic/{k}": v.detach().contiguous() for k, v in critic.state_dict().items()})
    for pid, s in critic_opt.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"critic_optim/{pid}/{k}"] = v.detach().reshape(-1).contiguous()
if args.loader:
    tensors["draw/next_batch"] = next(data_iter)[0]  # the loader's next batch is the same too
save_file(tensors, args.out + ".safetensors")
with open(args.out + ".json", "w") as f:
    json.dump({
        "param_groups": optimizer.state_dict()["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "counter": counter,
        "numpy": np.random.rand(4).tolist(),
        "python": [random.random() for _ in range(4)],
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
    }, f, sort_keys=True)
print("DONE", start, flush=True)
