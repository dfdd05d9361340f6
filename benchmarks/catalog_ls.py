"""What listing a root with 10,000 checkpoints costs through the catalog (``<root>/index.sqlite``).

Run: ``python benchmarks/catalog_ls.py [--checkpoints 10000] [--experiments 100] [--dir PATH]``
(about half a minute for the defaults). ``--dir PATH`` chooses where the synthetic root goes
(default: a temporary directory under the current one, so the disk measured is the disk written
to; it is removed at the end). Run it from outside a git work tree, or pass ``--dir``, so that a
``git add -A`` meanwhile cannot pick up the temporary files.

The root is built without training: ``--experiments`` experiments (each ``experiment.json``
written by ``CheckpointManager.write_experiment``; every experiment but the first has a parent,
the last checkpoint of an earlier one, with reason config_change, model_change or fork) share
``--checkpoints`` checkpoints. Each checkpoint is a real, sealed ``Manifest`` with two small
tensors in real packs (``BlobStore.put``, one pack per experiment): a 4x4 weight of its own and a
bias shared by the whole experiment (an experiment's first checkpoint reuses its parent's last
weight, so experiments share blobs), and metrics ``loss`` and ``acc``. Manifests are written
without fsync (``Path.write_bytes``): a synthetic root need not survive a crash, and 10,000
fsyncs would make building it slower than what is measured.

Then it times, each in a fresh ``CheckpointManager`` + ``Catalog`` as a command line would:

* build: the first ``experiments()``, the index created from scratch (every manifest read);
* ls: ``experiments()`` again with nothing new (an incremental refresh: every manifest stat-ed,
  none read), median of ``--repeats`` (5): what ``weightslab ls`` costs;
* checkpoints: ``checkpoints()`` of the whole root (10,000 rows), median;
* best: ``best(experiment, "loss")`` of the largest experiment, median (a refresh included);
* one new: ``experiments()`` after one more checkpoint was committed (one manifest read);
* without the catalog: ``CheckpointManager.records()`` (every manifest read and verified), once;
* ``weightslab ls`` as a command, in a new process (median of 3), and ``import weightslab`` alone,
  which imports torch: the part of the command no index can make faster.

and prints each figure with its ratio against the 1-second target. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import random
import statistics
import subprocess
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weightslab import codec  # noqa: E402
from weightslab.cli.catalog import Catalog  # noqa: E402
from weightslab.storage.experiment import ExperimentRecord, Parent  # noqa: E402
from weightslab.storage.manager import CheckpointManager  # noqa: E402
from weightslab.storage.manifest import Manifest, TensorEntry  # noqa: E402
from weightslab.storage.store import Blob  # noqa: E402

TARGET_SECONDS = 1.0
REASONS = ("config_change", "model_change", "fork")
STEP_EVERY = 100  # checkpoint_frequency of the synthetic runs


def _floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _iso(ns: int) -> str:
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _state(step: int) -> dict:
    tensor = {"__wl__": "tensor"}
    return {"step": step, "models": {"main": {"state_dict": {"weight": {**tensor, "key": "models/main/weight"},
                                                             "bias": {**tensor, "key": "models/main/bias"}},
                                              "frozen": [], "eval": []}}}


def build_root(root: Path, *, checkpoints: int, experiments: int, seed: int) -> tuple[CheckpointManager, dict[str, int]]:
    """The synthetic root; returns its manager and {experiment: number of checkpoints}."""
    rng = random.Random(seed)
    manager = CheckpointManager(root)
    counts = [checkpoints // experiments + (1 if i < checkpoints % experiments else 0) for i in range(experiments)]
    clock = time.time_ns() - 10**9 * 3600 * 24  # a day ago, one second per checkpoint
    last: list[tuple[str, int, object]] = []  # per experiment: (hash, last step, last weight ref)
    out: dict[str, int] = {}
    for i, n in enumerate(counts):
        h = hashlib.sha256(f"experiment {seed} {i}".encode()).hexdigest()[:16]
        parent = None
        first_step = STEP_EVERY
        inherited = None
        if i > 0:
            p_hash, p_step, p_weight = last[rng.randrange(i)]
            parent = Parent(p_hash, p_step, REASONS[i % len(REASONS)], ("main.lr: 0.1 -> 0.01",))
            first_step, inherited = p_step, p_weight
        hyperparams = {"lr": 0.1 / (i + 1)}
        record = ExperimentRecord(
            hash=h, created=_iso(clock), architecture_digest="sha256:" + "0" * 64,
            hyperparams_digest="sha256:" + hashlib.sha256(repr(hyperparams).encode()).hexdigest(),
            architecture=[["main", "Linear", "in_features=4, out_features=4"]], hyperparams=hyperparams,
            excluded_keys=(), parent=parent, branch=f"branch-{i}" if parent and parent.reason == "fork" else None,
            versions={"weightslab": "benchmark"}, architecture_text="Linear(in_features=4, out_features=4)\n",
            hyperparams_values={"main": hyperparams})
        manager.write_experiment(record)
        # One pack per experiment: its bias and every checkpoint's own weight.
        blobs = [Blob(data=_floats([float(i)] * 4), dtype="F32", shape=(4,), itemsize=4)]
        blobs += [Blob(data=_floats([rng.random() for _ in range(16)]), dtype="F32", shape=(4, 4), itemsize=4)
                  for _ in range(n)]
        refs = manager.store.put(blobs)
        bias, weights = refs[0], refs[1:]
        if inherited is not None:
            weights[0] = inherited  # the first checkpoint after a change: the parent's weights, unchanged
        step = first_step
        for k in range(n):
            clock += 10**9
            loss = 1.0 / (1 + k) + rng.random() * 0.01
            manifest = Manifest(
                experiment=h, step=step, created=_iso(clock), created_ns=clock,
                reasons=(parent.reason,) if k == 0 and parent else ("step",), changes=(),
                metrics={"loss": codec.encode(loss, path="metrics/loss", tensors={}, what="metrics"),
                         "acc": codec.encode(float(k % 7), path="metrics/acc", tensors={}, what="metrics")},
                run=f"bench-{seed}", versions={"weightslab": "benchmark"},
                tensors={"models/main/weight": TensorEntry(dtype="F32", shape=(4, 4), blob=weights[k]),
                         "models/main/bias": TensorEntry(dtype="F32", shape=(4,), blob=bias)},
                state=_state(step))
            manager.layout.manifest(h, step).write_bytes(manifest.to_bytes())
            step += STEP_EVERY
        last.append((h, step - STEP_EVERY, weights[-1]))
        out[h] = n
    return manager, out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def listing(root: Path, query: Callable[[Catalog], object]) -> Callable[[], object]:
    """What one command line does: open the root and the catalog, query, close."""
    def run() -> object:
        with Catalog(CheckpointManager(root)) as catalog:
            return query(catalog)
    return run


def commit_one(manager: CheckpointManager, exp: str) -> None:
    last_step, path = manager.layout.manifests(exp)[-1]
    manifest = manager.read_manifest(path)
    clock = time.time_ns()
    new = Manifest(experiment=exp, step=last_step + STEP_EVERY, created=_iso(clock), created_ns=clock,
                   reasons=("step",), metrics=manifest.metrics, run=manifest.run, versions=manifest.versions,
                   tensors=manifest.tensors, state=_state(last_step + STEP_EVERY))
    manager.layout.manifest(exp, new.step).write_bytes(new.to_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000, help="checkpoints in the root (default 10000)")
    parser.add_argument("--experiments", type=int, default=100, help="experiments sharing them (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of the repeated queries (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=".", help="where the synthetic root goes (default: a temporary directory "
                                                   "under the current one, removed at the end)")
    args = parser.parse_args()
    if not 1 <= args.experiments <= args.checkpoints:
        parser.error("--experiments must be between 1 and --checkpoints")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-catalog-") as tmp:
        root = Path(tmp) / "root"
        start = time.perf_counter()
        manager, counts = build_root(root, checkpoints=args.checkpoints, experiments=args.experiments,
                                     seed=args.seed)
        built = time.perf_counter() - start
        print(f"root: {args.checkpoints} checkpoints in {args.experiments} experiments, built in {built:.1f} s "
              f"under {root.resolve()}")
        biggest = max(counts, key=lambda h: counts[h])
        figures: list[tuple[str, float]] = []
        figures.append(("build (first experiments(), from scratch)", timed(listing(root, Catalog.experiments))))
        rows: list = listing(root, Catalog.experiments)()  # type: ignore[assignment]
        figures.append(("ls (experiments(), nothing new)",
                        statistics.median(timed(listing(root, Catalog.experiments)) for _ in range(args.repeats))))
        figures.append((f"checkpoints() ({args.checkpoints} rows)",
                        statistics.median(timed(listing(root, Catalog.checkpoints)) for _ in range(args.repeats))))
        figures.append((f"best({biggest[:8]}, 'loss')",
                        statistics.median(timed(listing(root, lambda c: c.best(biggest, "loss")))
                                          for _ in range(args.repeats))))
        commit_one(manager, biggest)
        figures.append(("ls after one new checkpoint", timed(listing(root, Catalog.experiments))))
        figures.append(("without the catalog (records(): every manifest read)",
                        timed(lambda: CheckpointManager(root).records())))
        # The command a person types, end to end in a fresh process, and what importing weightslab
        # (torch with it) alone costs of that.
        script = Path(sys.executable).with_name("weightslab")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "weightslab"]
        figures.append(("`weightslab ls` (a new process, end to end)", statistics.median(
            timed(lambda: subprocess.run([*command, "ls", "--root", str(root)], check=True, capture_output=True))
            for _ in range(3))))
        figures.append(("  of which `python -c 'import weightslab'`", statistics.median(
            timed(lambda: subprocess.run([sys.executable, "-c", "import weightslab"], check=True))
            for _ in range(3))))
        index = root / "index.sqlite"
        print(f"index: {index.stat().st_size / 2**20:.1f} MiB; {len(rows)} experiments listed, "
              f"{sum(r.checkpoints for r in rows)} checkpoints, sum of bytes_alone {sum(r.bytes_alone for r in rows):,}")
        print(f"{'query':<58}{'seconds':>10}{'/ 1 s target':>14}")
        for name, seconds in figures:
            print(f"{name:<58}{seconds:>10.3f}{seconds / TARGET_SECONDS:>14.3f}")


if __name__ == "__main__":
    main()
