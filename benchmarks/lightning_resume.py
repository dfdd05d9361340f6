"""A Lightning run killed mid-epoch and resumed: Lightning's own checkpoints against weightslab's.

Run: ``python benchmarks/lightning_resume.py [--kill-at 12] [--accumulate 1] [--dir PATH]`` (about
a minute on a 2-core machine: nine short runs, most of it importing Lightning). ``--dir`` chooses
where the files go (default: a temporary directory, removed at the end).

Each setup trains tests/scripts/lightning_train.py (dropout, NumPy and Python draws, a shuffled
DataLoader with two workers, AdamW, a per-step StepLR; 8 batches per epoch, 20 optimizer steps) three
times, in fresh processes with MKL's strict mode and one thread: to the end; killed with SIGKILL once
step ``--kill-at`` is done (and checkpointed); and resumed from that checkpoint:

* Lightning alone: ``ModelCheckpoint(every_n_train_steps=4, save_top_k=-1)``, resumed with
  ``trainer.fit(ckpt_path=".../step=<kill-at>.ckpt")``;
* the same ``ModelCheckpoint`` and ``.ckpt`` with ``WeightslabCallback`` in the callbacks (it adds
  the random generators and the loader's position to Lightning's checkpoints);
* weightslab: ``WeightslabCallback(checkpoint_frequency=4)``, resumed with ``ckpt_path="latest"``.

Lightning alone does not train the same trajectory as the others (a loader registered with
weightslab draws its epochs' order from its own seeded generator), so each resumed run is compared
with the uninterrupted run of its own setup: which
tensors differ and by how much, the samples the resumed run trained on in the epoch it was killed in,
the batch the loop would take next, the next random draws. It prints the figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "lightning_train.py"
ENV = {**os.environ, "MKL_CBWR": "AVX2,STRICT", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONHASHSEED": "0", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
BATCHES_PER_EPOCH = 8


def spawn(root: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), *extra], env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> None:
    stdout, stderr = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"a run failed ({proc.returncode}):\n{stdout}\n{stderr}")


def kill_when_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "READY":
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)


def side(base: Path, args: argparse.Namespace, train: tuple[str, ...], resume: str) -> dict:
    """Run one setup's three runs; return the comparison of the resumed run with the uninterrupted one."""
    common = ("--accumulate", str(args.accumulate), "--frequency", "4", *train)
    straight = spawn(base / "straight-root", base / "straight", *common)
    kill_when_ready(spawn(base / "root", base / "killed", *common, "--pause-at", str(args.kill_at)))
    finish(straight)
    finish(spawn(base / "root", base / "resumed", *common, "--ckpt-path", resume.format(root=base / "root")))
    return compare(base / "straight", base / "resumed", args)


def compare(straight: Path, resumed: Path, args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(f"{straight}.safetensors"), load_file(f"{resumed}.safetensors")
    tensors = {key: float((a[key].double() - b[key].double()).abs().max()) for key in sorted(a)
               if not a[key].equal(b[key])}
    ja, jb = json.loads(Path(f"{straight}.json").read_text()), json.loads(Path(f"{resumed}.json").read_text())
    other = sorted(key for key in ja if ja[key] != jb[key])
    sa = json.loads(Path(f"{straight}.steps.json").read_text())
    sb = json.loads(Path(f"{resumed}.steps.json").read_text())
    # The epoch of the kill, batch by batch: what the uninterrupted run and the resumed one trained on.
    first_batch = args.kill_at * args.accumulate
    epoch = first_batch // BATCHES_PER_EPOCH
    in_epoch = range(epoch * BATCHES_PER_EPOCH, (epoch + 1) * BATCHES_PER_EPOCH)

    def samples(steps: dict) -> dict[int, list[int]]:
        """{the batch's number since the start of training: its samples}; a key is "<global step>.<batch in epoch>"."""
        out = {}
        for key, value in steps.items():
            step, batch = map(int, key.split("."))
            n = next(n for n in range(step * args.accumulate, (step + 1) * args.accumulate)
                     if n % BATCHES_PER_EPOCH == batch)
            out[n] = value["samples"]
        return out

    before = {i: s for i, s in samples(sa).items() if i in in_epoch and i < first_batch}
    after_straight = {i: s for i, s in samples(sa).items() if i in in_epoch and i >= first_batch}
    after_resumed = {i: s for i, s in samples(sb).items() if i in in_epoch and i >= first_batch}
    seen_before = {x for s in before.values() for x in s}
    again = sorted({x for s in after_resumed.values() for x in s} & seen_before)
    never = sorted({x for s in after_straight.values() for x in s} - {x for s in after_resumed.values() for x in s})
    same_losses = sum(1 for key in sb if sa.get(key) == sb[key])
    return {"tensors": tensors, "other": other, "again": again, "never": never, "steps_same": same_losses,
            "steps": len(sb)}


def report(name: str, result: dict) -> None:
    print(f"\n{name}")
    if not result["tensors"] and not result["other"]:
        print("  ends bit-identical to the uninterrupted run: parameters, optimizer state, scheduler, the next batch,"
              " the next torch / NumPy / Python draws")
    else:
        print(f"  {len(result['tensors'])} tensors differ from the uninterrupted run's (max abs difference):")
        for key, diff in result["tensors"].items():
            print(f"    {key:24} {diff:.3g}")
        print(f"  also different: {', '.join(result['other']) or 'nothing else'}")
    print(f"  steps after the resume with the same batch and loss as the uninterrupted run: "
          f"{result['steps_same']} of {result['steps']}")
    print(f"  rest of the epoch of the kill: {len(result['again'])} samples trained on twice in that epoch, "
          f"{len(result['never'])} of the uninterrupted run's not seen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kill-at", type=int, default=12)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lightning-resume-", dir=args.dir))
    ckpt = "{root}/lightning/step=" + str(args.kill_at) + ".ckpt"
    setups = {
        "Lightning alone (ModelCheckpoint every 4 steps, ckpt_path=<the .ckpt of the kill step>)":
            (("--no-weightslab", "--model-checkpoint"), ckpt),
        "Lightning's ModelCheckpoint and .ckpt, with WeightslabCallback in the callbacks":
            (("--model-checkpoint",), ckpt),
        "weightslab (WeightslabCallback(checkpoint_frequency=4), ckpt_path='latest')": ((), "latest"),
    }
    try:
        results = {name: side(base / str(i), args, train, resume)
                   for i, (name, (train, resume)) in enumerate(setups.items())}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"killed after optimizer step {args.kill_at} (batch {args.kill_at * args.accumulate % BATCHES_PER_EPOCH} of "
          f"{BATCHES_PER_EPOCH} in epoch {args.kill_at * args.accumulate // BATCHES_PER_EPOCH}), resumed in a fresh "
          "process, trained to step 20")
    for name, result in results.items():
        report(name, result)


if __name__ == "__main__":
    main()
