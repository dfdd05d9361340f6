"""weightslab quick start: train, change the run while it trains, crash, resume, look.

    python examples/quickstart.py

What happens:
  1. A small regression model trains on data this script makes itself (no download).
  2. At step 20 the learning rate is lowered in the live config: weightslab notices, opens a
     child experiment and checkpoints it.
  3. At step 35 the hidden layer is widened from 16 to 32 units (a new architecture): another
     child experiment, another checkpoint.
  4. At step 47 the training process is killed with SIGKILL, as a crash or a preemption would.
  5. A fresh process asks weightslab what the latest checkpoint needs, rebuilds that model,
     resumes bit for bit and finishes training.
  6. The script prints where every checkpoint went and how the experiments descend from each other.

Checkpoints go to $WEIGHTSLAB_ROOT, or ./experiments/quickstart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import weightslab as wl

TOTAL_STEPS = 60
CRASH_AT = 47
DEFAULTS = {"lr": 0.05, "hidden": 16, "batch_size": 32}


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(1024, 1, generator=g)
    return x, y


def build_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def widen(model: nn.Module, hidden: int) -> nn.Module:
    """A wider model computing the same function: old units copied, new units start silent."""
    wider = build_model(hidden)
    old = model[0].out_features
    with torch.no_grad():
        wider[0].weight[:old] = model[0].weight
        wider[0].bias[:old] = model[0].bias
        wider[2].weight.zero_()
        wider[2].weight[:, :old] = model[2].weight
        wider[2].bias.copy_(model[2].bias)
    return wider


def train(root: Path, crash: bool) -> None:
    torch.manual_seed(0)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=10)

    # What does the latest checkpoint need? (nothing on the first run)
    info = system.peek()
    config = dict(info.hyperparams["config"]) if info else dict(DEFAULTS)
    model = build_model(config["hidden"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    wl.register_model("model", model)
    wl.register_optimizer("optimizer", optimizer)
    wl.register_hyperparams("config", config)  # the live dict: edits to it are detected

    start = system.resume()
    print(f"  {'resumed from ' + system.experiment_hash + '@' + str(start) if start else 'fresh start'}")
    x, y = make_data()
    for step in range(start + 1, TOTAL_STEPS + 1):
        idx = torch.randint(0, len(x), (config["batch_size"],))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        if step == 20:  # a hyperparameter change, mid-run
            config["lr"] = 0.02
            for group in optimizer.param_groups:
                group["lr"] = config["lr"]
            print(f"  step {step}: learning rate lowered to {config['lr']}")
        if step == 35:  # an architecture change, mid-run
            config["hidden"] = 32
            model = widen(model, config["hidden"])
            optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
            wl.register_model("model", model)  # re-registering a name replaces the object
            wl.register_optimizer("optimizer", optimizer)
            print(f"  step {step}: hidden layer widened to {config['hidden']} units")

        wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
        if crash and step == CRASH_AT:
            system.wait()
            print(f"  step {step}: killing this process with SIGKILL (loss {loss.item():.4f})", flush=True)
            if hasattr(signal, "SIGKILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(137)
    print(f"  finished step {TOTAL_STEPS}, loss {loss.item():.4f}")
    system.close()


def show(root: Path) -> None:
    """Print the experiments, their lineage and their checkpoints, from the files alone."""
    manager = wl.CheckpointManager(root)
    print(f"\nCheckpoints are under {root}:")
    records = {exp: manager.read_experiment(exp) for exp in manager.experiments()}
    for exp in sorted(records, key=lambda e: records[e].created):  # parents before children
        record = records[exp]
        parent = f"child of {record.parent.ref} ({record.parent.reason})" if record and record.parent else "root"
        print(f"  checkpoints/{exp}/   {parent}")
        if record and record.parent:
            for line in record.parent.changes:
                print(f"      changed: {line}")
        for entry in manager.checkpoints([exp]):
            manifest = manager.read_manifest(entry)
            loss = manifest.metrics.get("loss")
            loss_text = f"loss {loss:.4f}" if isinstance(loss, float) else ""
            print(f"      model/{entry.path.name}   step {entry.step:>3}  {', '.join(manifest.reasons):<28} "
                  f"{loss_text}")
    packs = list((root / "objects").rglob("*.safetensors"))
    size = sum(p.stat().st_size for p in packs)
    print(f"  objects/   {len(packs)} tensor packs, {size / 1024:.1f} KiB, shared by all experiments")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--train", "--resume"):
        train(Path(sys.argv[2]), crash=sys.argv[1] == "--train")
        return
    root = Path(os.environ.get("WEIGHTSLAB_ROOT") or "experiments/quickstart").absolute()
    if (root / "checkpoints").is_dir():
        print(f"removing the previous quick-start run in {root}")
        shutil.rmtree(root)

    print("1. training (the process will be killed mid-run)")
    crashed = subprocess.run([sys.executable, __file__, "--train", str(root)])
    print(f"   -> the training process died with exit status {crashed.returncode}")
    print("2. resuming in a fresh process")
    subprocess.run([sys.executable, __file__, "--resume", str(root)], check=True)
    show(root)
    print(f"\nSee the runs (lineage, loss curves across the resume and the changes, every checkpoint):\n"
          f"    weightslab ui --root {root}")


if __name__ == "__main__":
    main()
