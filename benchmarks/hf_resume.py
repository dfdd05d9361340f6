"""The Hugging Face Trainer's own checkpoints against weightslab's, after a SIGKILL mid-epoch (CPU, ~2 minutes).

Every run is tests/scripts/hf_train.py (a tiny BERT with dropout, 2 loader workers, AdamW, a linear
schedule, an evaluation every 6 steps, 25 steps of 10 batches per epoch) in a fresh process with
MKL's strict mode and one thread. A run killed at step 12 (mid-epoch, right after an evaluation) is
resumed in a fresh process and its final state (parameters, optimizer, scheduler, log history, next
random draws, and the batch of every step) compared byte for byte with an uninterrupted run's:

- ``native``: the Trainer's own checkpoints (``save_steps=4``, ``resume_from_checkpoint=True``);
  then the same with the newest ``checkpoint-12`` as a kill during its save leaves it (the Trainer
  writes model, optimizer + scheduler, RNG, ``trainer_state.json`` in this order, without fsync)
  or as a power loss leaves unsynced data (zeros);
- ``weightslab``: WeightslabTrainerCallback (``save_strategy="no"``), resumed with ``resume_from``;
  then the same with the newest checkpoint's pack damaged.

    python benchmarks/hf_resume.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "hf_train.py"
ENV = {**os.environ, "MKL_CBWR": "AVX2,STRICT", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
KILL_AT = 12


def run(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(root), str(out), *extra], env=ENV, capture_output=True,
                          text=True, timeout=600)


def kill_at_ready(root: Path, out: Path, *extra: str) -> None:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), "--pause-at", str(KILL_AT), *extra],
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "READY":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def compare(straight: Path, out: Path) -> str:
    import json

    if not Path(str(out) + ".json").exists():
        return "-"
    same = all(Path(str(straight) + s).read_bytes() == Path(str(out) + s).read_bytes()
               for s in (".safetensors", ".json"))
    mine = json.loads(Path(str(out) + ".batches.json").read_text())
    theirs = json.loads(Path(str(straight) + ".batches.json").read_text())
    batches = all(theirs.get(k) == v for k, v in mine.items())
    return ("identical" if same else "DIFFERENT") + ("" if batches else ", other batches")


def outcome(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
        error, _, message = last.partition(": ")
        shown = message.rsplit("/", 1)[-1].rstrip("'")[:60]
        return f"crash: {error} ({shown})"
    start = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("START_STEP"))
    return f"resumed at step {start}"


def damage_native(checkpoint: Path, how: str) -> None:
    if how == "killed before trainer_state.json":
        (checkpoint / "trainer_state.json").unlink()
    elif how == "killed before rng_state.pth":
        (checkpoint / "trainer_state.json").unlink()
        (checkpoint / "rng_state.pth").unlink()
    elif how == "killed mid-save, then deleted by hand":
        import shutil
        shutil.rmtree(checkpoint)
    elif how == "killed writing optimizer.pt":
        for name in ("trainer_state.json", "rng_state.pth", "scheduler.pt"):
            (checkpoint / name).unlink()
        path = checkpoint / "optimizer.pt"
        os.truncate(path, path.stat().st_size // 2)
    elif how == "power loss: weights not flushed":
        path = checkpoint / "model.safetensors"
        size = path.stat().st_size
        with open(path, "r+b") as f:  # the header is intact, the last quarter of the tensors zeros
            f.seek(size - size // 4)
            f.write(bytes(size // 4))
    else:
        raise ValueError(how)


def damage_weightslab(root: Path) -> None:
    """Zero the end of the newest pack (the save of step 12): bytes that do not match their digest."""
    packs = sorted((root / "objects").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    path = packs[-1]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 64)
        f.write(bytes(64))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        started = time.perf_counter()
        straight = base / "straight"
        run(base / "s-root", straight, "--native", "--output-dir", str(base / "s-out"))
        wl_straight = base / "wl-straight"
        run(base / "ws-root", wl_straight)
        rows.append(("straight", "native vs weightslab", compare(straight, wl_straight)))

        cases = ["complete", "killed before trainer_state.json", "killed before rng_state.pth",
                 "killed writing optimizer.pt", "killed mid-save, then deleted by hand",
                 "power loss: weights not flushed"]
        for i, how in enumerate(cases):
            root, outdir, out = base / f"n{i}-root", base / f"n{i}-out", base / f"n{i}"
            kill_at_ready(root, out, "--native", "--output-dir", str(outdir))
            if how != "complete":
                damage_native(outdir / f"checkpoint-{KILL_AT}", how)
            proc = run(root, out, "--native", "--output-dir", str(outdir))
            rows.append(("native", f"checkpoint-{KILL_AT} {how}", f"{outcome(proc)}; {compare(straight, out)}"))

        for i, how in enumerate(["complete", "newest pack damaged"]):
            root, out = base / f"w{i}-root", base / f"w{i}"
            kill_at_ready(root, out)
            if how != "complete":
                damage_weightslab(root)
            proc = run(root, out)
            rows.append(("weightslab", f"step {KILL_AT} {how}", f"{outcome(proc)}; {compare(straight, out)}"))
        elapsed = time.perf_counter() - started

    width = max(len(r[1]) for r in rows)
    for kind, case, result in rows:
        print(f"{kind:<11} {case:<{width}}  {result}")
    print(f"({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
