"""Storage cost of ten consecutive checkpoints, against ten torch.save files and against what changed.

Run: ``python benchmarks/storage.py`` (an MLP of ``--layers`` (20) square nn.Linear layers + GELU, about
``--params`` parameters (default 25 M; Adam, so about 300 MB of state); about 3 minutes on a
2-core machine, and it writes about 25 GB), or ``--params 2000000`` for a quick run (about 25 s).
``--dir PATH`` chooses where the files go (default: a temporary directory under the current one,
so the disk measured is the disk written to; everything is removed at the end). Run it from
outside a git work tree, or pass ``--dir``, so that a ``git add -A`` meanwhile cannot pick up the
temporary files.

Everything runs in one process. Three scenarios, each made of 10 checkpoints with one real training
step (forward, backward of an MSE loss, ``Adam.step``, on a random batch of ``--batch`` (32) rows) before each:

(a) full training: every parameter trainable;
(b) fine-tuning: the first 90% of the layers (by parameter count) frozen, the optimizer holding only
    the trainable parameters (so Adam state exists only for them);
(c) full training with a hyperparameter change after checkpoint 5 (the registered dict's ``lr`` and
    the optimizer's lr set to 1e-4): checkpoint 6 opens a new experiment (config_change).

Each scenario runs once as a reference, saving ``{"model": ..., "optimizer": ...}`` with torch.save
(+ fsync, each to a new file) at the same 10 points, then once per storage setting -- compression
``off``, ``zstd``, ``zstd`` + ``delta`` -- each from the same seed, in a fresh root with a fresh
checkpoint system (``checkpoint_frequency=1``; every checkpoint is made durable with ``wait()``
before the next training step). For each setting it prints, as ratios:

* bytes/10 save: bytes on disk of ``<root>/objects`` + the checkpoint manifests after the 10
  checkpoints, over the total size of the ten torch.save files (experiment records, architecture
  text and hyperparameter YAML are not counted);
* added/changed: the bytes each checkpoint added on disk (objects + manifests, after ``wait()``)
  over the bytes of the tensors that changed since the previous checkpoint (computed here: a CPU
  copy of every model, optimizer and torch RNG tensor at each checkpoint, compared bit for bit with
  ``torch.equal`` to the previous copy), summed over checkpoints 2..10 ("overall") and for the
  worst single checkpoint; for (c) also "after chg": the ratio of the first checkpoint after the
  change alone (a new experiment must not cost a full checkpoint);
* block/save: median wall time of ``wl.checkpoint_on_step`` on the saving steps over the median
  torch.save + fsync time; durable/save: the same for the call + ``system.wait()``;
* restore/load: ``system.resume("<hash>@10")`` over torch.load(weights_only=True) +
  ``load_state_dict`` of the last torch.save file, both warm in the page cache (every file read
  once first), interleaved, median of ``--repeats`` (3) rounds -- fewer once ``--restore-budget``
  (2 s) of weightslab restores is spent, since a restore through delta chains takes seconds.

Then a summary of the targets (added/changed <= 1.05 with compression off, < 1 with zstd and with
delta; (c): the first checkpoint after the change costs ~ its changed bytes, <= 1.05) and whether
each was met. It reports; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import weightslab as wl

CHECKPOINTS = 10
CHANGE_AFTER = 5  # scenario (c): the hyperparameters change after this checkpoint
SETTINGS = {  # name -> checkpoint system settings
    "off": {"compression": "off", "delta": False},
    "zstd": {"compression": "zstd", "delta": False},
    "zstd+delta": {"compression": "zstd", "delta": True},
}
SCENARIOS = {
    "a": "full training",
    "b": "fine-tune, 90% of the parameters frozen",
    "c": f"full training, lr change after checkpoint {CHANGE_AFTER}",
}


# --- the training run ----------------------------------------------------------------------------
def build(params: int, layers: int) -> nn.Sequential:
    """``layers`` nn.Linear(d, d) with GELU between them, about ``params`` parameters in all.

    He-initialised and smooth, so activations and gradients keep their scale through every layer
    and no gradient is exactly zero: with the default init and ReLU, a deep stack's gradients vanish
    and dead units leave Adam moments at exactly 0, which compress far better than real ones.
    """
    d = max(16, int(round(math.sqrt(params / layers) / 16)) * 16)
    modules: list[nn.Module] = []
    for i in range(layers):
        linear = nn.Linear(d, d)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        modules.append(linear)
        if i < layers - 1:
            modules.append(nn.GELU())
    return nn.Sequential(*modules)


def freeze_first(model: nn.Module, fraction: float) -> None:
    """Freeze whole Linear layers from the input side until ``fraction`` of the parameters is frozen."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    total = sum(p.numel() for p in model.parameters())
    frozen = 0
    for layer in linears:
        n = sum(p.numel() for p in layer.parameters())
        if frozen + n > fraction * total * 1.0001:
            break
        layer.requires_grad_(False)
        frozen += n


@dataclass
class Run:
    """One training run of a scenario: model, optimizer, hyperparameters and the batch shape."""

    model: nn.Sequential
    opt: torch.optim.Optimizer
    cfg: dict
    width: int
    batch: int

    @classmethod
    def make(cls, scenario: str, args: argparse.Namespace) -> "Run":
        torch.manual_seed(args.seed)  # same weights, same batches in every run of the scenario
        model = build(args.params, args.layers)
        if scenario == "b":
            freeze_first(model, 0.9)
        cfg = {"lr": 1e-3, "batch_size": args.batch, "betas": [0.9, 0.999], "seed": args.seed}
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        return cls(model, opt, cfg, model[0].in_features, args.batch)

    def train_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        # from the global generator: its state changes too, and is part of the checkpoint
        x, y = torch.randn(self.batch, self.width), torch.randn(self.batch, self.width)
        (self.model(x) - y).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def change_hyperparams(self) -> None:
        """Scenario (c): mutate the registered dict in place (a config change) and follow it."""
        self.cfg["lr"] = 1e-4
        for group in self.opt.param_groups:
            group["lr"] = 1e-4

    def state_nbytes(self) -> int:
        return sum(t.nbytes for t in state_tensors(self).values())


def state_tensors(run: Run) -> dict[str, torch.Tensor]:
    """Every tensor of the training state a checkpoint holds: model, optimizer, torch RNG."""
    out = {f"model/{k}": v for k, v in run.model.state_dict().items()}
    for idx, per_param in run.opt.state_dict()["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer/{idx}/{name}"] = value
    out["rng/torch"] = torch.get_rng_state()
    return out


def cpu_copy(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_tensors(run).items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def changed_bytes(previous: dict[str, torch.Tensor] | None, current: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors of ``current`` that differ (bit for bit) from ``previous``; all of them
    when there is no previous copy."""
    total = 0
    for key, t in current.items():
        old = previous.get(key) if previous is not None else None
        if old is None or old.dtype != t.dtype or old.shape != t.shape or not torch.equal(_bits(old), _bits(t)):
            total += t.nbytes
    return total


# --- measuring -----------------------------------------------------------------------------------
def stored_bytes(root: Path) -> int:
    """Bytes of ``<root>/objects`` (packs) plus every checkpoint manifest under ``<root>/checkpoints``."""
    total = 0
    for dirpath, _, files in os.walk(root / "objects"):
        for name in files:
            if not name.startswith("."):  # the lock file, temporaries of a save in progress
                total += os.stat(os.path.join(dirpath, name)).st_size
    for manifest in root.glob("checkpoints/*/model/*_step_*.json"):
        total += manifest.stat().st_size
    return total


def torch_save(path: Path, run: Run) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once, so that the timed restores read from memory, as the page cache allows."""
    buffer = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def torch_restore(path: Path, run: Run) -> float:
    start = time.perf_counter()
    checkpoint = torch.load(path, weights_only=True)
    run.model.load_state_dict(checkpoint["model"])
    run.opt.load_state_dict(checkpoint["optimizer"])
    return time.perf_counter() - start


@dataclass
class Reference:
    total_bytes: int
    save_s: float  # median torch.save + fsync
    last_file: Path
    state_nbytes: int
    n_params: int
    trainable: int


@dataclass
class Result:
    stored: int = 0
    added: list[int] = field(default_factory=list)  # per checkpoint
    changed: list[int] = field(default_factory=list)
    block: list[float] = field(default_factory=list)
    durable: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    torch_load: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [a / c if c else math.inf for a, c in zip(self.added[1:], self.changed[1:])]

    @property
    def overall(self) -> float:
        return sum(self.added[1:]) / max(1, sum(self.changed[1:]))

    @property
    def worst(self) -> float:
        return max(self.ratios())

    @property
    def after_change(self) -> float:
        return self.added[CHANGE_AFTER] / max(1, self.changed[CHANGE_AFTER])  # checkpoint 6, 0-based 5


def run_reference(scenario: str, args: argparse.Namespace, where: Path) -> Reference:
    """Ten torch.save files at the same points of an identical run; keeps only the last file."""
    run = Run.make(scenario, args)
    files, seconds = [], []
    for ckpt in range(1, CHECKPOINTS + 1):
        if scenario == "c" and ckpt == CHANGE_AFTER + 1:
            run.change_hyperparams()
        run.train_step()
        path = where / f"torch_{scenario}_{ckpt:02d}.pt"
        seconds.append(torch_save(path, run))
        files.append(path)
    total = sum(p.stat().st_size for p in files)
    for p in files[:-1]:  # measured; only the last one is read back
        p.unlink()
    ref = Reference(total, statistics.median(seconds), files[-1], run.state_nbytes(),
                    sum(p.numel() for p in run.model.parameters()),
                    sum(p.numel() for p in run.model.parameters() if p.requires_grad))
    del run
    gc.collect()
    return ref


def run_weightslab(scenario: str, setting: str, ref: Reference, args: argparse.Namespace, where: Path) -> Result:
    run = Run.make(scenario, args)
    result = Result()
    registered: list[str] = []
    system = None
    with tempfile.TemporaryDirectory(dir=where, prefix=f"root-{scenario}-{setting}-") as tmp:
        root = Path(tmp)
        try:
            system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False,
                                              **SETTINGS[setting])
            wl.register_model("model", run.model)
            registered.append("model")
            wl.register_optimizer("optimizer", run.opt)
            registered.append("optimizer")
            wl.register_hyperparams("config", run.cfg)
            registered.append("config")

            previous = None
            for ckpt in range(1, CHECKPOINTS + 1):
                if scenario == "c" and ckpt == CHANGE_AFTER + 1:
                    run.change_hyperparams()
                run.train_step()
                before = stored_bytes(root)
                start = time.perf_counter()
                saved = wl.checkpoint_on_step(ckpt)
                returned = time.perf_counter()
                system.wait()
                done = time.perf_counter()
                if not saved:
                    raise RuntimeError(f"checkpoint_on_step({ckpt}) did not save")
                result.block.append(returned - start)
                result.durable.append(done - start)
                result.added.append(stored_bytes(root) - before)
                current = cpu_copy(run)  # after the save: not part of any timing
                result.changed.append(changed_bytes(previous, current))
                previous = current
            del previous, current
            result.stored = stored_bytes(root)

            target = f"{system.experiment_hash}@{CHECKPOINTS}"
            warm_page_cache([*root.rglob("*.safetensors"), *root.rglob("*.json"), ref.last_file])
            spent = 0.0
            for i in range(args.repeats):  # at least one round; more while they are cheap
                start = time.perf_counter()
                restored = system.resume(target)
                seconds = time.perf_counter() - start
                if restored != CHECKPOINTS:
                    raise RuntimeError(f"resume({target!r}) returned step {restored}")
                result.restore.append(seconds)
                result.torch_load.append(torch_restore(ref.last_file, run))
                spent += seconds
                if spent > args.restore_budget:
                    break
        finally:
            if system is not None:
                system.close()
            for name in registered:
                wl.unregister(name)
    del run
    gc.collect()
    return result


# --- reporting -----------------------------------------------------------------------------------
def print_scenario(scenario: str, ref: Reference, results: dict[str, Result], elapsed: float) -> None:
    med = statistics.median
    first = next(iter(results.values()))
    changed = sum(first.changed[1:]) / (CHECKPOINTS - 1)
    print(f"\n({scenario}) {SCENARIOS[scenario]}: {ref.n_params / 1e6:.1f} M parameters, "
          f"{ref.trainable / 1e6:.1f} M trainable; state {ref.state_nbytes / 1e6:.1f} MB, "
          f"changed {changed / 1e6:.1f} MB per checkpoint (mean of 2..{CHECKPOINTS}) [{elapsed:.0f} s]")
    print(f"    reference: 10 torch.save files {ref.total_bytes / 1e6:.1f} MB, torch.save + fsync "
          f"{ref.save_s:.3f} s (median), torch.load + load_state_dict {med(first.torch_load):.3f} s")
    extra = scenario == "c"
    print(f"    {'setting':<11}{'on disk MB':>11}{'bytes/10 save':>14}{'added/changed':>14}{'worst':>7}"
          f"{'block/save':>11}{'durable/save':>13}{'restore/load':>13}" + (f"{'after chg':>10}" if extra else ""))
    for setting, r in results.items():
        line = (f"    {setting:<11}{r.stored / 1e6:>11.1f}{r.stored / ref.total_bytes:>14.3f}{r.overall:>14.3f}"
                f"{r.worst:>7.3f}{med(r.block) / ref.save_s:>11.3f}{med(r.durable) / ref.save_s:>13.3f}"
                f"{med(r.restore) / med(r.torch_load):>13.3f}")
        if extra:
            line += f"{r.after_change:>10.3f}"
        print(line)
    print(f"    seconds, median: block {'  '.join(f'{s} {med(r.block):.3f}' for s, r in results.items())}; "
          f"durable {'  '.join(f'{s} {med(r.durable):.3f}' for s, r in results.items())}; "
          f"restore {'  '.join(f'{s} {med(r.restore):.3f}' for s, r in results.items())}")


def summarize(all_results: dict[str, dict[str, Result]]) -> None:
    def check(setting: str, bound: float, strict: bool) -> tuple[str, bool]:
        parts, ok = [], True
        for scenario, results in all_results.items():
            r = results[setting]
            met = (r.overall < bound and r.worst < bound) if strict else (r.overall <= bound and r.worst <= bound)
            ok &= met
            parts.append(f"{scenario} {r.overall:.3f}/{r.worst:.3f}")
        return ", ".join(parts), ok

    print("\ntargets (added/changed, overall/worst per scenario):")
    for setting, bound, strict, text in (("off", 1.05, False, "<= 1.05"), ("zstd", 1.0, True, "< 1"),
                                         ("zstd+delta", 1.0, True, "< 1 (expected ~0.8)")):
        detail, ok = check(setting, bound, strict)
        print(f"  {setting:<11}{text:<20} {detail:<44} {'met' if ok else 'NOT MET'}")
    if "c" in all_results:
        rs = all_results["c"]
        ok = all(r.after_change <= 1.05 for r in rs.values())
        detail = ", ".join(f"{s} {r.after_change:.3f}" for s, r in rs.items())
        print(f"  (c) first checkpoint after the change / its changed bytes <= 1.05 (not a full checkpoint): "
              f"{detail}  {'met' if ok else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000,
                        help="parameters of the model (default 25 M; state is about 3x that in float32)")
    parser.add_argument("--layers", type=int, default=20, help="square nn.Linear layers (default 20)")
    parser.add_argument("--batch", type=int, default=32, help="rows of the random training batch")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed restores per setting (median; default 3, fewer once --restore-budget is spent)")
    parser.add_argument("--restore-budget", type=float, default=2.0,
                        help="stop repeating a setting's restore after this many seconds (default 2)")
    parser.add_argument("--scenarios", default="abc", help="which scenarios to run (default abc)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=".",
                        help="where to create the temporary directory (default: the current directory)")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {''.join(sorted(unknown))}; choose from {''.join(SCENARIOS)}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{CHECKPOINTS} checkpoints per run, one training step before each; files under "
          f"{Path(args.dir).resolve()}")
    started = time.perf_counter()
    all_results: dict[str, dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-storage-") as tmp:
        where = Path(tmp)
        for scenario in args.scenarios:
            scenario_start = time.perf_counter()
            ref = run_reference(scenario, args, where)
            results = {setting: run_weightslab(scenario, setting, ref, args, where) for setting in SETTINGS}
            ref.last_file.unlink()
            all_results[scenario] = results
            print_scenario(scenario, ref, results, time.perf_counter() - scenario_start)
    summarize(all_results)
    print(f"total time {time.perf_counter() - started:.0f} s")
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("weightslab")]
    if leftover:
        print(f"warning: threads left running: {', '.join(leftover)}")


if __name__ == "__main__":
    main()
