"""How long `weightslab ui` takes to show a large root: 10,000 checkpoints in 100 experiments.

Run: ``python benchmarks/ui_render.py [--checkpoints 10000] [--experiments 100] [--dir PATH]`` (about
half a minute). The root is the one ``benchmarks/catalog_ls.py`` builds (real sealed manifests and
packs, a lineage of config changes, model changes and forks, metrics ``loss`` and ``acc``), in a
temporary directory under ``--dir`` (default: the current one), removed at the end.

It starts the server (:func:`weightslab.ui.server.make_server`, the code behind ``weightslab ui``) and
fetches pages over HTTP on 127.0.0.1, each in a fresh server as a person opening the page would:

* first page, no index yet: ``/`` on a root whose catalog (``index.sqlite``) does not exist (every
  manifest read to build it; what the very first ``weightslab ui`` or ``ls`` on a root pays);
* first page: ``/`` in a new server with the index built (what opening the page costs);
* again: ``/`` once more in the same server, median of ``--repeats`` (a reload, the catalog
  refreshed: every manifest stat-ed, none read);
* a checkpoint card: ``/card?ref=...`` of the largest experiment's latest checkpoint, median;
* another metric: ``/?metric=acc``, median.

and prints each with its ratio to the 1-second target (DESIGN.md / issue 19) and the page's size. It
reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from catalog_ls import build_root  # this script's directory is on sys.path

from weightslab.ui.server import make_server

TARGET_SECONDS = 1.0


def fetch(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        body = response.read()
    return time.perf_counter() - start, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=".", help="where the synthetic root goes (removed at the end)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="weightslab-ui-") as tmp:
        root = Path(tmp) / "root"
        start = time.perf_counter()
        _, counts = build_root(root, checkpoints=args.checkpoints, experiments=args.experiments, seed=args.seed)
        print(f"root: {args.checkpoints} checkpoints in {args.experiments} experiments, built in "
              f"{time.perf_counter() - start:.1f} s")
        biggest = max(counts, key=lambda h: counts[h])
        figures = []
        with make_server(root) as server:
            figures.append(("first page, no index yet (catalog built from scratch)", *fetch(server.url)))
        with make_server(root) as server:
            seconds, size = fetch(server.url)
            figures.append(("first page (index built, a new server)", seconds, size))
            again = [fetch(server.url) for _ in range(args.repeats)]
            figures.append(("the page again (median)", statistics.median(s for s, _ in again), again[0][1]))
            card = [fetch(f"{server.url}card?ref={biggest}@latest") for _ in range(args.repeats)]
            figures.append((f"a checkpoint card ({biggest[:8]}@latest, median)",
                            statistics.median(s for s, _ in card), card[0][1]))
            acc = [fetch(f"{server.url}?metric=acc") for _ in range(args.repeats)]
            figures.append(("another metric (?metric=acc, median)", statistics.median(s for s, _ in acc), acc[0][1]))
        print(f"{'page':<58}{'seconds':>9}{'/ 1 s':>8}{'bytes':>11}")
        for name, seconds, size in figures:
            print(f"{name:<58}{seconds:>9.3f}{seconds / TARGET_SECONDS:>8.2f}{size:>11,}")


if __name__ == "__main__":
    main()
