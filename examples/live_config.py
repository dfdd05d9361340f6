"""Edit the config file of a run while it trains: the learning rate changes, a child experiment opens.

    python examples/live_config.py

What happens:
  1. The script writes config.yaml (lr 0.05) and trains a small regression model on data it makes
     itself, with the optimizer built from the config.
  2. At step 100 it saves a new version of config.yaml with lr 0.01, the way an editor does (a
     temporary file renamed over the original). You would do this from your editor, in another
     terminal; the script does it itself so that it runs on its own.
  3. weightslab's watcher sees the file change; once it has been quiet for a moment, at the next
     step boundary, the edit is checked and applied: the optimizer's learning rate becomes 0.01,
     and a child experiment opens whose parent is the step the edit arrived at.
  4. At step 250 it saves a broken version ("lr: [0.01" does not parse): a warning names the file
     and the line, the run keeps lr 0.01 and goes on.
  5. It prints the learning rate over time and the lineage of the experiments.

Checkpoints go to $WEIGHTSLAB_ROOT, or ./experiments/live_config; the config file goes there too.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import weightslab as wl

STEPS = 400
CONFIG = "optimizer:\n  lr: {lr}\n  momentum: 0.9\nmodel:\n  hidden: 32\n"


def save_like_an_editor(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.swp-new")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="  [%(levelname)s] %(message)s")
    root = Path(os.environ.get("WEIGHTSLAB_ROOT") or "experiments/live_config").absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    path = root / "config.yaml"
    path.write_text(CONFIG.format(lr=0.05))

    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=100)
    config = wl.register_hyperparams("config", path)
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(8, config["model"]["hidden"]), nn.ReLU(), nn.Linear(config["model"]["hidden"], 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["optimizer"]["lr"],
                                momentum=config["optimizer"]["momentum"])
    wl.register_model(model)
    wl.register_optimizer(optimizer)

    lr_seen = None
    for step in range(1, STEPS + 1):
        batch = torch.randint(0, 512, (64,))
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
        lr = optimizer.param_groups[0]["lr"]
        if lr != lr_seen:
            print(f"step {step:3d}: lr {lr}, experiment {system.experiment_hash}, loss {loss.item():.4f}")
            lr_seen = lr
        if step == 100:
            print(f"step {step:3d}: saving config.yaml with lr 0.01 (as your editor would)")
            save_like_an_editor(path, CONFIG.format(lr=0.01))
        if step == 250:
            print(f"step {step:3d}: saving a broken config.yaml (as a slip of the keyboard would)")
            save_like_an_editor(path, CONFIG.format(lr="[0.01"))
        time.sleep(0.005)  # a bigger model would take this long per step; the edit needs a moment to land
    system.close()

    print(f"\nfinished step {STEPS} with lr {optimizer.param_groups[0]['lr']}")
    manager = wl.CheckpointManager(root)
    print("lineage:")
    records = sorted(((manager.read_experiment(exp), exp) for exp in manager.experiments()),
                     key=lambda pair: pair[0].created)
    for record, exp in records:
        steps = [e.step for e in manager.checkpoints([exp])]
        parent = f"child of {record.parent.ref} ({record.parent.reason}: {'; '.join(record.parent.changes)})" \
            if record.parent else "the first experiment"
        print(f"  {exp}: {parent}; checkpoints at steps {steps}")
    print(f"Checkpoints are under {root}")


if __name__ == "__main__":
    main()
