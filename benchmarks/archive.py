"""The lossy archive tier measured: bytes per archived checkpoint, encode/decode throughput, per-tensor
errors, and what resuming from archived checkpoints costs a training run ("DynaQuant's bar").

Run: ``python benchmarks/archive.py`` (about 3 minutes on a 2-core machine; it writes about 3 GB) or
``python benchmarks/archive.py --quick`` (about 1 minute: ``--steps 100 --params 2000000``). ``--dir
PATH`` chooses where the files go (default: the system's temporary directory, outside any git work
tree; everything is removed at the end). ``MKL_CBWR=AVX2,STRICT`` and one torch thread make the
training runs reproducible. Expected warnings (each lossy resume and load says so) are counted, not shown.

Every archive setting runs side by side in one process: LC-Checkpoint (``lc``) with 2, 3 and 4 bits,
ExCP (``excp``) with its defaults and a more aggressive one (3 bits, ``weight_prune=2``,
``moment_prune=1``), each with the optimizer state archived too (``optimizer="lossy"``) and kept
lossless (``optimizer="exact"``); chains of at most 16 links, the newest 2 checkpoints exact.

Workload 1, a small classifier trained for real (``--steps`` T, default 300): an MLP (32 -> 256 ->
256 -> 10, GELU, 77 k parameters) learns the labels of a random teacher network on Gaussian inputs
(8192 training rows, 4096 held out; nothing downloaded), Adam (lr 2e-3), batches of 64 drawn by a
schedule indexed by the step (the same rows at the same step in every run, whatever the RNG state).
A checkpoint every ``--every`` (2) steps (every step doubles the time: each save is followed by a
demotion on the writer thread, which the next save waits for). Three kinds of run, each applying
exactly T optimizer updates on its final trajectory:

* exact: T uninterrupted steps (no checkpoint system);
* control: with weightslab (no archive), resuming ``--resumes`` (10) times from *exact* checkpoints --
  at a checkpoint c near the middle of each tenth of the run: train until two more checkpoints are
  saved, then ``system.resume("<hash>@c")`` and go on from c + 1 (the steps after c are trained
  twice, and only the second time counts). It must end bit for bit where the exact run ends, or the
  comparison below would measure the harness;
* one per archive setting: the same, with ``Retention(policies=(KeepLast(n=2),), archive=...)``, so
  that c is demoted once the two checkpoints after it are saved, and each resume is
  ``system.resume("<hash>@c", allow_lossy=True)`` of an archived checkpoint (checked in its manifest;
  each lossy resume continues in a child experiment, whose first checkpoint is the next chain's anchor).

Reported: the final training loss (the whole training set), held-out loss and accuracy, their
relative difference from the exact run (target: both losses within 1%, either way), the bytes of an
archived checkpoint (counted as for workload 2, below) against ``torch.save`` of the same state and
against a lossless weightslab checkpoint of the control run, the manifest's share of those bytes (a
manifest lists every link of every archived tensor's chain, so at this size it is most of them), and
the relative L2 errors the manifests record.

Workload 2, the 25 M-parameter MLP of benchmarks/storage.py (``--params``, ``--layers`` (20) square
nn.Linear + GELU, He init, Adam lr 1e-3, an MSE loss on random batches of 32): ``--checkpoints`` (5)
checkpoints, one training step before each, saved with compression off and, in a second root from
the same seed, with zstd. For each setting, a copy of the compression-off root (packs hard-linked,
manifests copied) is pruned with ``wl.prune(keep_last=2, archive=...)``: the first checkpoint stays
exact (the chains' anchor), the last two are the exact ring, and those between are demoted, as a
chain. Reported per setting:

* bytes of an archived checkpoint, what it adds of its own: the payload of the *last* link of each
  archived tensor, the stored bytes of each exact tensor whose digest the checkpoint before it does
  not hold (Adam's step counters, the RNG state; with ``optimizer="exact"`` the Adam moments), and
  its manifest file. Ratios to it: torch.save of ``{"model": ..., "optimizer": ...}`` (a real file,
  written in this run), and what one lossless weightslab checkpoint added on disk (objects +
  manifest, median of checkpoints 2..N) with compression off and with zstd. The papers' figures
  are printed next to them: LC-Checkpoint up to 28x, ExCP about 70x (both against uncompressed
  checkpoints, on their own models and schedules: an anchor, not a target);
* encode: the raw state (model + optimizer tensors, float32) of the demoted checkpoints over the
  wall time of ``wl.prune`` (reading, encoding, writing the packs and manifests);
* decode: the raw state over the wall time of ``wl.load`` of the last archived checkpoint (the
  longest chain: anchor + every link decoded, every byte verified; the files were just written, so
  they are read from the page cache), against ``wl.load`` of an exact checkpoint of the same root;
* max abs and relative L2 error of the archived tensors, as the manifests record them: median and
  worst over every archived tensor of every demoted checkpoint (weights and optimizer moments
  together; a second moment's relative error is in its own units).

It prints tables; it asserts nothing about timings.
"""

from __future__ import annotations

import os

os.environ["MKL_CBWR"] = "AVX2,STRICT"  # before torch: the same kernels, so the same floats, run after run

import argparse
import gc
import json
import logging
import math
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import weightslab as wl
from storage import build  # benchmarks/storage.py's 25 M-parameter MLP (this script's directory is on sys.path)

torch.set_num_threads(1)

__all__ = ["Setting", "SETTINGS", "main"]

med = statistics.median
PAPER = {"lc": "28x", "excp": "70x"}  # LC-Checkpoint: "up to 28x"; ExCP: "~70x"


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One archive configuration: a codec, its parameters and what happens to optimizer state."""

    name: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "lossy"

    def archive(self) -> "wl.Archive":
        return wl.Archive.of(self.codec, optimizer=self.optimizer, **self.params)


def settings(aggressive: dict[str, Any]) -> list[Setting]:
    codecs = [("lc b2", "lc", {"bits": 2}), ("lc b3", "lc", {"bits": 3}), ("lc b4", "lc", {"bits": 4}),
              ("excp", "excp", {}), ("excp agg", "excp", aggressive)]
    return [Setting(name=f"{name} opt={mode}", codec=codec, params=params, optimizer=mode)
            for mode in ("lossy", "exact") for name, codec, params in codecs]


SETTINGS = settings({"bits": 3, "weight_prune": 2.0, "moment_prune": 1.0})


# --- manifests -----------------------------------------------------------------------------------
def manifest_path(root: Path, ref: str) -> Path:
    experiment, step = ref.split("@")
    return root / "checkpoints" / experiment / "model" / f"{experiment}_step_{int(step):06d}.json"


def read_manifest(root: Path, ref: str) -> dict[str, Any]:
    return json.loads(manifest_path(root, ref).read_text())


def _digests(manifest: dict[str, Any]) -> set[str]:
    """Every blob a manifest names: exact tensors' blobs, archived tensors' anchors and links."""
    out = set()
    for entry in manifest["tensors"].values():
        if entry.get("exact", True):
            out.add(entry["digest"])
        else:
            out.add(entry["anchor"]["digest"])
            out.update(link["blob"]["digest"] for link in entry["links"])
    return out


@dataclass
class OwnBytes:
    """What one checkpoint adds of its own (see the module docstring for what is counted)."""

    payload: int  # last links of the archived tensors
    exact: int  # exact tensors not named by the checkpoint before
    manifest: int  # the manifest file

    @property
    def total(self) -> int:
        return self.payload + self.exact + self.manifest


def own_bytes(root: Path, ref: str, previous: str | None) -> OwnBytes:
    manifest = read_manifest(root, ref)
    shared = _digests(read_manifest(root, previous)) if previous is not None else set()
    payload = exact = 0
    for entry in manifest["tensors"].values():
        if not entry.get("exact", True):
            payload += entry["links"][-1]["blob"]["nbytes"]
        elif entry["digest"] not in shared:
            exact += entry["nbytes"]
    return OwnBytes(payload, exact, manifest_path(root, ref).stat().st_size)


def archived_refs(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(ref, manifest)`` of every archived checkpoint under ``root``."""
    out = []
    for path in sorted(root.glob("checkpoints/*/model/*_step_*.json")):
        manifest = json.loads(path.read_text())
        if manifest.get("archive"):
            out.append((f"{manifest['experiment']}@{manifest['step']}", manifest))
    return out


def tensor_errors(manifests: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """max abs and rel L2 of every archived tensor of ``manifests`` (as recorded at demotion)."""
    max_abs, rel_l2 = [], []
    for manifest in manifests:
        for entry in manifest["tensors"].values():
            if not entry.get("exact", True):
                max_abs.append(entry["error"]["max_abs"])
                rel_l2.append(entry["error"]["rel_l2"])
    return max_abs, rel_l2


def torch_save_bytes(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> int:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    size = path.stat().st_size
    path.unlink()
    return size


def state_nbytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(t.nbytes for t in model.state_dict().values())
    for per_param in opt.state_dict()["state"].values():
        total += sum(v.nbytes for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


class Registered:
    """A checkpoint system on ``root`` with the run's objects registered; closed and unregistered on exit."""

    def __init__(self, root: Path, objects: dict[str, Any], **config: Any):
        self.system = wl.get_checkpoint_system(root_log_dir=root, save_on_close=False, **config)
        self.names: list[str] = []
        try:
            for name, value in objects.items():
                register = {"model": wl.register_model, "optimizer": wl.register_optimizer,
                            "config": wl.register_hyperparams}[name]
                register(name, value)
                self.names.append(name)
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> "wl.AutomaticCheckpointSystem":
        return self.system

    def __exit__(self, *exc: Any) -> None:
        self.system.close()
        for name in self.names:
            wl.unregister(name)


# --- workload 1: a small classifier, resumed 10 times ----------------------------------------------
class Task:
    """A teacher network's labels of Gaussian inputs: a training set, a held-out set, a batch schedule."""

    def __init__(self, seed: int, *, dim: int = 32, classes: int = 10, train: int = 8192, heldout: int = 4096,
                 batch: int = 64):
        g = torch.Generator().manual_seed(seed)
        teacher = [torch.randn(dim, 64, generator=g) / math.sqrt(dim), torch.randn(64, classes, generator=g) / 8]
        x = torch.randn(train + heldout, dim, generator=g)
        y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
        self.x, self.y = x[:train], y[:train]
        self.hx, self.hy = x[train:], y[train:]
        self.seed, self.dim, self.classes, self.batch = seed, dim, classes, batch

    def rows(self, step: int) -> torch.Tensor:
        """The batch of ``step``: a function of the step alone, never of the global RNG."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, len(self.x), (self.batch,), generator=g)


class Student:
    def __init__(self, task: Task, seed: int, lr: float = 2e-3):
        torch.manual_seed(seed)
        self.task = task
        self.model = nn.Sequential(nn.Linear(task.dim, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                   nn.Linear(256, task.classes))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.cfg = {"lr": lr, "batch_size": task.batch, "seed": seed}

    def train_step(self, step: int) -> None:
        rows = self.task.rows(step)
        self.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(self.task.x[rows]), self.task.y[rows]).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t = self.task
        logits, held = self.model(t.x), self.model(t.hx)
        return {"train": nn.functional.cross_entropy(logits, t.y).item(),
                "heldout": nn.functional.cross_entropy(held, t.hy).item(),
                "acc": (held.argmax(1) == t.hy).float().mean().item(),
                "updates": int(self.opt.state_dict()["state"][0]["step"].item())}

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def resume_points(steps: int, resumes: int, every: int) -> list[int]:
    """A checkpoint step near the middle of each of ``resumes`` equal parts of the run."""
    interval = steps / resumes
    return [every * max(1, round((interval * k - interval / 2) / every)) for k in range(1, resumes + 1)]


@dataclass
class SmallRun:
    metrics: dict[str, float]
    params: list[torch.Tensor]
    seconds: float
    resumed_archived: int = 0  # resumes whose checkpoint was archived (not exact)
    chains: list[int] = field(default_factory=list)  # chain length of each resumed checkpoint
    own: list[OwnBytes] = field(default_factory=list)  # per archived (or, for the control, exact) checkpoint
    errors: tuple[list[float], list[float]] = ((), ())


def small_exact(task: Task, args: argparse.Namespace) -> tuple[SmallRun, int, int]:
    """T uninterrupted steps, no checkpoint system; also the torch.save bytes and raw bytes of its state."""
    student = Student(task, args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        student.train_step(step)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="torch-") as tmp:
        saved = torch_save_bytes(student.model, student.opt, Path(tmp) / "state.pt")
    return SmallRun(student.evaluate(), student.params(), seconds), saved, state_nbytes(student.model, student.opt)


def small_resumed(task: Task, setting: Setting | None, args: argparse.Namespace, where: Path) -> SmallRun:
    """The run with ``--resumes`` resumes, from archived checkpoints (``setting``) or exact ones (None)."""
    student = Student(task, args.seed)
    points = resume_points(args.steps, args.resumes, args.every)
    config: dict[str, Any] = {"checkpoint_frequency": args.every}
    if setting is not None:
        config["retention"] = wl.Retention(policies=(wl.KeepLast(n=2),), archive=setting.archive())
    run = SmallRun({}, [], 0.0)
    with tempfile.TemporaryDirectory(dir=where, prefix="small-") as tmp:
        root = Path(tmp)
        objects = {"model": student.model, "optimizer": student.opt, "config": student.cfg}
        start = time.perf_counter()
        with Registered(root, objects, **config) as system:
            refs: dict[int, str] = {}
            pending: int | None = None
            step = 1
            while step <= args.steps:
                student.train_step(step)
                saved = wl.checkpoint_on_step(step)
                if saved != (step % args.every == 0):
                    raise RuntimeError(f"checkpoint_on_step({step}) returned {saved} with a checkpoint every "
                                       f"{args.every} steps")
                refs[step] = f"{system.experiment_hash}@{step}"
                if pending is not None and step == pending + 2 * args.every:  # c left the exact ring: resume it
                    system.wait()
                    manifest = read_manifest(root, refs[pending])
                    if manifest.get("archive"):
                        run.resumed_archived += 1
                        run.chains.append(manifest["archive"]["chain"])
                    restored = system.resume(refs[pending], allow_lossy=setting is not None)
                    if restored != pending:
                        raise RuntimeError(f"resume({refs[pending]!r}) returned step {restored}, not {pending}")
                    step, pending = pending + 1, None
                    continue
                if points and step == points[0]:
                    pending = points.pop(0)
                step += 1
            system.wait()
        run.seconds = time.perf_counter() - start
        run.metrics, run.params = student.evaluate(), student.params()
        if setting is not None:
            archived = archived_refs(root)
            run.own = [own_bytes(root, ref, m["archive"]["base"]) for ref, m in archived]
            run.errors = tensor_errors([m for _, m in archived])
        else:  # what an exact checkpoint adds (compression off), against the step before it
            for path in sorted(root.glob("checkpoints/*/model/*_step_*.json")):
                manifest = json.loads(path.read_text())
                ref = f"{manifest['experiment']}@{manifest['step']}"
                before = f"{manifest['experiment']}@{manifest['step'] - args.every}"
                if manifest_path(root, before).exists():
                    run.own.append(own_bytes(root, ref, before))
    del student
    gc.collect()
    return run


def relative(a: float, b: float) -> float:
    return (a - b) / abs(b) if b else math.inf


def print_small(task: Task, args: argparse.Namespace, exact: SmallRun, saved: int, raw: int, control: SmallRun,
                runs: dict[str, SmallRun], elapsed: float) -> None:
    n_params = sum(p.numel() for p in exact.params)
    lossless = med(o.total for o in control.own)
    print(f"\nWorkload 1: MLP classifier, {n_params / 1e3:.0f} k parameters, state {raw / 1e3:.0f} kB "
          f"(torch.save {saved / 1e3:.0f} kB, weightslab lossless {lossless / 1e3:.0f} kB per checkpoint); "
          f"{args.steps} steps, a checkpoint every {args.every} steps, {args.resumes} resumes (at steps "
          f"{', '.join(map(str, resume_points(args.steps, args.resumes, args.every)))}) [{elapsed:.0f} s]")
    m = exact.metrics
    print(f"    exact, uninterrupted: train loss {m['train']:.5f}, held-out loss {m['heldout']:.5f}, "
          f"accuracy {m['acc']:.4f}, {m['updates']} Adam updates [{exact.seconds:.1f} s]")
    same = all(torch.equal(a, b) for a, b in zip(exact.params, control.params))
    c = control.metrics
    print(f"    control, {args.resumes} resumes from exact checkpoints: train loss {c['train']:.5f}, "
          f"{c['updates']} updates; bit-identical to the exact run: {'yes' if same else 'NO (the harness is wrong)'} "
          f"[{control.seconds:.1f} s]")
    print(f"    {'setting':<22}{'archived':>9}{'chain':>6}{'train loss':>11}{'rel':>9}{'held-out':>10}{'rel':>9}"
          f"{'acc':>8}{'d acc':>8}{'<=1%':>6}{'x save':>8}{'x wl':>7}{'mf%':>5}{'rel L2 med/worst':>19}{'s':>5}")
    for name, r in runs.items():
        m = r.metrics
        rt, rh = relative(m["train"], exact.metrics["train"]), relative(m["heldout"], exact.metrics["heldout"])
        ok = abs(rt) <= 0.01 and abs(rh) <= 0.01 and m["updates"] == exact.metrics["updates"]
        own = med(o.total for o in r.own) if r.own else math.nan
        share = med(o.manifest / o.total for o in r.own) if r.own else math.nan
        rel_l2 = r.errors[1]
        errs = f"{med(rel_l2):.2g}/{max(rel_l2):.2g}" if rel_l2 else "-"
        print(f"    {name:<22}{r.resumed_archived:>6}/{args.resumes:<2}{med(r.chains) if r.chains else 0:>6.0f}"
              f"{m['train']:>11.5f}{rt:>+9.2%}{m['heldout']:>10.5f}{rh:>+9.2%}{m['acc']:>8.4f}"
              f"{m['acc'] - exact.metrics['acc']:>+8.4f}{'yes' if ok else 'NO':>6}{saved / own:>8.1f}"
              f"{lossless / own:>7.1f}{share:>5.0%}{errs:>19}{r.seconds:>5.0f}")
    print("    archived: resumes whose checkpoint was in the archive; chain: its median chain length; rel: the "
          "relative difference from the exact run; <=1%: both losses within 1% and the same number of updates;\n"
          "    x save / x wl: torch.save bytes / lossless weightslab bytes per checkpoint over the median own bytes "
          "of an archived checkpoint (last links + unshared exact tensors + manifest file); mf%: the manifest's share of it")


# --- workload 2: the 25 M-parameter MLP -------------------------------------------------------------


def stored_bytes(root: Path) -> int:
    """Bytes of ``<root>/objects`` (packs) plus every checkpoint manifest."""
    total = 0
    for dirpath, _, files in os.walk(root / "objects"):
        total += sum(os.stat(os.path.join(dirpath, n)).st_size for n in files if not n.startswith("."))
    return total + sum(p.stat().st_size for p in root.glob("checkpoints/*/model/*_step_*.json"))


@dataclass
class BigBase:
    root: Path  # compression off, every checkpoint exact
    experiment: str
    raw: int  # bytes of the model + optimizer tensors
    torch_save: int
    added_off: float  # median bytes a lossless checkpoint added (2..N)
    added_zstd: float
    n_params: int
    train_s: float


def big_train(args: argparse.Namespace, where: Path, compression: str) -> tuple[Path, str, list[int], int, int, int]:
    """``--checkpoints`` checkpoints of the big MLP, one step before each, into a new root."""
    torch.manual_seed(args.seed)
    model = build(args.params, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = {"lr": 1e-3, "batch_size": 32, "seed": args.seed}
    width = model[0].in_features
    root = Path(tempfile.mkdtemp(dir=where, prefix=f"big-{compression}-"))
    added = []
    with Registered(root, {"model": model, "optimizer": opt, "config": cfg}, checkpoint_frequency=1,
                    compression=compression) as system:
        for step in range(1, args.checkpoints + 1):
            opt.zero_grad(set_to_none=True)
            x, y = torch.randn(32, width), torch.randn(32, width)
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            before = stored_bytes(root)
            if not wl.checkpoint_on_step(step):
                raise RuntimeError(f"checkpoint_on_step({step}) did not save")
            system.wait()
            added.append(stored_bytes(root) - before)
        experiment = system.experiment_hash
    saved = torch_save_bytes(model, opt, where / "big.pt")
    raw = state_nbytes(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt
    gc.collect()
    return root, experiment, added, saved, raw, n_params


def big_base(args: argparse.Namespace, where: Path) -> BigBase:
    start = time.perf_counter()
    root, experiment, added_off, saved, raw, n_params = big_train(args, where, "off")
    zroot, _, added_zstd, _, _, _ = big_train(args, where, "zstd")
    shutil.rmtree(zroot)
    return BigBase(root, experiment, raw, saved, med(added_off[1:]), med(added_zstd[1:]), n_params,
                   time.perf_counter() - start)


def link_copy(source: Path, target: Path) -> None:
    """A copy of a root whose packs are hard links (they are never changed in place: a demotion writes
    new packs and renames new manifests over the old) and whose other files are real copies."""
    def copy(src: str, dst: str) -> None:
        if "/objects/" in src and not os.path.basename(src).startswith("."):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=copy)


@dataclass
class BigResult:
    own: list[OwnBytes]
    encode_mbs: float
    decode_mbs: float
    demoted: int
    chain: int
    errors: tuple[list[float], list[float]]


def big_setting(base: BigBase, setting: Setting, where: Path) -> BigResult:
    root = where / "big-archive"
    link_copy(base.root, root)
    try:
        start = time.perf_counter()
        plan = wl.prune(keep_last=2, archive=setting.archive(), root=root)
        encode_s = time.perf_counter() - start
        archived = archived_refs(root)
        if len(archived) != len(plan.demote):
            raise RuntimeError(f"{setting.name}: prune planned {len(plan.demote)} demotions, "
                               f"{len(archived)} checkpoints are archived")
        last_ref, last = archived[-1]
        start = time.perf_counter()
        loaded = wl.load(last_ref, root=root)
        decode_s = time.perf_counter() - start
        if loaded["exact"]:
            raise RuntimeError(f"wl.load({last_ref!r}) says exact, its manifest says archived")
        del loaded
        return BigResult(own=[own_bytes(root, ref, m["archive"]["base"]) for ref, m in archived],
                         encode_mbs=len(archived) * base.raw / encode_s / 1e6, decode_mbs=base.raw / decode_s / 1e6,
                         demoted=len(archived), chain=last["archive"]["chain"],
                         errors=tensor_errors([m for _, m in archived]))
    finally:
        shutil.rmtree(root)
        gc.collect()


def print_big(args: argparse.Namespace, base: BigBase, results: dict[str, BigResult], exact_mbs: float,
              elapsed: float) -> None:
    print(f"\nWorkload 2: MLP of {args.layers} square Linear layers, {base.n_params / 1e6:.1f} M parameters, Adam; "
          f"state {base.raw / 1e6:.1f} MB; {args.checkpoints} checkpoints, one step before each [{elapsed:.0f} s]")
    print(f"    per checkpoint: torch.save {base.torch_save / 1e6:.1f} MB, weightslab lossless added "
          f"{base.added_off / 1e6:.1f} MB (compression off), {base.added_zstd / 1e6:.1f} MB (zstd); "
          f"wl.load of an exact checkpoint {exact_mbs:.0f} MB/s")
    print(f"    {'setting':<22}{'MB/ckpt':>8}{'x save':>8}{'x off':>7}{'x zstd':>7}{'paper':>6}{'encode':>8}"
          f"{'decode':>8}{'chain':>6}{'max abs med/worst':>19}{'rel L2 med/worst':>18}")
    for name, r in results.items():
        own = med(o.total for o in r.own)
        max_abs, rel_l2 = r.errors
        print(f"    {name:<22}{own / 1e6:>8.2f}{base.torch_save / own:>8.1f}{base.added_off / own:>7.1f}"
              f"{base.added_zstd / own:>7.1f}{PAPER[name.split()[0]]:>6}{r.encode_mbs:>8.0f}{r.decode_mbs:>8.0f}"
              f"{r.chain:>6}{f'{med(max_abs):.2g}/{max(max_abs):.2g}':>19}{f'{med(rel_l2):.2g}/{max(rel_l2):.2g}':>18}")
    print("    MB/ckpt: median own bytes of an archived checkpoint (last links + unshared exact tensors + manifest); "
          "x save/off/zstd: torch.save / lossless weightslab bytes per checkpoint over it;\n"
          "    encode, decode: MB/s of raw state (wl.prune's demotions, wl.load of the last archived checkpoint, "
          "whose chain is 'chain' links)")


# --- main ----------------------------------------------------------------------------------------
class ExpectedNotices(logging.Filter):
    """Counts and hides the warnings every run of this benchmark causes on purpose (a resume or load of
    an archived checkpoint, a resume to a step with later checkpoints), so the others stand out."""

    PATTERNS = {"of the lossy archive": "lossy resume", "is in the lossy archive": "load of an archived checkpoint",
                "another trajectory's": "branch on a resume to an earlier step"}

    def __init__(self) -> None:
        super().__init__()
        self.hidden: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern, what in self.PATTERNS.items():
            if pattern in message:
                self.hidden[what] += 1
                return False
        return True


def show_warnings() -> ExpectedNotices:
    notices = ExpectedNotices()
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.addFilter(notices)
    logger = logging.getLogger("weightslab")
    logger.addHandler(handler)
    logger.propagate = False
    return notices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a quick run (about 1 minute): --steps 100 --params 2000000 unless given")
    parser.add_argument("--steps", type=int, default=None, help="workload 1: training steps T (default 300)")
    parser.add_argument("--resumes", type=int, default=10, help="workload 1: resumes from archived checkpoints")
    parser.add_argument("--every", type=int, default=2, help="workload 1: a checkpoint every N steps (default 2)")
    parser.add_argument("--params", type=int, default=None,
                        help="workload 2: parameters of the MLP (default 25 M; state is about 3x that in float32)")
    parser.add_argument("--layers", type=int, default=20, help="workload 2: square nn.Linear layers (default 20)")
    parser.add_argument("--checkpoints", type=int, default=5,
                        help="workload 2: checkpoints (default 5: one anchor, the last 2 exact, the rest archived)")
    parser.add_argument("--workloads", default="12", help="which workloads to run (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to create the temporary directory (default: the system's)")
    args = parser.parse_args()
    args.steps = args.steps or (100 if args.quick else 300)
    args.params = args.params or (2_000_000 if args.quick else 25_000_000)
    points = resume_points(args.steps, args.resumes, args.every) if args.every >= 1 and args.resumes >= 1 else []
    if not points or points[-1] + 2 * args.every > args.steps or any(b - a <= 2 * args.every
                                                                      for a, b in zip(points, points[1:])):
        parser.error(f"--steps {args.steps} is too few for --resumes {args.resumes} with a checkpoint every "
                     f"{args.every} steps: each resume trains 2 checkpoints past its point before the next point; "
                     f"pass --steps of at least {max(1, args.resumes) * (2 * max(1, args.every) + 2)}")
    if args.checkpoints < 4:
        parser.error(f"--checkpoints must be at least 4 (an anchor, one archived, the exact ring of 2), got "
                     f"{args.checkpoints}")
    unknown = set(args.workloads) - set("12")
    if unknown:
        parser.error(f"unknown workloads {''.join(sorted(unknown))}; choose from 1 and 2")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {os.cpu_count()} CPUs, MKL_CBWR "
          f"{os.environ['MKL_CBWR']}; settings: " + "; ".join(
              f"{s.name.split()[0]} = {s.archive().describe()}" for s in SETTINGS if s.optimizer == "lossy"))
    started = time.perf_counter()
    notices = show_warnings()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-archive-") as tmp:
        where = Path(tmp)
        args.dir = str(where)
        if "1" in args.workloads:
            t0 = time.perf_counter()
            task = Task(args.seed)
            exact, saved, raw = small_exact(task, args)
            control = small_resumed(task, None, args, where)
            runs = {s.name: small_resumed(task, s, args, where) for s in SETTINGS}
            print_small(task, args, exact, saved, raw, control, runs, time.perf_counter() - t0)
        if "2" in args.workloads:
            t0 = time.perf_counter()
            base = big_base(args, where)
            start = time.perf_counter()
            loaded = wl.load(f"{base.experiment}@{args.checkpoints}", root=base.root)
            exact_mbs = base.raw / (time.perf_counter() - start) / 1e6
            del loaded
            results = {s.name: big_setting(base, s, where) for s in SETTINGS}
            print_big(args, base, results, exact_mbs, time.perf_counter() - t0)
    print(f"total time {time.perf_counter() - started:.0f} s; expected weightslab warnings not shown: "
          + (", ".join(f"{n} {what}" for what, n in notices.hidden.items()) or "none"))
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("weightslab")]
    if leftover:
        print(f"warning: threads left running: {', '.join(leftover)}")


if __name__ == "__main__":
    main()
