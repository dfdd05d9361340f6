"""A small Lightning run for exactness tests: trains to --max-steps, writes its final state.

Dropout, random draws from NumPy and Python in the training step, a shuffled DataLoader with two
workers (epochs of 8 batches, so kills land mid-epoch), AdamW and a per-step scheduler: a resume
that misses any generator, the loader's position, the optimizer, the scheduler or the loops'
counters changes the output. The final state (parameters, optimizer state, scheduler, the batch the
loop would take next, the next random draws) is written in a canonical byte form (<out>.safetensors,
<out>.json) so that two runs compare byte for byte; the loss and the samples of each step this
process ran go to <out>.steps.json.

--ckpt-path REF: trainer.fit(ckpt_path=REF): a weightslab ref, or a Lightning .ckpt.
--auto: WeightslabCallback(resume="auto").
--pause-at N: once step N is done (its checkpoint durable), print READY and block on stdin (the
              test kills the process there).
--accumulate K: accumulate_grad_batches=K (a step is an optimizer step: K batches).
--validate: validation every 4 batches (twice an epoch) on a loader without a generator of its own,
            which draws from the global one each time it starts.
--model-checkpoint: Lightning's own ModelCheckpoint too, into ROOT/lightning (files step=<N>.ckpt):
                    every --frequency steps, or with --validate after each validation.
--no-weightslab: without WeightslabCallback (Lightning's own checkpoints alone, with --model-checkpoint).
"""

import argparse
import json
import logging
import random
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import lightning.pytorch as pl

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("--max-steps", type=int, default=20)
parser.add_argument("--frequency", type=int, default=4)
parser.add_argument("--pause-at", type=int, default=None)
parser.add_argument("--ckpt-path", default=None)
parser.add_argument("--auto", action="store_true")
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--validate", action="store_true")
parser.add_argument("--model-checkpoint", action="store_true")
parser.add_argument("--no-weightslab", action="store_true")
args = parser.parse_args()

warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging intervals
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
random.seed(1)
np.random.seed(2)
torch.manual_seed(3)


class Net(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, 4))
        self.steps = {}  # "<global step>.<batch index>" -> loss and the samples of the batch, for this process's steps

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        noise = 1.0 + 0.01 * float(np.random.normal()) + 0.01 * random.random()
        loss = F.cross_entropy(self(x), y) * noise
        self.log("loss", loss)
        self.steps[f"{self.global_step}.{batch_idx}"] = {"loss": round(loss.item(), 7), "samples": index.tolist()}
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, index = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_end(self):
        # The batch the loop would take next (the LightningModule's hook runs after every callback's:
        # after weightslab's final checkpoint, of which this batch is not part).
        batch, _, _ = next(self.trainer.fit_loop._data_fetcher)
        self.next_batch = batch[0]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Pause(pl.Callback):
    """Stops after step --pause-at for the test to kill the process there."""

    def __init__(self, weightslab_callback=None):
        self.weightslab_callback = weightslab_callback
        self.paused = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The first batch after optimizer step N: every callback is done with step N (ModelCheckpoint too).
        if trainer.global_step == args.pause_at and not self.paused:
            self.paused = True
            if self.weightslab_callback is not None:
                self.weightslab_callback.system.wait()  # the checkpoint of this step is durable
            print("READY", flush=True)
            sys.stdin.readline()


g = torch.Generator().manual_seed(7)
dataset = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g),
                                         torch.arange(64))
loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=args.workers,
                                     persistent_workers=False)
model = Net()

callbacks, weightslab = [], None
if not args.no_weightslab:
    from weightslab.integrations.lightning import WeightslabCallback

    weightslab = WeightslabCallback(root_log_dir=args.root, checkpoint_frequency=args.frequency,
                                    resume="auto" if args.auto else None)
    callbacks.append(weightslab)
callbacks.append(Pause(weightslab))
if args.model_checkpoint:
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = {} if args.validate else {"every_n_train_steps": args.frequency}
    callbacks.append(ModelCheckpoint(dirpath=f"{args.root}/lightning", save_top_k=-1, filename="{step}", **every))

trainer = pl.Trainer(max_steps=args.max_steps, accumulate_grad_batches=args.accumulate, callbacks=callbacks,
                     accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=args.model_checkpoint, num_sanity_val_steps=0,
                     deterministic=True, **({"val_check_interval": 4} if args.validate else {"limit_val_batches": 0}))
validation = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=args.workers) if args.validate else None
trainer.fit(model, loader, validation, ckpt_path=args.ckpt_path)
start = min((int(key.split(".")[0]) for key in model.steps), default=None)
print("START", start, flush=True)

optimizer = trainer.optimizers[0]
tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
for pid, s in optimizer.state_dict()["state"].items():
    for k, v in s.items():
        tensors[f"optim/{pid}/{k}"] = v.detach().reshape(-1).contiguous()
tensors["draw/torch"] = torch.rand(8)
tensors["draw/next_batch"] = model.next_batch
save_file(tensors, args.out + ".safetensors")
with open(args.out + ".json", "w") as f:
    json.dump({
        "param_groups": optimizer.state_dict()["param_groups"],
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "numpy": np.random.rand(4).tolist(),
        "python": [random.random() for _ in range(4)],
    }, f, sort_keys=True)
with open(args.out + ".steps.json", "w") as f:
    json.dump(model.steps, f, sort_keys=True)
print("DONE", flush=True)
