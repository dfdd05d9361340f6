"""What an asynchronous save costs a training loop: the copy on the training thread, the background
write, and the step-time overhead of a save every N steps, against the disk and torch.save.

Run: ``python benchmarks/async_save.py`` (an MLP of ``--layers`` (20) square nn.Linear layers + GELU,
about ``--params`` parameters (default 25 M; Adam, so about 300 MB of float32 state), on the CPU
with torch's default number of threads (``--threads N`` to change it); about 3 minutes on a 2-core
machine), or ``--params 5000000`` for a quick run (about 1 minute). ``--dir PATH`` chooses where the
files go (default: a temporary directory under the current one, so the disk measured is the disk
written to; everything is removed at the end). Run it from outside a git work tree, or pass
``--dir``, so that a ``git add -A`` meanwhile cannot pick up the temporary files.

Everything is measured in one run, on one model and one optimizer (a training step is a forward,
the backward of an MSE loss to random targets on a random batch of ``--batch`` (16) rows, and
``Adam.step``; every tensor of the state changes at every step, so every save writes all of it):

1. disk: ``os.write`` + ``os.fsync`` of as many bytes as the state, to a new file each time (the
   time in ``os.write``, copying into the page cache, is shown apart from the fsync);
2. torch.save + fsync of ``{"model": ..., "optimizer": ...}``, to a new file each time: the
   reference for what a blocking save costs;
4. writer throughput: one training step, then ``wl.checkpoint_on_step`` (``checkpoint_frequency=1``)
   and ``system.wait()`` right after it: bytes the save added under the root / seconds from the
   ``checkpoint_on_step`` return to durability, over the disk bandwidth of 1; target >= 0.8x.
   1, 2 and 4 run interleaved, ``--warmup`` (1) untimed round (the first save allocates the host
   buffers) then ``--repeats`` (3) timed ones, median; every file is kept until all rounds are
   done, so no method writes into page cache or disk blocks another one just freed;
3. blocking: the wall time of ``wl.checkpoint_on_step(step)`` on saving steps (capture + copy into
   reused host buffers on the training thread, and any wait for room in the writer's queue), in the
   training loops of 5 that checkpoint, ``checkpoint_frequency=--save-every`` (10). The first save
   of each loop is a warm-up (the host buffers are allocated then) and is left out. Over the
   torch.save time; target <= 0.04x. The part spent waiting for the writer (backpressure) is shown;
5. step overhead: ``--pairs`` (3) rounds of one training loop of ``--steps`` (60) steps without any
   checkpoint system (nothing registered) and one with one (``checkpoint_frequency=--save-every``,
   default settings: ``backpressure="block"``, ``max_pending_saves=2``), interleaved A/B/A/B, each
   step timed (forward + backward + opt.step + checkpoint_on_step). Each loop starts
   ``--warmup-steps`` (10) steps before its first save (the warm-up save, at step ``--save-every``);
   they and the warm-up save's step are left out, the rest is whole periods, each holding one copy
   and one background write: its time is the sum of its step times, plus, with checkpointing, the
   time after the last step until the write of the last save but one is durable (so every write a
   period owes is paid; the last save's write belongs to the next period). Overhead: the median
   over the rounds of (time with / time without of the same round) - 1; target <= 1% where the
   writer keeps up (its time per save, measured in the loop, <= ``--save-every`` step times without
   checkpointing). Because a shared machine drifts between runs, it is also estimated inside each
   run with checkpointing, against that run's own steps that overlap no background write.
   Unless the overhead target is met, the measurement is repeated with a save every
   ``--fallback-every`` (50) steps (``--fallback-periods`` (2) timed periods per loop), the regime
   where the writer keeps up with room to spare.

Steps that page-fault are noise, not checkpointing: glibc's malloc gives the gradients freed by
``zero_grad(set_to_none=True)`` back to the kernel or not depending on what else sits on its heap
(on a VM the fresh pages are slow to fault in), so step times swing by 2x between runs with or
without a checkpoint system. By default (``--malloc keep``) the script asks malloc to keep freed
memory (``mallopt``: no trimming, a fixed 32 MB mmap threshold) so that steps reuse the memory of
the previous one; ``--malloc default`` leaves malloc alone. The page faults of the training thread
per step are printed either way.

For each configuration it also prints where the overhead goes: the extra time of the saving steps
(copy + backpressure waits), of the other steps (the writer thread competes with training for the
CPUs), and the wait after the last step; the median step time while the writer works against while
it is idle; the writer's wall and CPU seconds per save (a timing wrapper around
``system.manager.commit``, which changes nothing else; the backpressure wait is timed by one around
the writer's ``submit``); and the CPU time the hypervisor stole meanwhile (/proc/stat), a measure of
how noisy the machine was.

``--diagnose`` adds two arms to every round of 5: the same loop with ``system.manager.commit``
replaced by a no-op (the copy on the training thread only: nothing hashed or written), and by a
function that only hashes the copies (SHA-256 + XXH3 as the store does; nothing written), so that
the overhead splits into copy, hashing and writing.

Prints the torch and weightslab versions, the CPUs, the directory written to, the details of each
measurement, then a table (metric, measured, ratio, target, met) and a summary. It reports; it
asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

import weightslab as wl

try:
    import xxhash
except ImportError:  # the store then records no fast checksum either
    xxhash = None

try:
    import resource
except ImportError:  # not on Windows
    resource = None

med = statistics.median
WITHOUT, WITH, COPY_ONLY, HASH_ONLY = "without", "with", "copy only", "hash only"


# --- the training run ----------------------------------------------------------------------------
def build(params: int, layers: int) -> nn.Sequential:
    """``layers`` nn.Linear(d, d) with GELU between them, about ``params`` parameters in all,
    He-initialised so that activations and gradients keep their scale through every layer."""
    d = max(16, int(round(math.sqrt(params / layers) / 16)) * 16)
    modules: list[nn.Module] = []
    for i in range(layers):
        linear = nn.Linear(d, d)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        modules.append(linear)
        if i < layers - 1:
            modules.append(nn.GELU())
    return nn.Sequential(*modules)


class Trainer:
    def __init__(self, params: int, layers: int, batch: int, seed: int):
        torch.manual_seed(seed)
        self.model = build(params, layers)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.width = self.model[0].in_features
        self.batch = batch

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        x, y = torch.randn(self.batch, self.width), torch.randn(self.batch, self.width)
        (self.model(x) - y).square().mean().backward()
        self.opt.step()

    def state_bytes(self) -> int:
        total = sum(t.nbytes for t in self.model.state_dict().values())
        for per_param in self.opt.state_dict()["state"].values():
            total += sum(v.nbytes for v in per_param.values() if isinstance(v, torch.Tensor))
        return total

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# --- references: the disk, torch.save --------------------------------------------------------------
def disk_write(path: Path, data: memoryview, chunk: int = 64 << 20) -> tuple[float, float]:
    """Seconds to write ``data`` to a new file and fsync it, and of them the seconds in ``os.write``
    (copying into the page cache; the rest is the fsync)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = data
        while view.nbytes:
            n = os.write(fd, view[:chunk])
            view = view[n:]
        written = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start, written - start


def torch_save(path: Path, trainer: Trainer) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": trainer.model.state_dict(), "optimizer": trainer.opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def stored_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (temporaries of a save in progress excepted)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.startswith("."):
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def minor_faults() -> int:
    """Minor page faults of the calling thread so far (Linux), else 0."""
    if resource is None or not hasattr(resource, "RUSAGE_THREAD"):
        return 0
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def keep_heap() -> bool:
    """Ask glibc's malloc to keep freed memory (no trimming, a fixed mmap threshold of 32 MB), so
    that a training step reuses the memory of the previous one instead of taking fresh pages from
    the kernel; False where that is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat (Linux), else None: the time the
    hypervisor gave our virtual CPUs to someone else."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return (fields[7] if len(fields) > 7 else 0), sum(fields)
    except (OSError, ValueError):
        return None


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def filesystem(path: Path) -> str:
    """'<device> <fstype>' of the mount holding ``path``, from /proc/mounts (Linux), else ''."""
    try:
        best = ("", "", "")
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, fstype = line.split()[:3]
                if str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount:
                    if len(mount) >= len(best[1]):
                        best = (dev, mount, fstype)
        return f"{best[0]} ({best[2]}, mounted on {best[1]})" if best[1] else ""
    except OSError:
        return ""


# --- instrumenting a checkpoint system -------------------------------------------------------------
@dataclass
class Run:
    """One training loop: the timing of each step, and what the checkpoint system did meanwhile."""

    arm: str
    starts: list[float] = field(default_factory=list)  # perf_counter at the start of each step
    ends: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults of the training thread in each step
    saved: dict[int, float] = field(default_factory=dict)  # step -> seconds in checkpoint_on_step
    waits: dict[int, float] = field(default_factory=dict)  # step -> of which, waiting for room in the writer
    commits: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # step -> writer (start, end, cpu s)
    tail: float = 0.0  # after the last step, until the write the window owes is durable
    _wait: float = 0.0

    @property
    def steps(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends)]


def fake_commit(request: Any, *, hash_copies: bool) -> tuple[Any, dict[str, Any]]:
    """A writer that stores nothing: what ``manager.commit`` returns, enough for the system to
    recycle the snapshot's buffers. With ``hash_copies``, hashes each copy as the store would."""
    refs = {}
    for key, blob in request.blobs.items():  # (reading them waits for the background copy)
        digest = "noop"
        if hash_copies:
            view = memoryview(blob.data).cast("B")
            digest = "sha256:" + hashlib.sha256(view).hexdigest()
            if xxhash is not None:
                xxhash.xxh3_128(view).hexdigest()
        refs[key] = SimpleNamespace(digest=digest)
    manifest = SimpleNamespace(ref=request.ref, experiment=request.experiment.hash, reasons=request.reasons,
                               tensors={}, total_bytes=0)
    return manifest, refs


def instrument(system: wl.AutomaticCheckpointSystem, run: Run) -> None:
    """Time the writer's commits (wall and thread CPU) and the training thread's waits for room in
    the writer's queue. For the diagnostic arms, replace the commit."""
    real_commit = system.manager.commit
    if run.arm == COPY_ONLY:
        real_commit = lambda request: fake_commit(request, hash_copies=False)  # noqa: E731
    elif run.arm == HASH_ONLY:
        real_commit = lambda request: fake_commit(request, hash_copies=True)  # noqa: E731

    def commit(request: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return real_commit(request)
        finally:
            run.commits[request.step] = (start, time.perf_counter(), time.thread_time() - cpu)

    system.manager.commit = commit
    writer = getattr(getattr(system, "_saver", None), "_writer", None)  # (private: a diagnostic wrapper)
    real_submit: Callable[..., Any] | None = getattr(writer, "submit", None)
    if real_submit is not None:
        def submit(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real_submit(*args, **kwargs)
            finally:
                run._wait += time.perf_counter() - start

        writer.submit = submit


def open_system(root: Path, every: int, names: list[str], trainer: Trainer) -> wl.AutomaticCheckpointSystem:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=every, save_on_close=False)
    wl.register_model("model", trainer.model)
    names.append("model")
    wl.register_optimizer("optimizer", trainer.opt)
    names.append("optimizer")
    return system


def training_loop(trainer: Trainer, arm: str, steps: int, every: int, warm: int, where: Path) -> Run:
    """Training steps up to ``steps``, starting ``warm`` steps before the first save (at step
    ``every``); with a checkpoint system saving every ``every`` steps unless ``arm`` is WITHOUT.
    The lists of the result are indexed by step - 1 (steps not run count 0 s). Everything it wrote
    is removed before it returns."""
    run = Run(arm)
    first = max(1, every - warm + 1)
    for _ in range(1, first):
        run.faults.append(0)
        run.starts.append(0.0)
        run.ends.append(0.0)
    root = Path(tempfile.mkdtemp(dir=where, prefix=f"{arm.replace(' ', '-')}-"))
    system, registered = None, []
    try:
        if arm != WITHOUT:
            system = open_system(root, every, registered, trainer)
            instrument(system, run)
        for step in range(first, steps + 1):
            faults = minor_faults()
            start = time.perf_counter()
            trainer.step()
            trained = time.perf_counter()
            run._wait = 0.0
            saved = system is not None and wl.checkpoint_on_step(step)
            end = time.perf_counter()
            run.faults.append(minor_faults() - faults)
            run.starts.append(start)
            run.ends.append(end)
            if saved:
                run.saved[step] = end - trained
                run.waits[step] = run._wait
        if system is not None:
            system.wait()
            owed = run.commits.get(steps - every)
            run.tail = max(0.0, owed[1] - run.ends[-1]) if owed else 0.0
            expected = list(range(every, steps + 1, every))
            if sorted(run.saved) != expected or sorted(run.commits) != expected:
                raise RuntimeError(f"{arm}: saves at {sorted(run.saved)}, commits at {sorted(run.commits)}, "
                                   f"expected {expected}")
    finally:
        if system is not None:
            system.close()
        for name in registered:
            wl.unregister(name)
        shutil.rmtree(root, ignore_errors=True)
    return run


# --- one configuration of phase 5 ------------------------------------------------------------------
@dataclass
class Config:
    every: int
    steps: int
    warm: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    elapsed: float = 0.0
    steal: float | None = None

    @property
    def window(self) -> range:
        """0-based indices of the timed steps: every step after the first period."""
        return range(self.every, self.steps)

    def saving(self, i: int) -> bool:
        return (i + 1) % self.every == 0

    def total(self, run: Run) -> float:
        steps = run.steps
        return sum(steps[i] for i in self.window) + run.tail

    def part(self, run: Run, saving: bool) -> float:
        steps = run.steps
        return sum(steps[i] for i in self.window if self.saving(i) == saving)

    def overhead(self, arm: str) -> float:
        """Median over the rounds of (time with / time without of the same round) - 1."""
        return med(self.pair_overheads(arm))

    def pair_overheads(self, arm: str) -> list[float]:
        return [self.total(a) / self.total(b) - 1 for a, b in zip(self.runs[arm], self.runs[WITHOUT])]

    def breakdown(self, arm: str) -> tuple[float, float, float]:
        """The overhead in three parts, as shares of the time without checkpointing of the same round
        (medians over the rounds): extra time of the saving steps, of the other steps, and the wait
        after the last step."""
        parts = []
        for a, b in zip(self.runs[arm], self.runs[WITHOUT]):
            base = self.total(b)
            parts.append(((self.part(a, True) - self.part(b, True)) / base,
                          (self.part(a, False) - self.part(b, False)) / base, a.tail / base))
        return med(p[0] for p in parts), med(p[1] for p in parts), med(p[2] for p in parts)

    def step_time(self, arm: str = WITHOUT) -> float:
        """Median time of a non-saving step in the window."""
        return med(r.steps[i] for r in self.runs[arm] for i in self.window if not self.saving(i))

    def faults(self, arm: str) -> float:
        """Median minor page faults of the training thread in a non-saving step of the window."""
        return med(r.faults[i] for r in self.runs[arm] for i in self.window if not self.saving(i))

    def blocked(self, arm: str = WITH) -> tuple[list[float], list[float]]:
        """checkpoint_on_step seconds on saving steps, and the waits in them, warm-up saves excluded."""
        calls, waits = [], []
        for r in self.runs[arm]:
            for step in sorted(r.saved)[1:]:
                calls.append(r.saved[step])
                waits.append(r.waits.get(step, 0.0))
        return calls, waits

    def writer(self, arm: str = WITH) -> tuple[float, float]:
        """Median wall and thread-CPU seconds of one commit in the loops, warm-up saves excluded."""
        commits = [c for r in self.runs[arm] for step, c in sorted(r.commits.items())[1:]]
        return med(c[1] - c[0] for c in commits), med(c[2] for c in commits)

    def busy_idle(self, arm: str = WITH) -> tuple[float | None, float | None, float]:
        """Median non-saving step time while a commit runs / while none does; share of busy steps."""
        busy, idle = [], []
        for r in self.runs[arm]:
            intervals = [(c[0], c[1]) for c in r.commits.values()]
            for i in self.window:
                if self.saving(i):
                    continue
                s, e = r.starts[i], r.ends[i]
                (busy if any(a < e and s < b for a, b in intervals) else idle).append(e - s)
        n = len(busy) + len(idle)
        return (med(busy) if busy else None, med(idle) if idle else None, len(busy) / n if n else 0.0)

    def within_run(self, arm: str = WITH) -> float | None:
        """The overhead estimated inside each run, against its own steps that overlap no commit (so
        drift between runs cancels): the excess of every other step of the window over their median,
        over the window's steps at that median; the median over the runs. None without such steps."""
        estimates = []
        for r in self.runs[arm]:
            intervals = [(c[0], c[1]) for c in r.commits.values()]
            idle = [r.ends[i] - r.starts[i] for i in self.window if not self.saving(i)
                    and not any(a < r.ends[i] and r.starts[i] < b for a, b in intervals)]
            if not idle:
                continue
            base = med(idle)
            excess = sum(r.ends[i] - r.starts[i] - base for i in self.window) + r.tail
            excess -= sum(t - base for t in idle)
            estimates.append(excess / (len(self.window) * base))
        return med(estimates) if estimates else None

    def keeps_up(self) -> bool:
        return self.writer()[0] <= self.every * self.step_time()


def measure_config(trainer: Trainer, every: int, steps: int, warm: int, pairs: int, arms: list[str],
                   where: Path) -> Config:
    config = Config(every, steps, warm, {arm: [] for arm in arms})
    start, cpu = time.perf_counter(), cpu_times()
    for _ in range(pairs):
        for arm in arms:  # A/B/A/B: every arm sees the same drift of the machine
            config.runs[arm].append(training_loop(trainer, arm, steps, every, warm, where))
    config.elapsed = time.perf_counter() - start
    config.steal = steal_share(cpu, cpu_times())
    return config


def whole_periods(steps: int, every: int) -> int:
    """``steps`` rounded to whole periods of ``every`` steps, at least two (one warm-up, one timed)."""
    return max(2, round(steps / every)) * every


# --- phases 1, 2 and 4: the references and the writer alone ---------------------------------------
@dataclass
class References:
    disk: list[float] = field(default_factory=list)  # write + fsync
    disk_write: list[float] = field(default_factory=list)  # of which os.write (into the page cache)
    save: list[float] = field(default_factory=list)  # torch.save + fsync
    torch_bytes: int = 0
    background: list[float] = field(default_factory=list)  # checkpoint_on_step return -> durable
    blocked: list[float] = field(default_factory=list)  # checkpoint_on_step
    written: list[int] = field(default_factory=list)  # bytes the save added under the root
    commit_cpu: list[float] = field(default_factory=list)  # writer thread CPU seconds


def references(trainer: Trainer, nbytes: int, args: argparse.Namespace, where: Path) -> References:
    """Rounds of: the disk, torch.save, one weightslab save made durable at once; every file kept
    until the end, so that no method reuses the page cache pages or blocks another one freed."""
    out = References()
    refs = where / "references"
    refs.mkdir()
    root = refs / "weightslab"
    data = memoryview(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy())
    run = Run(WITH)
    system, registered = None, []
    try:
        system = open_system(root, 1, registered, trainer)
        instrument(system, run)
        for i in range(args.warmup + args.repeats):
            timed = i >= args.warmup
            seconds, in_write = disk_write(refs / f"disk_{i}.bin", data)
            save = torch_save(refs / f"torch_{i}.pt", trainer)
            trainer.step()  # every tensor changes: the save writes all of them
            before = stored_bytes(root)
            start = time.perf_counter()
            saved = wl.checkpoint_on_step(i + 1)
            returned = time.perf_counter()
            system.wait()
            done = time.perf_counter()
            if not saved:
                raise RuntimeError(f"checkpoint_on_step({i + 1}) did not save")
            if timed:  # the first weightslab save allocates the host buffers, writes the experiment record
                out.disk.append(seconds)
                out.disk_write.append(in_write)
                out.save.append(save)
                out.background.append(done - returned)
                out.blocked.append(returned - start)
                out.written.append(stored_bytes(root) - before)
                out.commit_cpu.append(run.commits[i + 1][2])
        out.torch_bytes = (refs / f"torch_{args.warmup + args.repeats - 1}.pt").stat().st_size
    finally:
        if system is not None:
            system.close()
        for name in registered:
            wl.unregister(name)
        shutil.rmtree(refs, ignore_errors=True)
    return out


# --- reporting -------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def print_config(c: Config, save_s: float) -> None:
    base = med(c.total(r) for r in c.runs[WITHOUT])
    step = c.step_time()
    wall, cpu = c.writer()
    calls, waits = c.blocked()
    first = max(1, c.every - c.warm + 1)
    print(f"\nsave every {c.every} steps: {len(c.runs[WITHOUT])} rounds of steps {first}..{c.steps}, timed window steps "
          f"{c.every + 1}..{c.steps} ({c.steps - c.every} steps, {(c.steps - c.every) // c.every} saves) "
          f"[{c.elapsed:.0f} s" + (f", CPU steal {c.steal:.1%}]" if c.steal is not None else "]"))
    print(f"  step time (median, no checkpointing) {step:.4f} s; {c.every} steps take {c.every * step:.3f} s; "
          f"window {base:.2f} s; page faults per step {c.faults(WITHOUT):.0f}")
    print(f"  writer per save in the loop: {wall:.3f} s wall, {cpu:.3f} s CPU of the writer thread -> "
          f"{'keeps up' if c.keeps_up() else 'does NOT keep up'} ({wall / (c.every * step):.2f}x the time of "
          f"{c.every} steps)")
    print(f"  checkpoint_on_step on saving steps (median of {len(calls)}): {med(calls):.4f} s = "
          f"{med(calls) / save_s:.3f}x torch.save; of which waiting for the writer {med(waits):.4f} s "
          f"(max {max(waits):.3f} s)")
    for arm in c.runs:
        if arm == WITHOUT:
            continue
        saving, other, tail = c.breakdown(arm)
        busy, idle, share = c.busy_idle(arm)
        pairs = ", ".join(pct(x) for x in c.pair_overheads(arm))
        inside = c.within_run(arm)
        print(f"  [{arm}] overhead {pct(c.overhead(arm))} (rounds: {pairs}) ~ saving steps {pct(saving)} + "
              f"other steps {pct(other)} + wait after the last step {pct(tail)}; estimated within the runs "
              f"{pct(inside) if inside is not None else '-'}")
        fmt = lambda v: f"{v:.4f} s" if v is not None else "-"  # noqa: E731
        a_wall, a_cpu = c.writer(arm)
        a_calls, _ = c.blocked(arm)
        print(f"      checkpoint_on_step {med(a_calls):.4f} s; writer {a_wall:.3f} s wall / {a_cpu:.3f} s CPU per "
              f"save; non-saving step while the writer works {fmt(busy)} ({share:.0%} of them), while idle "
              f"{fmt(idle)}, without checkpointing {c.step_time():.4f} s; page faults per step {c.faults(arm):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000,
                        help="parameters of the model (default 25 M; the state is about 3x that in float32)")
    parser.add_argument("--layers", type=int, default=20, help="square nn.Linear layers (default 20)")
    parser.add_argument("--batch", type=int, default=16, help="rows of the random training batch (default 16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for training (default 0: torch's default)")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: tell glibc's malloc to keep freed memory, so that steps do not page-fault "
                             "(default); default: leave malloc as it is")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint_frequency of phases 3 and 5")
    parser.add_argument("--steps", type=int, default=60,
                        help="steps per training loop of phase 5, rounded to whole periods (default 60)")
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="untimed steps of each loop of phase 5 before its first (warm-up) save (default 10)")
    parser.add_argument("--pairs", type=int, default=3, help="A/B rounds of phase 5 (default 3)")
    parser.add_argument("--fallback-every", type=int, default=50,
                        help="if the writer cannot keep up, also measure a save every this many steps "
                             "(default 50; 0: never)")
    parser.add_argument("--fallback-periods", type=int, default=2,
                        help="timed periods per loop of the fallback configuration (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of phases 1, 2 and 4 (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of phases 1, 2 and 4")
    parser.add_argument("--diagnose", action="store_true",
                        help="also run loops whose writer does nothing (copy only) or only hashes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=".",
                        help="where to create the temporary directory (default: the current directory)")
    args = parser.parse_args()
    if min(args.save_every, args.pairs, args.repeats, args.warmup, args.warmup_steps) < 1:
        parser.error("--save-every, --pairs, --repeats, --warmup and --warmup-steps must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    heap = keep_heap() if args.malloc == "keep" else False

    started = time.perf_counter()
    trainer = Trainer(args.params, args.layers, args.batch, args.seed)
    for _ in range(3):  # Adam state exists, the allocator is warm
        trainer.step()
    nbytes = trainer.state_bytes()
    arms = [WITHOUT, WITH]
    if args.diagnose:
        arms += [COPY_ONLY, HASH_ONLY]
    steps = whole_periods(args.steps, args.save_every)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-bench-async-") as tmp:
        where = Path(tmp).resolve()
        print(f"torch {torch.__version__}, weightslab {wl.__version__}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} torch threads; xxhash {'yes' if xxhash else 'no'}; malloc "
              f"{'keeps freed memory (--malloc keep)' if heap else 'as it is' + (' (not glibc?)' if args.malloc == 'keep' else '')}")
        print(f"files under {where}  {filesystem(where)}")
        print(f"model: {args.layers} x nn.Linear({trainer.width}, {trainer.width}) + GELU, "
              f"{trainer.n_params / 1e6:.1f} M parameters, Adam, batch {args.batch}; state {nbytes / 1e6:.1f} MB "
              f"(parameters + exp_avg + exp_avg_sq)")
        if steps != args.steps:
            print(f"(--steps {args.steps} rounded to {steps}, whole periods of {args.save_every})")

        # 1, 2 and 4, interleaved
        ref = references(trainer, nbytes, args, where)
        disk_s, save_s = med(ref.disk), med(ref.save)
        disk_bw = nbytes / disk_s / 1e9
        bg_s, written = med(ref.background), med(ref.written)
        bg_bw = written / bg_s / 1e9
        spread = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}"  # noqa: E731
        print(f"\n1. disk write + fsync of {nbytes / 1e6:.1f} MB to a new file: {disk_s:.3f} s ({spread(ref.disk)}) "
              f"= {disk_bw:.3f} GB/s; of it os.write (into the page cache) {med(ref.disk_write):.3f} s, "
              f"fsync {med(d - w for d, w in zip(ref.disk, ref.disk_write)):.3f} s")
        print(f"2. torch.save + fsync ({ref.torch_bytes / 1e6:.1f} MB): {save_s:.3f} s ({spread(ref.save)}) "
              f"= {ref.torch_bytes / save_s / 1e9:.3f} GB/s")
        print(f"4. writer alone (wait() right after each save): {written / 1e6:.1f} MB written per save in "
              f"{bg_s:.3f} s ({spread(ref.background)}) = {bg_bw:.3f} GB/s = {bg_bw / disk_bw:.2f}x the disk; "
              f"writer thread CPU {med(ref.commit_cpu):.3f} s per save; checkpoint_on_step {med(ref.blocked):.4f} s")

        # 3 and 5: training loops with and without checkpointing, interleaved
        main_cfg = measure_config(trainer, args.save_every, steps, args.warmup_steps, args.pairs, arms, where)
        print_config(main_cfg, save_s)
        configs = [main_cfg]
        if (not main_cfg.keeps_up() or main_cfg.overhead(WITH) > 0.01) and args.fallback_every > args.save_every:
            every = args.fallback_every
            why = "does not keep up" if not main_cfg.keeps_up() else "keeps up but the overhead misses its target"
            print(f"\nwith a save every {args.save_every} steps the writer {why}: also measuring a save every "
                  f"{every} steps")
            configs.append(measure_config(trainer, every, every * (1 + args.fallback_periods), args.warmup_steps,
                                          args.pairs, arms, where))
            print_config(configs[-1], save_s)

    leftover = [t.name for t in threading.enumerate() if t.name.startswith("weightslab")]

    # --- the table ---
    header = ("metric", "measured", "ratio", "target", "met")
    rows: list[tuple[str, str, str, str, str]] = []

    def row(metric: str, measured: str, ratio: str = "", target: str = "", met: bool | str | None = None) -> None:
        m = met if isinstance(met, str) else ("" if met is None else ("yes" if met else "NO"))
        rows.append((metric, measured, ratio, target, m))

    row("disk write + fsync", f"{disk_bw:.3f} GB/s ({disk_s:.3f} s)")
    row("torch.save + fsync", f"{save_s:.3f} s", f"{save_s / disk_s:.2f}x disk")
    for c in configs:
        calls, waits = c.blocked()
        b = med(calls)
        row(f"checkpoint_on_step, save every {c.every}", f"{b:.4f} s", f"{b / save_s:.3f}x save", "<= 0.04x",
            b / save_s <= 0.04)
        if max(waits) > 0.001:
            copy = med(x - w for x, w in zip(calls, waits))
            row("  without backpressure waits", f"{copy:.4f} s", f"{copy / save_s:.3f}x save", "<= 0.04x",
                copy / save_s <= 0.04)
    row("writer: return -> durable", f"{bg_bw:.3f} GB/s ({bg_s:.3f} s)", f"{bg_bw / disk_bw:.2f}x disk",
        ">= 0.8x", bg_bw / disk_bw >= 0.8)
    for c in configs:
        wall, _ = c.writer()
        period = c.every * c.step_time()
        row(f"writer keeps up, save every {c.every}", f"{wall:.3f} s/save vs {period:.3f} s",
            f"{wall / period:.2f}x", "<= 1x", wall <= period)
        over = c.overhead(WITH)
        row(f"step overhead, save every {c.every}", pct(over), "", "<= 1%",
            (over <= 0.01) if c.keeps_up() else "n/a (writer behind)")
        inside = c.within_run(WITH)
        if inside is not None:
            row("  estimated within the runs", pct(inside), "", "<= 1%",
                (inside <= 0.01) if c.keeps_up() else "n/a (writer behind)")
        for arm in arms[2:]:
            inside = c.within_run(arm)
            row(f"  diagnose: {arm}", pct(c.overhead(arm)) + (f" (within {pct(inside)})" if inside is not None else ""))
    widths = [max(len(r[k]) for r in [header] + rows) for k in range(5)]
    print()
    for r in [header] + rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)).rstrip())

    # --- the summary ---
    for i, c in enumerate(configs):
        wall, cpu = c.writer()
        period = c.every * c.step_time()
        lead = "\nsummary:" if i == 0 else "        "
        busy, idle, share = c.busy_idle()
        if c.keeps_up():
            print(f"{lead} a save every {c.every} steps: the writer keeps up ({wall:.3f} s per save in the loop, "
                  f"{cpu:.3f} s of it on a CPU; {c.every} steps take {period:.3f} s); overhead {pct(c.overhead(WITH))}")
        else:
            print(f"{lead} a save every {c.every} steps: the writer CANNOT keep up here: one save writes "
                  f"{written / 1e6:.0f} MB and takes {wall:.3f} s in the loop ({cpu:.3f} s of it on a CPU), "
                  f"{c.every} steps take {period:.3f} s (keeping up would need {written / period / 1e9:.2f} GB/s; "
                  f"the disk reference does {disk_bw:.3f} GB/s, the writer alone {bg_bw:.3f} GB/s); overhead "
                  f"{pct(c.overhead(WITH))}")
        saving, other, tail = c.breakdown(WITH)
        if busy is not None and idle is not None:
            print(f"          where it goes: saving steps (copy) {pct(saving)}, other steps {pct(other)}, wait after the "
                  f"last step {pct(tail)}; a step overlapping the writer takes {busy:.3f} s, one that does not "
                  f"{idle:.3f} s ({busy / idle:.1f}x)")
    print(f"total time {time.perf_counter() - started:.0f} s")
    if leftover:
        print(f"warning: threads left running: {', '.join(leftover)}")


if __name__ == "__main__":
    main()
