"""Cost of ``checkpoint_on_step`` on a step that does not save, for a 100-module model.

Run: ``python benchmarks/step_overhead.py``. Prints the median cost per call of a non-saving step
boundary (change detection included) next to the cost of one forward+backward+Adam step of the
same model, measured in the same run. Target (DESIGN.md): < 50 us.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

import weightslab as wl


def build(modules: int) -> nn.Module:
    # 50 Linear + 50 activations, plus the container: ~100 modules, 100 parameters.
    layers: list[nn.Module] = []
    for _ in range(modules // 2):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers)


def timed(fn, repeats: int, inner: int) -> float:
    """Median seconds per call over ``repeats`` batches of ``inner`` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = build(args.modules)
    n_modules = len(list(model.modules()))
    n_params = len(list(model.parameters()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = {"lr": 1e-3, "batch_size": 32, "optimizer": {"betas": [0.9, 0.999], "weight_decay": 0.0},
              "schedule": {"warmup": 100, "total": 10000}, "seed": 0}
    with tempfile.TemporaryDirectory() as root:
        system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=10**9, save_on_close=False)
        wl.register_model("model", model)
        wl.register_optimizer("optimizer", opt)
        wl.register_hyperparams("config", config)
        step = iter(range(1, 10**9))
        wl.checkpoint_on_step(next(step))  # first boundary: fingerprint, baseline
        boundary = timed(lambda: wl.checkpoint_on_step(next(step)), args.repeats, args.inner)

        x = torch.randn(32, 32)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()

        train = timed(train_step, 5, 50)
        system.close()
        wl.unregister("model"), wl.unregister("optimizer"), wl.unregister("config")

    print(f"model: {n_modules} modules, {n_params} parameters")
    print(f"checkpoint_on_step, non-saving step: {boundary * 1e6:8.1f} us   (target < 50 us)")
    print(f"one training step (fwd+bwd+Adam):     {train * 1e6:8.1f} us   -> overhead {boundary / train:.2%}")


if __name__ == "__main__":
    main()
