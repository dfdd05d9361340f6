"""What a save costs the training loop now that every tensor is copied and the copy overlaps the next
step: blocked time per save against torch.save and DCP's async_save, the 90%-frozen case, the
writer's CPU per GB, the steps that overlap a background write, bytes on disk, and a loop that saves
faster than the disk writes, under backpressure "block" and "latest".

Run: ``python benchmarks/overlap.py`` (an MLP of ``--layers`` (20) square nn.Linear layers + GELU,
about ``--params`` (25 M) parameters, Adam: about 300 MB of state; on the CPU; about 4 minutes on a
2-core machine) or ``--params 5000000`` for a quick run. ``--dir`` chooses where files go (default:
a temporary directory under the current one, removed at the end); run it from outside a git work
tree or pass ``--dir``.

Measured in one run, on the same model:

1. references: ``torch.save`` of ``{"model", "optimizer"}`` state dicts to a new file *without*
   fsync (what the issue's ratios are to), and DCP's ``async_save`` in a one-process gloo group: the
   time until it returns (its staging copy), median of ``--repeats``;
2. blocked per save: the time in ``wl.checkpoint_on_step`` on a saving step plus the time the next
   ``optimizer.step()`` waits for the background copy (measured between two optimizer pre-step hooks
   of the script's own, one registered before weightslab's and one after), over ``--saves`` saves,
   a save every ``--every`` steps, for the model trained whole and with 90% of its layers frozen;
3. writer CPU per GB: the CPU time of the writer thread in ``manager.commit`` (a timing wrapper
   around it) per GB of state saved;
4. steps overlapping a background write: the median time of the steps that ran while a save's copy
   or commit was in flight, against the median step of the same loop with no checkpoint system;
5. bytes on disk per save added, against the bytes of the tensors that changed (the frozen case
   shows what dedupe by content keeps);
6. disk-bound: a save every ``--fast-every`` (2) steps, more than the disk can write, under
   ``backpressure="block"`` and ``"latest"``: blocked time per save, step time, saves committed and
   replaced.

It prints a table of figures and ratios; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

import weightslab as wl
from async_save import stored_bytes  # (a sibling script: run this one as a script too)

med = statistics.median


def build(params: int, layers: int) -> nn.Sequential:
    d = max(16, int(round(math.sqrt(params / layers) / 16)) * 16)
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(d, d))
        if i < layers - 1:
            modules.append(nn.GELU())
    return nn.Sequential(*modules)


class Trainer:
    def __init__(self, params: int, layers: int, *, frozen: float = 0.0, batch: int = 16, seed: int = 0):
        torch.manual_seed(seed)
        self.model = build(params, layers)
        linears = [m for m in self.model if isinstance(m, nn.Linear)]
        for layer in linears[: int(round(frozen * len(linears)))]:
            layer.requires_grad_(False)
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.width, self.batch = linears[0].in_features, batch
        self.step()  # Adam's state exists from here on

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        x, y = torch.randn(self.batch, self.width), torch.randn(self.batch, self.width)
        (self.model(x) - y).square().mean().backward()
        self.opt.step()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def state_bytes(self) -> int:
        total = sum(t.nbytes for t in self.model.state_dict().values())
        for s in self.opt.state_dict()["state"].values():
            total += sum(v.nbytes for v in s.values() if isinstance(v, torch.Tensor))
        return total


# --- references ----------------------------------------------------------------------------------
def torch_save_seconds(trainer: Trainer, where: Path, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        path = where / f"torch-{i}.pt"
        start = time.perf_counter()
        torch.save(trainer.state(), path)  # no fsync: the reference of the ratios
        times.append(time.perf_counter() - start)
    return med(times[1:])


def dcp_async_seconds(trainer: Trainer, where: Path, repeats: int) -> float | None:
    """Seconds until DCP's async_save returns, in a one-process gloo group; None if unavailable."""
    import torch.distributed as dist

    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return None
    owned = False
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        owned = True
    try:
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            future = dcp.async_save(trainer.state(), checkpoint_id=str(where / f"dcp-{i}"))
            times.append(time.perf_counter() - start)
            future.result()
        return med(times[1:])
    finally:
        if owned:
            dist.destroy_process_group()


# --- a loop with a checkpoint system ---------------------------------------------------------------
@dataclass
class Loop:
    blocked: list[float] = field(default_factory=list)  # boundary + pre-step wait, per save
    boundary: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    overlapped: list[float] = field(default_factory=list)  # steps while a save was in flight
    writer_cpu: list[float] = field(default_factory=list)  # CPU seconds of each commit
    committed: int = 0
    dropped: int = 0
    added_bytes: list[int] = field(default_factory=list)


@contextmanager
def timed_commits(system: wl.AutomaticCheckpointSystem, loop: Loop, busy: list[bool]) -> Iterator[None]:
    real = system.manager.commit

    def commit(request: Any) -> Any:
        busy[0] = True
        cpu = time.thread_time()
        try:
            return real(request)
        finally:
            loop.writer_cpu.append(time.thread_time() - cpu)
            busy[0] = False

    system.manager.commit = commit
    try:
        yield
    finally:
        system.manager.commit = real


def run_loop(trainer: Trainer, root: Path, *, every: int, saves: int, settings: dict[str, Any],
             measure_bytes: bool = False) -> Loop:
    loop = Loop()
    marks: dict[str, float] = {}
    first = trainer.opt.register_step_pre_hook(lambda *a: marks.__setitem__("before", time.perf_counter()))
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=every, save_on_close=False, **settings)
    wl.register_model("model", trainer.model)
    wl.register_optimizer("optimizer", trainer.opt)  # weightslab's pre-step hook: after "before"
    handle = trainer.opt.register_step_pre_hook(lambda *a: marks.__setitem__("after", time.perf_counter()))
    busy = [False]
    try:
        with timed_commits(system, loop, busy):
            last_saved: float | None = None
            previous_bytes = stored_bytes(root)
            after_save = False
            for step in range(1, every * (saves + 1) + 1):
                start = time.perf_counter()
                overlapping = busy[0] or after_save  # (the step after a save runs beside its copy)
                marks.clear()
                trainer.step()
                if last_saved is not None:  # the step after a save: its optimizer may have waited
                    wait = marks.get("after", 0.0) - marks.get("before", 0.0)
                    loop.waits.append(wait)
                    loop.blocked.append(last_saved + wait)
                    last_saved = None
                boundary_start = time.perf_counter()
                saved = wl.checkpoint_on_step(step)
                end = time.perf_counter()
                overlapping = overlapping or busy[0]
                (loop.overlapped if overlapping else loop.steps).append(end - start)
                after_save = saved
                if saved and step > every:  # the first save allocates the host buffers: left out
                    loop.boundary.append(end - boundary_start)
                    last_saved = end - boundary_start
                if measure_bytes and saved:
                    system.wait()
                    now = stored_bytes(root)
                    loop.added_bytes.append(now - previous_bytes)
                    previous_bytes = now
            system.wait()
    finally:
        first.remove()
        handle.remove()
        system.close()
        wl.unregister("model")
        wl.unregister("optimizer")
    manager = wl.CheckpointManager(root)
    loop.committed = len(manager.checkpoints())
    loop.dropped = system.skipped
    return loop


def plain_steps(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--every", type=int, default=10, help="steps between saves (blocked time)")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--slow-every", type=int, default=50, help="steps between saves (overlapped steps)")
    parser.add_argument("--fast-every", type=int, default=2, help="steps between saves (disk-bound)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="weightslab-overlap-", dir=args.dir or Path.cwd()))
    rows: list[tuple[str, str, str]] = []
    try:
        whole = Trainer(args.params, args.layers)
        state_gb = whole.state_bytes() / 1e9
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {sum(p.numel() for p in whole.model.parameters()):,} "
              f"parameters, state {state_gb * 1e3:.0f} MB; files under {base}")
        t_save = torch_save_seconds(whole, base, args.repeats)
        t_dcp = dcp_async_seconds(whole, base, args.repeats)
        rows.append(("torch.save (no fsync)", f"{t_save:.3f} s", "1x"))
        if t_dcp is not None:
            rows.append(("DCP async_save returns after", f"{t_dcp:.3f} s", f"{t_dcp / t_save:.3f}x torch.save"))

        for label, trainer in (("whole model", whole), ("90% frozen", Trainer(args.params, args.layers, frozen=0.9))):
            loop = run_loop(trainer, base / f"blocked-{label[:5]}", every=args.every, saves=args.saves,
                            settings={}, measure_bytes=True)
            blocked = med(loop.blocked)
            rows.append((f"blocked per save, {label}", f"{blocked * 1e3:.1f} ms (boundary {med(loop.boundary) * 1e3:.1f}"
                         f" + wait {med(loop.waits) * 1e3:.1f})", f"{blocked / t_save:.3f}x torch.save"))
            if t_dcp is not None:
                rows.append(("", "", f"{blocked / t_dcp:.2f}x DCP async_save"))
            gb = trainer.state_bytes() / 1e9
            rows.append((f"writer CPU per GB, {label}", f"{med(loop.writer_cpu) / gb:.2f} CPU-s/GB", "target <= 1.0"))
            added = med(loop.added_bytes[1:]) if len(loop.added_bytes) > 1 else float("nan")
            rows.append((f"bytes added per save, {label}", f"{added / 1e6:.1f} MB", f"{added / (gb * 1e9):.3f}x the state"))

        loop = run_loop(whole, base / "slow", every=args.slow_every, saves=3, settings={})
        plain = med(plain_steps(whole, 30))
        over = med(loop.overlapped) if loop.overlapped else float("nan")
        rows.append((f"step overlapping a save (every {args.slow_every})", f"{over * 1e3:.1f} ms vs {plain * 1e3:.1f} ms",
                     f"{over / plain:.2f}x a plain step"))
        rows.append(("  steps that overlapped", f"{len(loop.overlapped)} of {len(loop.overlapped) + len(loop.steps)}", ""))

        for mode in ("block", "latest"):
            loop = run_loop(whole, base / f"fast-{mode}", every=args.fast_every, saves=10,
                            settings={"backpressure": mode})
            steps = loop.steps + loop.overlapped
            rows.append((f"save every {args.fast_every} steps, {mode!r}", f"blocked {med(loop.blocked) * 1e3:.1f} ms",
                         f"{med(loop.blocked) / t_save:.3f}x torch.save"))
            rows.append(("", f"step {med(steps) * 1e3:.1f} ms", f"{med(steps) / plain:.2f}x a plain step"))
            rows.append(("", f"{loop.committed} committed, {loop.dropped} replaced", ""))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    width = max(len(r[0]) for r in rows) + 2
    print()
    for name, value, ratio in rows:
        print(f"{name:<{width}}{value:<40}{ratio}")


if __name__ == "__main__":
    main()
