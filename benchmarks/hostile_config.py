"""What a hostile edit of a watched config file costs the training thread: the time of each step
boundary (``wl.checkpoint_on_step``) of a small real loop while a YAML alias bomb (~400 bytes), the
same bomb one level smaller, or a ~26 MB YAML is saved over the watched file.

Each case runs in a child process whose address space is capped (``--memory``, 6 GB by default, so
that an expansion ends in ``MemoryError`` instead of the machine's OOM killer). The child trains
``--steps`` steps as a baseline, saves the hostile file over the config (atomically), then trains on
until the watcher has acted on the file (at most ``--seconds``) and ``--steps`` more steps. Printed
per case: whether the process lived, the median boundary before, the slowest boundary after the
save, the median boundary of the last ``--steps``, the peak RSS, and the last warning logged.

Run: ``PYTHONPATH=. python benchmarks/hostile_config.py`` (about 5 minutes against a weightslab that
parses on the training thread, seconds against one that does not); ``--cases bomb,big`` to choose.
It asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CONFIG = "optimizer:\n  lr: 0.1\n  momentum: 0.0\nepochs: 3\n"


def alias_bomb(levels: int) -> str:
    """The 'billion laughs': each level a list of nine aliases of the level before (9**levels strings)."""
    lines = ["optimizer:\n  lr: 0.1\n  momentum: 0.0\nepochs: 3\n",
             'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    names = "abcdefghijklmnopqrstuvwxyz"
    for i in range(1, levels):
        prev, cur = names[i - 1], names[i]
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]\n")
    return "".join(lines)


def big_yaml(megabytes: float) -> str:
    """A config plus a table of one key per line: ``megabytes`` MB of plain YAML."""
    rows, size, i = [CONFIG, "table:\n"], 0, 0
    while size < megabytes * 1e6:
        row = f"  k{i:08d}: 0.123456789\n"
        rows.append(row)
        size += len(row)
        i += 1
    return "".join(rows)


CHILD = textwrap.dedent("""
    import json, logging, os, resource, statistics, sys, time
    limit = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    from torch import nn
    import weightslab as wl

    class Last(logging.Handler):
        message = None
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                Last.message = record.getMessage()[:300]
    logging.getLogger("weightslab").addHandler(Last())

    work, hostile, steps, seconds = sys.argv[1], sys.argv[2], int(sys.argv[4]), float(sys.argv[5])
    path = os.path.join(work, "config.yaml")
    with open(path, "w") as f:
        f.write(%(config)r)
    out = {"lived": False}
    try:
        system = wl.get_checkpoint_system(root_log_dir=os.path.join(work, "root"), checkpoint_frequency=None,
                                          save_on_close=False)
        config = wl.register_hyperparams("config", path)
        model = wl.register_model(nn.Linear(64, 64))
        opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        watched = system.watched_files["config"]
        step = 0

        def boundary():
            global step
            opt.zero_grad()
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
            step += 1
            t = time.perf_counter()
            wl.checkpoint_on_step(step)
            return time.perf_counter() - t

        before = [boundary() for _ in range(steps)]
        seen = watched.events
        os.replace(hostile, path)
        watched.wait_for_events(seen + 1, timeout=10)
        during, start = [], time.monotonic()
        while time.monotonic() - start < seconds:
            during.append(boundary())
            if watched.settled and getattr(watched, "content", None) == open(path, "rb").read():
                break
        after = [boundary() for _ in range(steps)]
        kept = config["optimizer"] == {"lr": 0.1, "momentum": 0.0}
        out.update(lived=True, before_ms=statistics.median(before) * 1e3, worst_s=max(during + after),
                   after_ms=statistics.median(after) * 1e3, config_kept=kept,
                   table_loaded="table" in config or "a" in config)
        system.close()
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["warning"] = Last.message
    print(json.dumps(out))
""") % {"config": CONFIG}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="bomb,bomb8,big")
    parser.add_argument("--memory", type=float, default=6.0, help="the child's address-space cap, GB")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--megabytes", type=float, default=26.0)
    args = parser.parse_args()
    files = {"bomb": alias_bomb(9), "bomb8": alias_bomb(8), "bomb7": alias_bomb(7), "big": big_yaml(args.megabytes),
             "limit": big_yaml(0.9)}
    with tempfile.TemporaryDirectory() as work:
        for case in args.cases.split(","):
            hostile = Path(work) / f"{case}.yaml"
            hostile.write_text(files[case])
            size = hostile.stat().st_size
            proc = subprocess.run([sys.executable, "-c", CHILD, work, str(hostile), str(int(args.memory * 2**30)),
                                   str(args.steps), str(args.seconds)], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"lived": False, "exit": proc.returncode,
                                                          "stderr": proc.stderr[-300:]}
            print(f"{case} ({size:,} bytes): {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
