"""A loop written with Accelerate, registered with weightslab.integrations.accelerate: SIGKILLed mid-epoch and
resumed in a fresh process, it ends bit for bit where an uninterrupted run does.

The loop (written to a file and run in subprocesses with MKL's strict mode and one thread) has a
model with dropout, AdamW and a linear schedule, a shuffled loader with 2 workers prepared by
Accelerate (its default RandomSampler), gradient accumulation over 2 micro-batches with 11 batches
per epoch (the last step of an epoch takes one), and an EMA given to
``accelerator.register_for_checkpointing``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .support import assert_root_consistent, assert_same, child_env, kill_when, run_python

pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

LOOP = r'''
import argparse, hashlib, json, random, sys
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

import weightslab as wl
from weightslab.integrations import accelerate as wl_accelerate

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=15)
parser.add_argument("--pause-at", type=int, default=None)
args = parser.parse_args()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
random.seed(1)
np.random.seed(2)
torch.manual_seed(3)


class EMA:
    """An exponential moving average of the weights: state an accelerator checkpoints if told to."""

    def __init__(self, model):
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(0.9).add_(v.detach(), alpha=0.1)

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, state):
        for k, v in state.items():
            self.shadow[k].copy_(v)


model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / 40))
g = torch.Generator().manual_seed(7)
dataset = torch.utils.data.TensorDataset(torch.randn(44, 8, generator=g), torch.randint(0, 4, (44,), generator=g))
loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2)

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
ema = EMA(accelerator.unwrap_model(model))
accelerator.register_for_checkpointing(ema)
system = wl.get_checkpoint_system(root_log_dir=args.root, checkpoint_frequency=3)
model, optimizer, loader, scheduler = wl_accelerate.register(accelerator, model, optimizer, loader, scheduler)
step = system.resume()
print("START", step, loader.epoch, flush=True)

batches = {}
micro = []
done = step >= args.steps
for epoch in range(loader.epoch, 100):
    if done:
        break
    for x, y in loader:
        micro.append(hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16])
        with accelerator.accumulate(model):
            noise = 1.0 + 0.01 * float(np.random.normal()) + 0.01 * random.random()
            loss = F.cross_entropy(model(x), y) * noise
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            batches[step] = micro
            micro = []
            ema.update(accelerator.unwrap_model(model))
            wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
            if step == args.pause_at:
                system.wait()
                print("READY", flush=True)
                sys.stdin.readline()  # the test kills the process while it waits here
            if step >= args.steps:
                done = True
                break
system.close()

inner = optimizer.optimizer
tensors = {f"model/{k}": v.detach().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
tensors.update({f"ema/{k}": v.contiguous() for k, v in ema.shadow.items()})
for pid, s in inner.state_dict()["state"].items():
    for k, v in s.items():
        tensors[f"optim/{pid}/{k}"] = v.detach().reshape(-1).contiguous()
tensors["draw/torch"] = torch.rand(8)
tensors["draw/next_batch"] = next(iter(loader))[0]  # the batch the next step would start with
save_file(tensors, args.out + ".safetensors")
with open(args.out + ".json", "w") as f:
    json.dump({"param_groups": inner.state_dict()["param_groups"], "scheduler": scheduler.scheduler.state_dict(),
               "accelerator_step": accelerator.step, "numpy": np.random.rand(4).tolist(),
               "python": [random.random() for _ in range(4)]}, f, sort_keys=True)
with open(args.out + ".batches.json", "w") as f:
    json.dump(batches, f, sort_keys=True)
print("DONE", flush=True)
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("accelerate") / "loop.py"
    path.write_text(LOOP)
    return path


def train(script: Path, root: Path, out: Path, *extra: str) -> str:
    return run_python(script=script, args=[str(root), str(out), *extra], timeout=300).stdout


def test_killed_mid_epoch_and_resumed_matches_an_uninterrupted_run(tmp_path: Path, script: Path) -> None:
    straight = tmp_path / "straight"
    assert "START 0 0" in train(script, tmp_path / "straight-root", straight)

    root, out = tmp_path / "root", tmp_path / "final"
    # 11 batches per epoch, 2 per optimizer step: epoch 0 is steps 1-6 (the 6th takes one batch);
    # step 9 is 3 steps (6 batches) into epoch 1.
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out), "--pause-at", "9"], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, "READY")
    assert assert_root_consistent(root) == [3, 6, 9]

    stdout = train(script, root, out)
    assert "START 9 1" in stdout  # step 9, in epoch 1
    assert_same(straight, out)  # parameters, EMA, optimizer, scheduler, next batch, next random draws
    mine = json.loads(Path(str(out) + ".batches.json").read_text())
    theirs = json.loads(Path(str(straight) + ".batches.json").read_text())
    assert sorted(map(int, mine)) == list(range(10, 16))
    assert mine == {k: v for k, v in theirs.items() if int(k) > 9}  # every step trained on the same batches


def test_register_tells_the_objects_apart_and_import_names_the_extra(tmp_path: Path) -> None:
    stdout = run_python(f"""
import sys
import weightslab as wl
print("LOADED:", "accelerate" in sys.modules)
import torch
from accelerate import Accelerator
from weightslab.errors import RegistrationError
from weightslab.integrations import accelerate as wl_accelerate
wl.get_checkpoint_system(root_log_dir={str(tmp_path / 'root')!r})
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(2, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)  # (it has an .optimizer too)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
prepared = accelerator.prepare(model, optimizer, loader, scheduler)
back = wl_accelerate.register(accelerator, *prepared, torch.nn.Linear(2, 2), optimizer, scheduler)
print("REGISTERED:", wl.list_registered())
print("SAME:", [a is b for a, b in zip(back, prepared)], type(back[2]).__name__)
try:
    wl_accelerate.register(accelerator, "not a prepared object")
except RegistrationError as exc:
    print("REFUSED:", exc)
del sys.modules["weightslab.integrations.accelerate"]
sys.modules["accelerate"] = None  # as if it were not installed
try:
    import weightslab.integrations.accelerate
except ImportError as exc:
    print("ERROR:", exc)
""").stdout
    assert "LOADED: False" in stdout
    assert ("REGISTERED: {'model': ['model', 'model_1'], 'optimizer': ['optimizer', 'optimizer_1'], "
            "'scheduler': ['scheduler', 'scheduler_1'], 'dataloader': ['dataloader'], 'state': ['accelerator']}") in stdout
    assert "SAME: [True, True, False, True] ResumableLoader" in stdout
    assert "REFUSED: wl_accelerate.register(accelerator, ...): cannot tell what a str is" in stdout
    assert "ERROR: weightslab.integrations.accelerate needs Hugging Face Accelerate" in stdout
    assert "pip install 'weightslab[accelerate]'" in stdout
