"""`weightslab ui`: the real server on 127.0.0.1 (port 0), fetched with urllib, over a root made by real
training (a config change, a named fork, a hostile hyperparameter value and metric name). No
browser: the DOM contract is checked on the HTML with the standard library's parser."""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from weightslab.storage.manager import CheckpointManager

from .support import child_env, run_python

EVIL = '"><img src=x onerror=alert(1)><script>alert(2)</script>'

TRAIN = r'''
import sys, torch
from torch import nn
import weightslab as wl
root, evil = sys.argv[1], sys.argv[2]
system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=5, save_on_close=False)
config = wl.register_hyperparams("config", {"optimizer": {"lr": 0.1}, "note": "plain"})
torch.manual_seed(0)
model = wl.register_model(nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 1)))
opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
x, y = torch.randn(64, 4), torch.randn(64, 1)
def train(first, last):
    for step in range(first, last + 1):
        opt.zero_grad(); loss = nn.functional.mse_loss(model(x), y); loss.backward(); opt.step()
        wl.checkpoint_on_step(step, metrics={"loss": loss.item(), evil: float(step)})
train(1, 20)
base = system.name_experiment("baseline")
config["optimizer"]["lr"] = 0.01          # a config change: a child experiment
config["note"] = evil                     # ... whose changes hold markup
train(21, 30)
wl.fork(f"{base}@10", name="sweep", optimizer__lr=0.05)   # a named fork from step 10
train(11, 25)
system.close()
print(base)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    # (the root's own directory name is markup too: it is the page's title)
    root = tmp_path_factory.mktemp("ui") / 'runs"><img src=x onerror=alert(3)>'
    proc = run_python(TRAIN, args=[str(root), EVIL], timeout=300)
    return root, proc.stdout.strip().splitlines()[-1]


@pytest.fixture
def server(trained):
    from weightslab.ui.server import make_server
    with make_server(trained[0]) as srv:
        yield srv


# --- a small DOM ----------------------------------------------------------------------------------------
class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: "Element | None"):
        self.tag, self.attrs, self.parent, self.children, self.parts = tag, attrs, parent, [], []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    def iter(self):
        for child in self.children:
            yield child
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list["Element"]:
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
                and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def one(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> "Element":
        found = self.find_all(tag, cls, **attrs)
        assert len(found) == 1, (tag, cls, attrs, len(found))
        return found[0]


VOID = {"meta", "input", "br", "img", "link", "hr"}


class Dom(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.here = Element("#root", {}, None)
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.here)
        self.here.children.append(element)
        self.here.parts.append(element)
        if tag not in VOID:
            self.here = element

    def handle_startendtag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.here)
        self.here.children.append(element)
        self.here.parts.append(element)

    def handle_endtag(self, tag):
        node = self.here
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.here = node.parent

    def handle_data(self, data):
        self.here.parts.append(data)


def get(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode("utf-8"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8"), dict(exc.headers)


def post(url: str, form: dict[str, str]) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def page(server, query: str = "") -> Element:
    status, body, headers = get(server.url + query)
    assert status == 200, body
    assert "default-src 'none'" in headers["Content-Security-Policy"]  # nothing from elsewhere
    return Dom(body).root


def expected(root: Path) -> dict[str, dict[int, dict[str, float]]]:
    """{experiment: {step: metrics}} read from the manifests themselves."""
    manager = CheckpointManager(root, sweep=False)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for entry in manager.checkpoints():
        out.setdefault(entry.experiment, {})[entry.step] = manager.read_manifest(entry).numeric_metrics()
    return out


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("index.sqlite")}


# --- the page ----------------------------------------------------------------------------------------------
def test_lineage_curves_and_storage_follow_the_dom_contract(trained, server):
    root, base = trained
    truth = expected(root)
    dom = page(server)
    assert dom.one("head").one("title").text == f"weightslab: {root}"
    lineage = dom.one("section", id="lineage")
    nodes = {n.attrs["data-experiment"]: n for n in lineage.find_all("g", "node")}
    assert set(nodes) == set(truth) and len(nodes) == 3
    assert base[:8] in nodes[base].one("text").text and "baseline" in nodes[base].one("text").text
    edges = {e.attrs["data-reason"]: e for e in lineage.find_all("g", "edge")}
    assert set(edges) == {"config_change", "fork"}
    config, fork = edges["config_change"], edges["fork"]
    assert config.attrs["data-parent"] == base and fork.attrs["data-parent"] == base
    assert config.one("text", "reason").text.startswith("config: ")
    assert "config.optimizer.lr: 0.1 -> 0.01" in config.one("text", "reason").text
    assert EVIL in config.one("text", "reason").text  # the change shows as text
    assert "config.optimizer.lr: 0.1 -> 0.05" in fork.one("text", "reason").text
    child, sweep = config.attrs["data-child"], fork.attrs["data-child"]
    assert "sweep" in nodes[sweep].one("text").text

    curves = dom.one("section", id="curves")
    assert [o.attrs["value"] for o in curves.one("select", id="metric").find_all("option")] == sorted(["loss", EVIL])
    assert {p.attrs["data-experiment"] for p in curves.find_all("path", "curve", data_metric="loss")} == set(truth)
    points = curves.find_all("circle", "point")
    recorded = sorted(f"{h}@{s}" for h in truth for s in truth[h] if "loss" in truth[h][s])
    assert sorted(p.attrs["data-ref"] for p in points) == recorded  # (a fork's first checkpoint has no loss)
    assert len(recorded) < sum(map(len, truth.values()))
    for p in points:
        h, step = p.attrs["data-ref"].split("@")
        assert int(p.attrs["data-step"]) == int(step)
        assert float(p.attrs["data-value"]) == truth[h][int(step)]["loss"]  # repr round-trips
    for h, steps in truth.items():  # the best of each experiment: its lowest loss
        best = [p for p in points if "best" in p.classes and p.attrs["data-ref"].startswith(h)]
        lowest = min((s for s in steps if "loss" in steps[s]), key=lambda s: steps[s]["loss"])
        assert [p.attrs["data-ref"] for p in best] == [f"{h}@{lowest}"]
    # a child's curve starts at its parent's point (the fork at base@10, the config change at base@20)
    circle = {p.attrs["data-ref"]: (float(p.attrs["cx"]), float(p.attrs["cy"])) for p in points}
    for h, at in ((sweep, f"{base}@10"), (child, f"{base}@20")):
        d = curves.one("path", "curve", data_experiment=h).attrs["d"]
        first = tuple(float(v) for v in re.match(r"M([-\d.]+),([-\d.]+)", d).groups())
        assert first == pytest.approx(circle[at], abs=0.06)
    d = curves.one("path", "curve", data_experiment=base).attrs["d"]
    assert d.count("L") == len(truth[base]) - 1  # the root experiment: its own points only

    storage = dom.one("section", id="storage")
    rows = {r.attrs["data-experiment"]: r for r in storage.one("table").find_all("tr") if "data-experiment" in r.attrs}
    assert set(rows) == set(truth)
    from weightslab.cli.catalog import Catalog
    with Catalog(CheckpointManager(root, sweep=False)) as catalog:
        listed = {r.hash: r for r in catalog.experiments()}
    for h, row in rows.items():
        cells = row.find_all("td")
        assert int(cells[2].text) == len(truth[h]) and int(cells[4].attrs["data-bytes"]) == listed[h].bytes_alone
    assert int(rows[base].find_all("td")[4].attrs["data-bytes"]) > 0

    other = page(server, f"?metric={urllib.parse.quote(EVIL)}").one("section", id="curves")
    values = {p.attrs["data-ref"]: float(p.attrs["data-value"]) for p in other.find_all("circle", "point")}
    assert values == {f"{h}@{s}": float(s) for h in truth for s in truth[h] if EVIL in truth[h][s]}
    assert {p.attrs["data-metric"] for p in other.find_all("path", "curve")} == {EVIL}


def test_nothing_from_the_root_becomes_markup(trained, server):
    status, body, _ = get(server.url + f"?metric={urllib.parse.quote(EVIL)}")
    assert status == 200
    dom = Dom(body).root
    assert dom.find_all("img") == [] and len(dom.find_all("script")) == 1  # the page's own script only
    assert "alert" not in dom.one("script").text
    assert "<img" not in body and "<script>alert" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body  # shown as text
    root, base = trained
    for url in (f"card?ref={base}@20", f"diff?a={base}@20&b={base}@30", "gc", "card?ref=" + urllib.parse.quote(EVIL)):
        status, body, _ = get(server.url + url)
        assert "<img" not in body and "<script>alert" not in body, url
    status, body, _ = get(server.url + "card?ref=" + urllib.parse.quote(EVIL))
    assert status == 404 and "&lt;img" in body


def test_a_card_says_everything_about_one_checkpoint(trained, server):
    root, base = trained
    manager = CheckpointManager(root, sweep=False)
    status, body, _ = get(server.url + f"card?ref={base}@20")
    assert status == 200, body
    card = Dom(body).root.one("div", "card")
    assert card.attrs["data-ref"] == f"{base}@20" and card.one("span", "step").text == "20"
    manifest = manager.read_manifest(manager.candidates(f"{base}@20")[0])
    metrics = dict(zip((d.text for d in card.find_all("dt")), (float(d.text) for d in card.find_all("dd"))))
    assert metrics.keys() == manifest.numeric_metrics().keys()
    assert metrics["loss"] == pytest.approx(manifest.numeric_metrics()["loss"], rel=1e-5)
    assert card.one("span", "reasons").text == ", ".join(manifest.reasons)
    assert card.one("span", "exact").text == "exact"
    assert card.one("span", "verified").text == "not verified yet"
    # bytes it alone holds: its blobs that no other checkpoint of the root references
    others: set[str] = set()
    for entry in manager.checkpoints():
        if entry.ref != manifest.ref:
            others.update(b.digest for t in manager.read_manifest(entry).tensors.values() for b in t.blobs())
    mine = {b.digest: b.nbytes for t in manifest.tensors.values() for b in t.blobs()}
    assert int(card.one("span", "alone").attrs["data-bytes"]) == sum(n for d, n in mine.items() if d not in others)
    commands = [p.text for p in card.find_all("pre", "command")]
    assert any(c.startswith(f"weightslab verify {base}@20") for c in commands)  # read-only: the command
    assert any(c.startswith(f"weightslab export {base}@20 model.safetensors") for c in commands)
    assert f'system.resume("{base}@20")' in commands and f'wl.fork("{base}@20", ...)' in commands
    assert card.find_all("form") == []
    assert {c.text for c in card.find_all("code", "ref")} == {f"{base}@20", "baseline@20"}
    assert get(server.url + "card?ref=baseline@best:loss")[0] == 200  # any ref the command line takes
    status, body, _ = post(server.url + "verify", {"ref": f"{base}@20", "token": server.token}) + ({},)
    assert status == 403 and "--allow-actions" in body


def test_verify_from_the_page_only_with_allow_actions_and_the_root_is_never_written(trained, tmp_path):
    from weightslab.ui.server import make_server
    root = tmp_path / "copy"
    shutil.copytree(trained[0], root)
    before = files(root)
    manager = CheckpointManager(root, sweep=False)
    entries = manager.checkpoints()
    good, bad = entries[0], entries[-1]
    with make_server(root, allow_actions=True) as srv:
        for url in ("", f"card?ref={good.ref}", f"diff?a={good.ref}&b={bad.ref}", "gc"):
            assert get(srv.url + url)[0] == 200, url
        card = Dom(get(srv.url + f"card?ref={good.ref}")[1]).root.one("div", "card")
        form = card.one("form", "verify")
        assert form.attrs["method"] == "post" and form.one("input", name="token").attrs["value"] == srv.token
        assert post(srv.url + "verify", {"ref": good.ref, "token": "forged", "part": "1"})[0] == 403
        assert files(root) == before  # nothing written by reading, diffing, gc's dry run
        status, body = post(srv.url + "verify", {"ref": good.ref, "token": srv.token, "part": "1"})
        assert status == 200, body
        assert Dom(body).root.one("span", "verified").text.startswith("verified at ")
        again = Dom(get(srv.url + f"card?ref={good.ref}")[1]).root  # remembered by this server
        assert again.one("span", "verified").text.startswith("verified at ")
        # damage a blob only the last checkpoint holds: its card says so
        blob = next(b for t in manager.read_manifest(bad).tensors.values() for b in t.blobs()
                    if b.digest not in {x.digest for e in entries[:-1] for t2 in manager.read_manifest(e).tensors.values()
                                        for x in t2.blobs()})
        path = manager.layout.pack(blob.pack)
        data = bytearray(path.read_bytes())
        data[blob.offset] ^= 0xFF
        path.write_bytes(bytes(data))
        status, body = post(srv.url + "verify", {"ref": bad.ref, "token": srv.token, "part": "1"})
        assert status == 200 and Dom(body).root.one("span", "verified").text.startswith("DAMAGED")
    with make_server(root) as srv:  # another server: nothing remembered, and read-only
        card = Dom(get(srv.url + f"card?ref={good.ref}")[1]).root
        assert card.one("span", "verified").text == "not verified yet" and card.find_all("form") == []


def test_diff_is_the_command_lines(trained, server):
    import torch

    from weightslab.tensors import load_tensors
    root, base = trained
    manager = CheckpointManager(root, sweep=False)
    a, b = (manager.read_manifest(manager.candidates(r)[0]) for r in (f"{base}@10", "sweep@25"))
    dom = page(server, f"diff?a={base}@10&b=sweep@25")
    section = dom.one("section", id="diff")
    assert {i.attrs["name"] for i in section.one("form").find_all("input")} == {"a", "b"}
    assert [li.text for li in section.one("ul", "hyperparams").find_all("li")] == ["config.optimizer.lr: 0.1 -> 0.05"]
    assert [li.text for li in section.one("ul", "architecture").find_all("li")] == ["(the same)"]
    rows = {r.attrs["data-key"]: float(r.attrs["data-value"]) for r in section.one("table", "tensors").find_all("tr")
            if "data-key" in r.attrs}
    ta, tb = load_tensors(manager, a), load_tensors(manager, b)
    keys = sorted(k for k in a.tensors if k.startswith("models/"))
    assert sorted(rows) == keys and len(keys) == 4
    for key in keys:
        x, y = ta[key].double(), tb[key].double()
        assert rows[key] == pytest.approx(float(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x)))
        assert rows[key] > 0
    status, part, _ = get(server.url + f"diff?a={base}@10&b={base}@10&part=1")  # the fragment the script inserts
    assert status == 200 and not part.startswith("<!doctype")
    assert {float(r.attrs["data-value"]) for r in Dom(part).root.find_all("tr") if "data-key" in r.attrs} == {0.0}
    assert get(server.url + f"diff?a={base}@10&b=nothing@3")[0] == 404


def test_storage_gc_figure_is_garbage_collects_dry_run_and_a_reload_shows_changes(trained, tmp_path):
    from weightslab.retention import Retention
    from weightslab.storage import garbage
    from weightslab.storage.archive import Archive
    from weightslab.ui.server import make_server
    from weightslab.ui.site import Site
    root = tmp_path / "copy"
    shutil.copytree(trained[0], root)
    with make_server(root) as srv:
        before = page(srv).find_all("circle", "point")
        manager = CheckpointManager(root, sweep=False)
        plan = manager.apply_retention(Retention.of(keep_last=2, archive=Archive.of("lc", bits=3)))
        assert plan.demote  # some checkpoints archived (lossy), none deleted
        lossy = next(e for e in manager.checkpoints() if not manager.read_manifest(e).exact)
        card = Dom(get(srv.url + f"card?ref={lossy.ref}")[1]).root
        assert card.one("span", "exact").text.startswith("lossy: lc bits=3")
        assert "max abs error" in card.one("span", "exact").text
        assert f'system.resume("{lossy.ref}", allow_lossy=True)' in [p.text for p in card.find_all("pre", "command")]
        manager.apply_retention(Retention.of(keep_last=1))  # and some deleted
        after = page(srv).find_all("circle", "point")  # the same server: every request reads the root again
        kept = [e for e in manager.checkpoints() if "loss" in manager.read_manifest(e).numeric_metrics()]
        assert len(after) == len(kept) < len(before)
        status, body, _ = get(srv.url + "gc")
        assert status == 200 and "would free" in body
    dry = garbage.collect(manager, grace_seconds=0, dry_run=True)
    ours = Site.open(root).reclaimable(grace_seconds=0)
    assert dry.bytes_freed > 0
    assert (ours.bytes_freed, ours.packs_deleted, ours.packs_rewritten, ours.bytes_dead_kept, ours.bytes_live,
            ours.live_blobs) == (dry.bytes_freed, dry.packs_deleted, dry.packs_rewritten, dry.bytes_dead_kept,
                                 dry.bytes_live, dry.live_blobs)


def test_a_remote_root_through_the_mirror(trained, tmp_path, monkeypatch):
    from weightslab.ui.server import make_server
    bucket = tmp_path / "bucket"
    shutil.copytree(trained[0], bucket, ignore=shutil.ignore_patterns("index.sqlite*"))
    monkeypatch.setenv("WEIGHTSLAB_STAGING", str(tmp_path / "staging"))
    root, base = trained
    with make_server(f"file://{bucket}") as srv:
        dom = page(srv)
        assert dom.one("head").one("title").text == f"weightslab: file://{bucket}"
        local = page_of(root)
        assert len(dom.find_all("g", "node")) == 3
        assert sorted(p.attrs["data-ref"] for p in dom.find_all("circle", "point")) == \
            sorted(p.attrs["data-ref"] for p in local.find_all("circle", "point"))
        card = Dom(get(srv.url + f"card?ref={base}@20")[1]).root
        assert card.one("span", "step").text == "20"
        assert "remote" in get(srv.url + "gc")[1]


def page_of(root: Path) -> Element:
    from weightslab.ui.server import make_server
    with make_server(root) as srv:
        return page(srv)


def test_requests_for_another_host_are_refused(server):
    assert get(server.url, headers={"Host": "evil.example:80"})[0] == 421
    assert get(server.url, headers={"Host": f"localhost:{server.port}"})[0] == 200
    assert get(server.url + "nothing")[0] == 404


def test_the_page_renders_where_torch_cannot_be_imported(trained):
    root, base = trained
    out = run_python(f"""
import sys, urllib.request, urllib.error
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from weightslab.ui.server import make_server
with make_server({str(root)!r}) as srv:
    for url in ("", "card?ref={base}@20", "gc"):
        with urllib.request.urlopen(srv.url + url) as r:
            assert r.status == 200, url
    with urllib.request.urlopen(srv.url + "diff?a={base}@10&b={base}@20&part=1") as r:
        text = r.read().decode()
assert "torch" in text and "weightslab diff" in text, text
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
""").stdout
    assert out.strip().endswith("ok")


def test_the_command_serves_until_ctrl_c(trained):
    root, _ = trained
    script = Path(sys.executable).with_name("weightslab")
    proc = subprocess.Popen([str(script), "ui", "--root", str(root), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert "read-only" in line
        assert get(url)[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err and err == ""
    bad = subprocess.run([str(script), "ui", "--root", str(root.parent / "nothing"), "--port", "0"],
                         capture_output=True, text=True, env=child_env(), timeout=60)
    assert bad.returncode == 3 and "not a weightslab root" in bad.stderr


def test_a_long_curve_is_thinned_but_keeps_its_shape():
    import numpy as np

    from weightslab.ui.page import MAX_PATH_POINTS, thin
    steps = np.arange(100_000, dtype=float)
    values = np.sin(steps / 5000)
    values[77_777] = 50.0  # a spike
    keep = thin(steps, values)
    assert len(keep) <= MAX_PATH_POINTS and np.all(np.diff(keep) > 0)
    assert 77_777 in keep and 0 in keep and len(steps) - 1 in keep
    assert values[keep].min() == values.min() and math.isclose(values[keep].max(), 50.0)
    assert list(thin(steps[:10], values[:10])) == list(range(10))
