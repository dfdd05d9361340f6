"""How long `weightslab ui` takes to show a large root: 10,000 checkpoints in 100 experiments.

Run: ``python benchmarks/ui_render.py [--checkpoints 10000] [--experiments 100] [--dir PATH]`` (about
half a minute). The root is the one ``benchmarks/catalog_ls.py`` builds (real sealed manifests and
packs, a lineage of config changes, model changes and forks, metrics ``loss`` and ``acc``), in a
temporary directory under ``--dir`` (default: the current one), removed at the end.

It starts the server (:func:`weightslab.ui.server.make_server`, the code behind ``weightslab ui``) and
fetches pages over HTTP on 127.0.0.1, each in a fresh server as a person opening the page would:

* first page, no index yet: starting the server and ``/`` on a root whose catalog (``index.sqlite``)
  does not exist (every manifest read to build it; what the very first ``weightslab ui`` or ``ls``
  on a root pays);
* first page: starting a new server and ``/``, the index built (what opening the page costs);
* again: ``/`` once more in the same server, median of ``--repeats`` (a reload, the catalog
  refreshed: every manifest stat-ed, none read);
* a checkpoint card: ``/card?ref=...`` of the largest experiment's latest checkpoint, median;
* another metric: ``/?metric=acc``, median;
* with selenium and the system's chromium and chromedriver: the page in headless Chromium, from
  navigation to the load event (the 10,000 SVG circles parsed and laid out), median of 3.

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


def in_browser(url: str) -> float | None:
    """Seconds from navigation to the load event of ``url`` in headless Chromium (the system's
    chromium and chromedriver, driven by selenium), parsing and laying out the SVG included; None
    when there is no browser here."""
    import shutil
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not (chromium and driver_path):
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)  # (warm: the browser's own start is not the page's)
        times = []
        for _ in range(3):
            driver.get(url)
            times.append(driver.execute_script(
                "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.startTime") / 1e3)
        return statistics.median(times)
    finally:
        driver.quit()


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
        # (make_server brings the catalog up to date before it serves: counted in the first page)
        start = time.perf_counter()
        with make_server(root) as server:
            _, size = fetch(server.url)
            figures.append(("first page, no index yet (server start + catalog built + page)",
                            time.perf_counter() - start, size))
        start = time.perf_counter()
        with make_server(root) as server:
            _, size = fetch(server.url)
            figures.append(("first page (index built: server start + page)", time.perf_counter() - start, size))
            again = [fetch(server.url) for _ in range(args.repeats)]
            figures.append(("the page again (median)", statistics.median(s for s, _ in again), again[0][1]))
            card = [fetch(f"{server.url}card?ref={biggest}@latest") for _ in range(args.repeats)]
            figures.append((f"a checkpoint card ({biggest[:8]}@latest, median)",
                            statistics.median(s for s, _ in card), card[0][1]))
            acc = [fetch(f"{server.url}?metric=acc") for _ in range(args.repeats)]
            figures.append(("another metric (?metric=acc, median)", statistics.median(s for s, _ in acc), acc[0][1]))
            browser = in_browser(server.url)
            if browser is not None:
                figures.append(("the page in headless Chromium (navigation to load event)", browser, 0))
        print(f"{'page':<66}{'seconds':>9}{'/ 1 s':>8}{'bytes':>11}")
        for name, seconds, size in figures:
            print(f"{name:<66}{seconds:>9.3f}{seconds / TARGET_SECONDS:>8.2f}{f'{size:,}' if size else '':>11}")


if __name__ == "__main__":
    main()
