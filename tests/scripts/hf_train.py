"""A small Hugging Face Trainer run for exactness tests: resumes, trains to --steps, writes its final state.

A BERT classifier built from a config in code (dropout in every layer), a map-style dataset of
tensors made in code, a shuffled train loader with 2 worker processes, AdamW and a linear schedule
with warmup, an evaluation every --eval-steps (its loader's workers draw their seed from the global
generator), and the Trainer's own checkpointing off (``save_strategy="no"``): weightslab's
WeightslabTrainerCallback saves every --frequency steps and the run resumes from weightslab's
``latest`` through ``resume_from``.

The final state is written in a canonical byte form (as tests/scripts/exact_train.py does), so two
runs can be compared byte for byte: parameters, optimizer state, scheduler, the Trainer's state
(its log history, without timings), the digest of the batch every step trained on, and the next
random draws of torch, NumPy and Python.

--pause-at N: once the checkpoint of step N is durable (at the next step's start), print READY and
              block on stdin (the test kills the process there).
--native: no weightslab; the Trainer's own checkpoints (save_steps=--frequency, in --output-dir) and
          ``resume_from_checkpoint=True`` when one exists (benchmarks/hf_resume.py measures it).
"""

import argparse
import hashlib
import json
import os
import random
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("out")
parser.add_argument("--output-dir", default=None)
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--frequency", type=int, default=4)
parser.add_argument("--eval-steps", type=int, default=6)
parser.add_argument("--pause-at", type=int, default=None)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--native", action="store_true")
args = parser.parse_args()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
hf_logging.set_verbosity_error()

SAMPLES, LENGTH, VOCAB = 40, 8, 50


class Tokens(torch.utils.data.Dataset):
    """Token sequences and labels, made in code (no download)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}


torch.manual_seed(0)
config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=LENGTH, num_labels=3,
                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
model = BertForSequenceClassification(config)

output_dir = args.output_dir or os.path.join(args.root, "trainer")
training_args = TrainingArguments(
    output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
    learning_rate=5e-3, weight_decay=0.01, optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=3,
    dataloader_num_workers=args.workers, eval_strategy="steps", eval_steps=args.eval_steps,
    metric_for_best_model="eval_loss", logging_steps=2, seed=7, use_cpu=True, disable_tqdm=True, report_to=[],
    save_strategy="steps" if args.native else "no", save_steps=args.frequency,
)

batches: dict[str, str] = {}  # global step -> digest of the input ids it trained on
current = {"step": 0}


class Recorder(TrainerCallback):
    def on_step_begin(self, targs, state, control, **kwargs):
        current["step"] = state.global_step + 1


def record(module, a, kwargs):
    if module.training:
        batches[str(current["step"])] = hashlib.sha256(kwargs["input_ids"].numpy().tobytes()).hexdigest()[:16]


model.register_forward_pre_hook(record, with_kwargs=True)


class Pause(TrainerCallback):
    """At the start of step pause_at + 1: the checkpoint of pause_at is taken (weightslab's callback,
    before this one, marked its boundary; the Trainer saved its own in _maybe_log_save_evaluate)."""

    def on_step_begin(self, targs, state, control, **kwargs):
        if state.global_step == args.pause_at:
            if not args.native:
                import weightslab as wl
                wl.get_checkpoint_system().wait()
            print("READY", flush=True)
            sys.stdin.readline()  # the test kills the process while it waits here


callbacks = [Recorder()]
if not args.native:
    from weightslab.integrations.transformers import WeightslabTrainerCallback, resume_from
    callbacks.append(WeightslabTrainerCallback(root_log_dir=args.root, checkpoint_frequency=args.frequency))
callbacks.append(Pause())

trainer = Trainer(model=model, args=training_args, train_dataset=Tokens(SAMPLES, 1), eval_dataset=Tokens(8, 2),
                  callbacks=callbacks)
if args.native:
    has_checkpoint = os.path.isdir(output_dir) and any(n.startswith("checkpoint-") for n in os.listdir(output_dir))
    resume = True if has_checkpoint else None
else:
    resume = resume_from(trainer, "latest")
trainer.train(resume_from_checkpoint=resume)
print("START_STEP", min((int(s) for s in batches), default=args.steps + 1) - 1, flush=True)

optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
tensors = {f"model/{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
for pid, s in optimizer.state_dict()["state"].items():
    for k, v in s.items():
        tensors[f"optim/{pid}/{k}"] = v.detach().reshape(-1).contiguous()
tensors["draw/torch"] = torch.rand(8)
save_file(tensors, args.out + ".safetensors")
timing = ("runtime", "per_second", "train_loss", "total_flos")
history = [{k: v for k, v in entry.items() if not any(t in k for t in timing)} for entry in trainer.state.log_history]
with open(args.out + ".json", "w") as f:
    json.dump({
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "best_metric": trainer.state.best_metric,
        "param_groups": optimizer.state_dict()["param_groups"],
        "scheduler": trainer.lr_scheduler.state_dict(),
        "log_history": history,
        "numpy": np.random.rand(4).tolist(),
        "python": [random.random() for _ in range(4)],
    }, f, sort_keys=True)
with open(args.out + ".batches.json", "w") as f:
    json.dump(batches, f, sort_keys=True)
print("DONE", flush=True)
