"""Kill a training process with SIGKILL at random moments, again and again, and check every time.

Each round starts the training script (tests/scripts/exact_train.py), lets it run a random number
of steps (saving at every step, so a kill often lands while a save is being written), kills it
with SIGKILL, and checks the root: every committed checkpoint verifies, no partial checkpoint is
visible, temporary leftovers of the dead writer are swept when the root is next opened. The next
round resumes from "latest". At the end the run is finished and its final state must equal, byte
for byte, that of an uninterrupted run.

    python tests/crash_soak.py --kills 1000 --seed 1        # the long version; CI runs a few dozen

The moments come from a seeded generator: a failure is reproducible with the same --seed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "exact_train.py"
ENV = {"MKL_CBWR": "AVX2,STRICT", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@dataclass
class SoakReport:
    kills: int  # processes killed
    mid_write: int  # kills that left temporary files: the process died while writing a save
    resumed_from: list[int]  # the step each round resumed from
    checkpoints_checked: int


def _env() -> dict[str, str]:
    env = {**os.environ, **ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(root: Path, out: Path, args: list[str]) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(root), str(out), *args], env=_env(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _check_root(root: Path) -> tuple[int, int]:
    """(temporary files the dead writer left, checkpoints checked); raises if anything is wrong."""
    from weightslab.storage.manager import CheckpointManager
    leftovers = len(list(root.rglob(".tmp.*"))) if root.exists() else 0
    manager = CheckpointManager(root)  # opening a root sweeps what dead writers left
    remaining = list(root.rglob(".tmp.*")) if root.exists() else []
    if remaining:
        raise AssertionError(f"temporary files not swept: {remaining}")
    report = manager.verify()
    if not report.ok:
        raise AssertionError(f"a committed checkpoint does not verify after a kill:\n{report}")
    return leftovers, len(report.checked)


def run_soak(workdir: Path, *, kills: int, seed: int, args: list[str], max_steps_per_round: int = 6) -> SoakReport:
    """Kill/resume ``kills`` times, finish, compare with an uninterrupted run; raise on any problem."""
    rng = random.Random(seed)
    straight = workdir / "straight"
    _run(workdir / "straight-root", straight, args)
    root, out = workdir / "root", workdir / "final"
    report = SoakReport(kills=0, mid_write=0, resumed_from=[], checkpoints_checked=0)
    while report.kills < kills:
        steps_before_kill = rng.randint(1, max_steps_per_round)
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), *args], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        seen, finished = 0, False
        for line in proc.stdout:
            if line.startswith("START"):
                report.resumed_from.append(int(line.split()[1]))
            elif line.startswith("STEP"):
                seen += 1
                if seen == steps_before_kill:
                    proc.send_signal(signal.SIGKILL)
                    break
            elif line.startswith("DONE"):
                finished = True
        proc.wait(timeout=60)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        if finished or proc.returncode == 0:
            break  # the training ended before this kill: start over from scratch for more kills
        if proc.returncode != -signal.SIGKILL:
            raise AssertionError(f"the training process died by itself ({proc.returncode})")
        report.kills += 1
        left, checked = _check_root(root)
        report.mid_write += left > 0
        report.checkpoints_checked += checked
    _run(root, out, args)
    for suffix in (".safetensors", ".json"):
        if Path(str(straight) + suffix).read_bytes() != Path(str(out) + suffix).read_bytes():
            raise AssertionError(f"after {report.kills} kills the final state differs from an uninterrupted run "
                                 f"({suffix}); resumed from steps {report.resumed_from}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="steps of the training run (more kills -> more runs)")
    parser.add_argument("--implicit", action="store_true", help="no checkpoint_on_step: the optimizer hook")
    parser.add_argument("--ballast", type=float, default=8.0, help="MB written at every save")
    parser.add_argument("--page-cache", action="store_true",
                        help="write packs through the page cache (slower writes: more kills land in them)")
    args = parser.parse_args()
    train_args = ["--steps", str(args.steps), "--frequency", "1", "--loader", "--two-models",
                  "--ballast", str(args.ballast)] + (["--implicit"] if args.implicit else []) + \
        (["--page-cache"] if args.page_cache else [])
    done, rounds, start = 0, 0, time.perf_counter()
    while done < args.kills:
        with tempfile.TemporaryDirectory(prefix="weightslab-soak-") as tmp:
            report = run_soak(Path(tmp), kills=args.kills - done, seed=args.seed + rounds, args=train_args)
        done += report.kills
        rounds += 1
        print(f"round {rounds}: {report.kills} kills ({report.mid_write} in the middle of a write), "
              f"{report.checkpoints_checked} checkpoint checks, resumed from {report.resumed_from[-5:]}... "
              f"final state identical to an uninterrupted run", flush=True)
    print(f"{done} kills in {time.perf_counter() - start:.0f} s: every committed checkpoint verified, "
          "every resume exact")


if __name__ == "__main__":
    main()
