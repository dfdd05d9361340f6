"""Save and restore cost of a full training state, against raw disk bandwidth and torch.save/torch.load.

Run: ``python benchmarks/save_restore.py`` (about 400 MB of state: an MLP of nn.Linear blocks, its
parameters plus Adam's exp_avg/exp_avg_sq after one step), or ``--megabytes 50`` for a quick run;
``--dir PATH`` chooses where the files go (default: a temporary directory under the current one,
so the disk measured is the disk written to; it is removed at the end).

Everything is measured in one run on the same state, each number the median of ``--repeats`` (3)
repetitions after ``--warmup`` (1) untimed round, interleaved so that every method sees the same
machine conditions. Every write goes to a new file that is kept until the end, as weightslab's
packs are: no method gets to reuse the blocks another one just freed.

* disk write + fsync: the same number of bytes written as one file with ``os.write`` + ``os.fsync``;
* torch.save + fsync of ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}``;
* weightslab blocking: the wall time of ``wl.checkpoint_on_step(step)`` on a saving step (capture and
  copy of every tensor on the calling thread), then the background write: the time until
  ``system.wait()`` returns (hash, write one pack + manifest, fsync, rename). Parameters and
  optimizer state are perturbed in place before each save so that every save writes all of its
  bytes (weightslab would otherwise skip the unchanged ones: ``benchmarks/storage.py`` measures that);
* restore: ``system.resume("<hash>@<step>")`` against ``torch.load(weights_only=True)`` +
  ``model.load_state_dict`` + ``optimizer.load_state_dict`` of the torch.save file. The page cache
  cannot be dropped without root, so both read files that are warm in the page cache;
* bytes on disk of one checkpoint (the blobs it references + its manifest) against the torch.save file.

Prints a table of seconds, GB/s, the ratio to each reference and the targets of DESIGN.md
(blocking <= 0.04x torch.save, background write >= 0.8x disk bandwidth, restore <= 1.2x
torch.load). It reports; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

import weightslab as wl

BLOCKS = 8  # nn.Linear(d, 4d) + GELU + nn.Linear(4d, d) per block, after a LayerNorm


def build(megabytes: float) -> nn.Module:
    """An MLP whose parameters plus Adam's two moment buffers take about ``megabytes`` MB (float32)."""
    params = megabytes * 1e6 / (3 * 4)  # parameter, exp_avg, exp_avg_sq: 3 float32 per parameter
    d = max(16, int(round(math.sqrt(params / (8 * BLOCKS)) / 16)) * 16)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)]
    return nn.Sequential(*layers)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(t.nbytes for t in model.state_dict().values())
    for per_param in opt.state_dict()["state"].values():
        total += sum(v.nbytes for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def disk_write(path: Path, data: memoryview, chunk: int = 64 << 20) -> float:
    """Seconds to write ``data`` to a new file and fsync it."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = data
        while view.nbytes:
            n = os.write(fd, view[:chunk])
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def torch_save(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def torch_restore(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    return time.perf_counter() - start


def perturb(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Change every tensor of the state (as a training step does), so each save writes all of it:
    weightslab skips tensors that did not change, and this benchmark measures a full save."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.add_(1e-6)


def checkpoint_files(system: wl.AutomaticCheckpointSystem, ref: str) -> tuple[int, int]:
    """(bytes of the blobs one committed checkpoint references, bytes of its manifest)."""
    entry = system.manager.candidates(ref)[0]
    manifest = system.manager.read_manifest(entry)
    blobs = {e.blob.digest: e.blob.nbytes for e in manifest.tensors.values()}
    return sum(blobs.values()), entry.path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=400.0,
                        help="size of the whole state (parameters + Adam moments), in MB (default 400)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--dir", default=".",
                        help="where to create the temporary directory (default: the current directory)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.megabytes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    width = model[1].in_features
    opt.zero_grad(set_to_none=True)
    model(torch.randn(8, width)).square().mean().backward()
    opt.step()  # creates exp_avg / exp_avg_sq
    opt.zero_grad(set_to_none=True)
    nbytes = state_bytes(model, opt)
    n_params = sum(p.numel() for p in model.parameters())

    disk, tsave, block, background, durable = [], [], [], [], []
    wl_restore, t_restore = [], []
    registered: list[str] = []
    system = None
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-bench-") as tmp:
        root = Path(tmp)
        data = memoryview(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy())
        try:
            system = wl.get_checkpoint_system(root_log_dir=root / "weightslab", checkpoint_frequency=1,
                                              save_on_close=False)
            wl.register_model("model", model)
            registered.append("model")
            wl.register_optimizer("optimizer", opt)
            registered.append("optimizer")

            step = 0
            for i in range(args.warmup + args.repeats):
                timed = i >= args.warmup
                # 2. raw disk bandwidth: the same number of bytes, one new file + fsync
                seconds = disk_write(root / f"disk_{i}.bin", data)
                if timed:
                    disk.append(seconds)
                # 3. torch.save + fsync, to a new file
                torch_file = root / f"torch_{i}.pt"
                seconds = torch_save(torch_file, model, opt)
                if timed:
                    tsave.append(seconds)
                # 4. weightslab: the blocking call, then the background write until durable
                perturb(model, opt)
                step += 1
                start = time.perf_counter()
                saved = wl.checkpoint_on_step(step)
                returned = time.perf_counter()
                system.wait()
                done = time.perf_counter()
                if not saved:
                    raise RuntimeError(f"checkpoint_on_step({step}) did not save")
                if timed:
                    block.append(returned - start)
                    background.append(done - returned)
                    durable.append(done - start)
            ref = f"{system.experiment_hash}@{step}"
            written = system.manager.read_manifest(system.manager.candidates(ref)[0]).total_bytes

            # 5. restore of the last checkpoint and the last torch.save file, both warm in the page cache
            for i in range(args.warmup + args.repeats):
                start = time.perf_counter()
                restored = system.resume(ref)
                seconds = time.perf_counter() - start
                if restored != step:
                    raise RuntimeError(f"resume({ref!r}) returned step {restored}")
                t_seconds = torch_restore(torch_file, model, opt)
                if i >= args.warmup:
                    wl_restore.append(seconds)
                    t_restore.append(t_seconds)

            # 6. bytes on disk
            pack_bytes, manifest_bytes = checkpoint_files(system, ref)
            torch_bytes = torch_file.stat().st_size
        finally:
            if system is not None:
                system.close()
            for name in registered:
                wl.unregister(name)
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("weightslab")]

    med = statistics.median
    disk_s, save_s, block_s, bg_s = med(disk), med(tsave), med(block), med(background)
    wl_load_s, t_load_s = med(wl_restore), med(t_restore)
    disk_bw = nbytes / disk_s / 1e9
    bg_bw = written / bg_s / 1e9

    def row(what: str, samples: list[float], nbytes_moved: int | None, ratio: float | None = None,
            ref_name: str = "", target: str = "", met: bool | None = None) -> None:
        seconds = med(samples)
        spread = f"{min(samples):.3f}-{max(samples):.3f}"
        g = f"{nbytes_moved / seconds / 1e9:6.2f}" if nbytes_moved is not None else f"{'-':>6}"
        r = f"{ratio:7.3f}x" if ratio is not None else f"{'':>8}"
        m = "" if met is None else ("yes" if met else "NO")
        print(f"{what:<32}{seconds:8.3f} {spread:>13}  {g}  {r}  {ref_name:<15}{target:<9}{m}".rstrip())

    print(f"model: {BLOCKS} blocks of LayerNorm+Linear({width},{4 * width})+GELU+Linear({4 * width},{width}), "
          f"{n_params / 1e6:.1f} M parameters, Adam after one step")
    print(f"state: {nbytes / 1e6:.1f} MB (parameters + exp_avg + exp_avg_sq); weightslab checkpoint holds "
          f"{written / 1e6:.1f} MB of tensors")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"files under {Path(args.dir).resolve()}; median (min-max) of {args.repeats} after {args.warmup} warm-up")
    print(f"{'what':<32}{'seconds':>8} {'(min-max)':>13}  {'GB/s':>6}  {'ratio':>8}  {'vs':<15}{'target':<9}met")
    row("disk write + fsync (same bytes)", disk, nbytes)
    row("torch.save + fsync", tsave, nbytes, save_s / disk_s, "disk write")
    row("weightslab checkpoint_on_step", block, None, block_s / save_s, "torch.save", "<= 0.04x",
        block_s / save_s <= 0.04)
    row("weightslab background write", background, written, bg_bw / disk_bw, "disk bandwidth", ">= 0.8x",
        bg_bw / disk_bw >= 0.8)
    row("weightslab step -> durable", durable, written, med(durable) / save_s, "torch.save")
    row("torch.load + load_state_dict", t_restore, nbytes)
    row("weightslab resume", wl_restore, written, wl_load_s / t_load_s, "torch.load", "<= 1.2x",
        wl_load_s / t_load_s <= 1.2)
    print("restore: both files warm in the page cache (no root to drop it); reads come from memory, not disk")
    print(f"bytes on disk: weightslab blobs + manifest {pack_bytes + manifest_bytes:,} "
          f"({pack_bytes:,} + {manifest_bytes:,}) vs torch.save file {torch_bytes:,} "
          f"-> {(pack_bytes + manifest_bytes) / torch_bytes:.3f}x")
    if leftover:
        print(f"warning: threads left running: {', '.join(leftover)}")

if __name__ == "__main__":
    main()
