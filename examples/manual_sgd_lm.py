"""A recurrent language model trained by hand, the way many real scripts are written, with weightslab.

    python examples/manual_sgd_lm.py [--epochs 6] [--kill-at STEP] [--root DIR]

The loop is not the four-line example: no ``torch.optim`` (parameters are updated through
``p.data``), no DataLoader (it walks batch indices over one long token tensor), a learning rate
that lives in a local variable and is annealed when validation stops improving, an LSTM hidden
state carried from one batch to the next, an EMA copy of the model made with ``copy.deepcopy``
and the best model saved whole with ``torch.save(model, ...)``. What weightslab needs from such a
script is marked ``# weightslab:``; guides/getting-started.md walks through it.

``--kill-at STEP`` kills the process with SIGKILL after that step, as a crash would (once the
checkpoints taken so far are on disk, so that you know where it resumes). Run it again without
the flag: it resumes from the newest checkpoint and ends with the same bytes as a
run that was never killed (it prints a digest of its final state to check).

The corpus is made in code (a random Markov chain over a small vocabulary): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn

import weightslab as wl

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--root", default=os.environ.get("WEIGHTSLAB_ROOT", "experiments/manual-sgd-lm"))
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--vocab", type=int, default=50)
parser.add_argument("--hidden", type=int, default=32)
parser.add_argument("--bptt", type=int, default=8)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=20.0)
parser.add_argument("--clip", type=float, default=0.25)
parser.add_argument("--ema", type=float, default=0.9)
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--log-interval", type=int, default=20)
parser.add_argument("--save", default="best-model.pt")
parser.add_argument("--kill-at", type=int, default=0)
parser.add_argument("--checkpoint-every", type=int, default=10)
args = parser.parse_args()
torch.manual_seed(args.seed)


# --- data: one long token stream, cut into columns, walked by batch index ---------------------------

def make_corpus(n_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    transitions = torch.rand(vocab, vocab, generator=g).pow(8)  # a few likely successors per token
    tokens = [0]
    for _ in range(n_tokens - 1):
        tokens.append(int(torch.multinomial(transitions[tokens[-1]], 1, generator=g)))
    return torch.tensor(tokens)


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    n = data.size(0) // bsz
    return data[:n * bsz].view(bsz, n).t().contiguous()  # (length, batch)


def get_batch(source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = min(args.bptt, len(source) - 1 - i)
    return source[i:i + length], source[i + 1:i + 1 + length].reshape(-1)


corpus = make_corpus(900, args.vocab, seed=0)
train_data = batchify(corpus[:600], args.batch_size)
val_data = batchify(corpus[600:], 4)
batches_per_epoch = (len(train_data) - 1) // args.bptt


# --- the model --------------------------------------------------------------------------------------

class RNNModel(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, bsz, args.hidden), torch.zeros(1, bsz, args.hidden)


def evaluate(net: nn.Module) -> float:
    net.eval()
    total, hidden = 0.0, net.init_hidden(4)
    with torch.no_grad():
        for i in range(0, len(val_data) - 1, args.bptt):
            data, targets = get_batch(val_data, i)
            output, hidden = net(data, hidden)
            total += len(data) * F.cross_entropy(output, targets).item()
    net.train()
    return total / (len(val_data) - 1)


model = RNNModel(args.vocab, args.hidden)

# weightslab: one system; keys of the command line that say how this process runs, not what it
# trains, are excluded from the experiment, and a resume leaves them as this process was started
# with (log_interval is excluded by default).
system = wl.get_checkpoint_system(root_log_dir=args.root, checkpoint_frequency=args.checkpoint_every,
                                  exclude_keys=["root", "save", "kill_at", "epochs", "checkpoint_every"])
wl.register_hyperparams("config", vars(args))
wl.register_model("lm", model)
ema = copy.deepcopy(model)  # an EMA copy of a registered model: a plain, unregistered module...
wl.register_model("ema", ema)  # ...until it is registered too, so that it is resumed as well

# weightslab: what the loop keeps in local variables and needs after a resume.
loop = {"lr": args.lr, "best_val_loss": math.inf}
hidden = model.init_hidden(args.batch_size)


def get_loop() -> dict:
    return {"lr": loop["lr"], "best_val_loss": loop["best_val_loss"], "hidden": [h.detach() for h in hidden]}


def set_loop(saved: dict) -> None:
    global hidden
    loop.update(lr=saved["lr"], best_val_loss=saved["best_val_loss"])
    hidden = tuple(saved["hidden"])


wl.register_state("loop", get_loop, set_loop)

# weightslab: the step is the number of updates done; the epoch and the batch index follow from it.
start = system.resume()
if start:
    print(f"RESUMED {start}", flush=True)
step = start
for epoch in range(start // batches_per_epoch, args.epochs):
    first = start % batches_per_epoch if epoch == start // batches_per_epoch else 0
    if first == 0:
        hidden = model.init_hidden(args.batch_size)
    for batch in range(first, batches_per_epoch):
        data, targets = get_batch(train_data, batch * args.bptt)
        hidden = tuple(h.detach() for h in hidden)  # carried over, cut from the last batch's graph
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = F.cross_entropy(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-loop["lr"])  # manual SGD through .data
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(args.ema).add_(p, alpha=1 - args.ema)
        step += 1
        if batch == batches_per_epoch - 1:  # the epoch's end: validate, anneal, keep the best
            val_loss = evaluate(ema)
            if val_loss < loop["best_val_loss"]:
                loop["best_val_loss"] = val_loss
                with open(args.save, "wb") as f:
                    torch.save(model, f)  # a registered model pickles whole
            else:
                loop["lr"] /= 4.0
            print(f"epoch {epoch + 1} step {step}: val loss {val_loss:.4f}, lr {loop['lr']:g}", flush=True)
        elif step % args.log_interval == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        # weightslab: the end of the step, after every update it makes (the EMA and the annealing too).
        wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
        if step == args.kill_at:
            system.wait()  # (so that the run below resumes from a known step: the newest checkpoint)
            os.kill(os.getpid(), signal.SIGKILL)

system.close()  # a final checkpoint of the last step, if the frequency did not take one

state = hashlib.sha256()
for net in (model, ema):
    for value in net.state_dict().values():
        state.update(value.numpy().tobytes())
state.update(repr((loop["lr"], loop["best_val_loss"])).encode())
for h in hidden:
    state.update(h.detach().numpy().tobytes())
state.update(torch.get_rng_state().numpy().tobytes())
print(f"FINAL step {step} state {state.hexdigest()}", flush=True)
