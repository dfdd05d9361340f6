"""The web page as text: pure functions from what :mod:`.site` gathered to HTML with inline SVG.

No template engine and nothing fetched from elsewhere: the page must work with no network access.
Every value that comes from a root (experiment names, hyperparameter values, metric names, change
lines, error messages) goes through :func:`esc` (``html.escape`` with quotes), in text and in
attributes alike, which are always double-quoted; the one script is a constant (nothing from the
root is interpolated into it) carrying the response's CSP nonce. The DOM contract the browser tests
rely on (ids, classes, ``data-*``) is listed in :mod:`weightslab.ui`.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..refs import short, short_ref
from ..units import size

if TYPE_CHECKING:
    from ..cli.catalog import CheckpointRow, ExperimentRow
    from ..cli.comparison import Comparison
    from ..storage.garbage import GcReport
    from .site import Card, Overview, Storage

__all__ = ["esc", "page", "card", "diff", "diff_page", "reclaimable", "error", "MAX_PATH_POINTS", "REASONS"]

#: A curve's path is drawn through at most about this many vertices (per bucket of steps its first,
#: lowest, highest and last value: the shape stays, spikes included); every checkpoint keeps its
#: clickable circle whatever the number.
MAX_PATH_POINTS = 2000

#: How an edge of the lineage names its reason (anything else is shown as recorded).
REASONS = {"config_change": "config", "model_change": "model", "state_change": "state",
           "restart_with_changes": "restart", "resume_with_changes": "resume", "fork": "fork",
           "lossy_resume": "lossy resume"}

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")

# Curves: the plot area inside the SVG's view box.
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 960, 360, 70, 20, 12, 34
# Lineage: one row per experiment, indented by depth.
ROW, INDENT, LABEL_X = 24, 18, 470


def esc(value: object) -> str:
    """Text or an attribute value, escaped (``&<>"'``): whatever a root holds shows as text."""
    return html.escape(str(value), quote=True)


def number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


# --- the page ---------------------------------------------------------------------------------------
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 3em;color:#222}
header{border-bottom:1px solid #ccc;padding:.6em 0}h1{font-size:1.3em;margin:0}
h2{font-size:1.1em;margin:1.2em 0 .4em}section{overflow-x:auto}
.warning{background:#fee;border:1px solid #c66;padding:.4em}
svg text{font:12px ui-monospace,monospace}svg .reason{fill:#555}
g.node circle{stroke:#333;stroke-width:1}g.edge path{fill:none;stroke:#999}
path.curve{fill:none;stroke-width:1.5}circle.point{cursor:pointer;stroke:#fff;stroke-width:.5}
circle.point.best{stroke:#000;stroke-width:2}circle.point.selected{stroke:#000;stroke-width:3}
.axis line{stroke:#bbb}.axis text{fill:#555}
.card{border:1px solid #ccc;padding:.6em 1em;max-width:60em}.card dl{display:grid;grid-template-columns:auto 1fr;gap:0 1em}
.card dt{font-weight:600}pre.command{background:#f4f4f4;padding:.3em .6em;margin:.3em 0;white-space:pre-wrap}
table{border-collapse:collapse}td,th{padding:.15em .6em;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}.damaged{color:#b00}.ok{color:#070}
code{font:12px ui-monospace,monospace}
"""

_SCRIPT = """
(function () {
  var card = document.getElementById('card');
  function show(ref) {
    fetch('/card?ref=' + encodeURIComponent(ref)).then(function (r) { return r.text(); })
      .then(function (h) { card.innerHTML = h; });
  }
  document.querySelectorAll('#curves svg').forEach(function (svg) {
    svg.addEventListener('click', function (e) {
      var p = e.target.closest('circle.point');
      if (!p) return;
      document.querySelectorAll('circle.point.selected').forEach(function (c) { c.classList.remove('selected'); });
      p.classList.add('selected');
      show(p.getAttribute('data-ref'));
    });
  });
  var metric = document.getElementById('metric');
  if (metric) metric.addEventListener('change', function () {
    var u = new URL(location.href); u.searchParams.set('metric', metric.value); location.href = u.toString();
  });
  card.addEventListener('submit', function (e) {
    var f = e.target;
    if (!f.classList.contains('verify')) return;
    e.preventDefault();
    f.querySelector('button').disabled = true;
    var body = new URLSearchParams(new FormData(f)); body.set('part', '1');
    fetch(f.getAttribute('action'), {method: 'POST', body: body}).then(function (r) { return r.text(); })
      .then(function (h) { card.innerHTML = h; });
  });
  card.addEventListener('click', function (e) {
    var b = e.target.closest('button[data-diff]');
    if (!b) return;
    document.querySelector('#diff input[name="' + b.getAttribute('data-diff') + '"]').value = b.getAttribute('data-ref');
  });
  var form = document.querySelector('#diff form'), out = document.getElementById('diff-result');
  if (form && out) form.addEventListener('submit', function (e) {
    e.preventDefault();
    var q = new URLSearchParams(new FormData(form)); q.set('part', '1');
    out.textContent = 'comparing...';
    fetch('/diff?' + q.toString()).then(function (r) { return r.text(); }).then(function (h) { out.innerHTML = h; });
  });
  var gc = document.getElementById('gc');
  if (gc) fetch('/gc').then(function (r) { return r.text(); }).then(function (h) { gc.innerHTML = h; });
})();
"""


def _document(title: str, body: str, *, nonce: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>weightslab: {esc(title)}</title><style nonce="{esc(nonce)}">{_STYLE}</style></head>\n'
            f'<body>\n{body}\n<script nonce="{esc(nonce)}">{_SCRIPT}</script>\n</body></html>\n')


def page(overview: Overview, *, metric: str | None, nonce: str, allow_actions: bool) -> str:
    """The whole page: lineage, curves of ``metric`` (default: loss, else the first), an empty card,
    the diff form, storage."""
    chosen = metric if metric in overview.metrics else ("loss" if "loss" in overview.metrics else
                                                        (overview.metrics[0] if overview.metrics else None))
    colors = {row.hash: PALETTE[i % len(PALETTE)] for i, row in enumerate(overview.experiments)}
    head = (f'<header><h1>weightslab</h1><p>root <code class="root">{esc(overview.location)}</code>: '
            f'{len(overview.experiments)} experiments, {len(overview.checkpoints)} checkpoints'
            f'{"" if allow_actions else "; read-only (start with --allow-actions to verify from here)"}</p>'
            + (f'<p class="warning">{esc(overview.warning)}</p>' if overview.warning else "")
            + ('<p class="warning">The metric asked for, ' + esc(metric) + ', is recorded by no checkpoint.</p>'
               if metric and metric != chosen else "")
            + "</header>")
    body = "\n".join([
        head,
        lineage(overview, colors),
        curves(overview, chosen, colors),
        '<section id="card"><h2>Checkpoint</h2><p>Click a point on a curve to see its checkpoint.</p></section>',
        diff_section(overview, None),
        storage_section(overview.storage),
    ])
    return _document(overview.location, body, nonce=nonce)


# --- lineage ----------------------------------------------------------------------------------------
def _tree(rows: Sequence[ExperimentRow]) -> list[tuple[ExperimentRow, int, str | None]]:
    """(row, depth, parent hash in this root) in depth-first order, children oldest first."""
    known = {r.hash for r in rows}
    children: dict[str | None, list[ExperimentRow]] = {}
    parent_of: dict[str, str | None] = {}
    for r in rows:
        parent = r.parent.split("@")[0] if r.parent else None
        parent = parent if parent in known and parent != r.hash else None
        parent_of[r.hash] = parent
        children.setdefault(parent, []).append(r)
    out: list[tuple[ExperimentRow, int, str | None]] = []
    seen: set[str] = set()
    stack = [(r, 0) for r in reversed(children.get(None, []))]
    while stack:
        r, depth = stack.pop()
        if r.hash in seen:
            continue
        seen.add(r.hash)
        out.append((r, depth, parent_of[r.hash]))
        stack.extend((c, depth + 1) for c in reversed(children.get(r.hash, [])))
    # (a damaged lineage with a circle of parents: listed flat rather than lost)
    out.extend((r, 0, None) for r in rows if r.hash not in seen)
    return out


def edge_label(reason: str | None, changes: Iterable[str]) -> str:
    what = "; ".join(changes)
    name = REASONS.get(reason or "", reason or "?")
    return f"{name}: {what}" if what else name


def lineage(overview: Overview, colors: dict[str, str]) -> str:
    order = _tree(overview.experiments)
    if not order:
        return '<section id="lineage"><h2>Lineage</h2><p>No experiments in this root yet.</p></section>'
    y_of = {r.hash: (i + 1) * ROW for i, (r, _, _) in enumerate(order)}
    x_of = {r.hash: 12 + depth * INDENT for r, depth, _ in order}
    deepest = max(depth for _, depth, _ in order)
    label_x = max(LABEL_X, 12 + deepest * INDENT + 380)
    edges, nodes = [], []
    for r, depth, parent in order:
        x, y = x_of[r.hash], y_of[r.hash]
        if parent is not None:
            px, py = x_of[parent], y_of[parent]
            label = edge_label(r.reason, overview.changes.get(r.hash, ()))
            edges.append(
                f'<g class="edge" data-parent="{esc(parent)}" data-child="{esc(r.hash)}" data-reason="{esc(r.reason or "")}">'
                f'<path d="M{px},{py} V{y} H{x}"/>'
                f'<text class="reason" x="{label_x}" y="{y + 4}">{esc(label)}<title>{esc(r.parent)}</title></text></g>')
        steps = "no checkpoints" if r.first_step is None else \
            f"steps {r.first_step}-{r.last_step}, {r.checkpoints} ckpt{'s' * (r.checkpoints != 1)}" + \
            (f" ({r.archived} lossy)" if r.archived else "")
        names = f" ({', '.join(r.names)})" if r.names else ""
        nodes.append(
            f'<g class="node" data-experiment="{esc(r.hash)}"><circle cx="{x}" cy="{y}" r="5" '
            f'fill="{colors[r.hash]}"/><text x="{x + 10}" y="{y + 4}"><tspan font-weight="bold">{esc(short(r.hash))}'
            f'</tspan>{esc(names)} {esc(steps)}</text><title>{esc(r.hash)}</title></g>')
    width = label_x + 520
    height = (len(order) + 1) * ROW
    return (f'<section id="lineage"><h2>Lineage</h2><svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">{"".join(edges)}{"".join(nodes)}</svg></section>')


# --- curves -----------------------------------------------------------------------------------------
def thin(steps: np.ndarray, values: np.ndarray, limit: int = MAX_PATH_POINTS) -> np.ndarray:
    """Indices of the points a path goes through: all of them up to ``limit``; beyond, per bucket of
    steps the first, lowest, highest and last (so a spike stays visible), in step order."""
    n = len(steps)
    if n <= limit:
        return np.arange(n)
    buckets = limit // 4
    span = float(steps[-1] - steps[0]) or 1.0
    bucket = np.minimum(((steps - steps[0]) / span * buckets).astype(np.int64), buckets - 1)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])  # steps are sorted: buckets are runs
    ends = np.r_[starts[1:], n] - 1
    order = np.lexsort((values, bucket))  # by bucket, then value: each run's lowest first, highest last
    lowest, highest = order[starts], order[ends]
    return np.unique(np.concatenate([starts, ends, lowest, highest]))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    stepsize = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / stepsize) * stepsize
    return [first + i * stepsize for i in range(int((high - first) / stepsize) + 1)]


def curves(overview: Overview, metric: str | None, colors: dict[str, str]) -> str:
    options = "".join(f'<option value="{esc(m)}"{" selected" if m == metric else ""}>{esc(m)}</option>'
                      for m in overview.metrics)
    chooser = (f'<form method="get" action="/"><label>metric <select id="metric" name="metric">{options}</select>'
               f'</label> <noscript><button>show</button></noscript></form>')
    if metric is None:
        return f'<section id="curves"><h2>Metrics</h2>{chooser}<p>No checkpoint records a metric yet.</p></section>'
    by_exp: dict[str, list[CheckpointRow]] = {}
    value_at: dict[str, float] = {}
    for row in overview.checkpoints:
        value = row.metrics.get(metric)
        if value is not None and math.isfinite(value):
            by_exp.setdefault(row.experiment, []).append(row)
            value_at[row.ref] = value
    every = np.fromiter(value_at.values(), float, len(value_at))
    all_steps = np.fromiter((int(r.split("@")[1]) for r in value_at), float, len(value_at))
    if not len(every):
        return (f'<section id="curves"><h2>Metrics</h2>{chooser}<p>No checkpoint records a finite {esc(metric)}.'
                f'</p></section>')
    x0, x1 = float(all_steps.min()), float(all_steps.max())
    y0, y1 = float(every.min()), float(every.max())
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.05 - 1e-12, y1 + abs(y1) * 0.05 + 1e-12
    pad = (y1 - y0) * 0.04
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(steps: np.ndarray) -> np.ndarray:
        return LEFT + (steps - x0) / (x1 - x0) * plot_w

    def sy(values: np.ndarray) -> np.ndarray:
        return TOP + (y1 - values) / (y1 - y0) * plot_h

    axis = ['<g class="axis">',
            f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>',
            f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>']
    for t in _ticks(y0, y1):
        y = float(sy(np.array([t]))[0])
        axis.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke-opacity=".3"/>'
                    f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(number(t))}</text>')
    for t in _ticks(x0, x1, 8):
        x = float(sx(np.array([t]))[0])
        axis.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{esc(number(t))}</text>')
    axis.append(f'<text x="{LEFT + plot_w}" y="{HEIGHT - 2}" text-anchor="end">step</text></g>')

    parents = {r.hash: r.parent for r in overview.experiments}
    paths, points = [], []
    for exp in (r.hash for r in overview.experiments):
        rows = sorted(by_exp.get(exp, ()), key=lambda r: r.step)
        if not rows:
            continue
        steps = np.fromiter((r.step for r in rows), float, len(rows))
        values = np.fromiter((value_at[r.ref] for r in rows), float, len(rows))
        xs, ys = sx(steps), sy(values)
        keep = thin(steps, values)
        vertices = [f"{xs[i]:.1f},{ys[i]:.1f}" for i in keep]
        parent = parents.get(exp)
        if parent in value_at:  # a child's curve starts from its parent's point
            p_step = float(parent.split("@")[1])
            vertices.insert(0, f"{float(sx(np.array([p_step]))[0]):.1f},{float(sy(np.array([value_at[parent]]))[0]):.1f}")
        color = colors[exp]
        paths.append(f'<path class="curve" data-experiment="{esc(exp)}" data-metric="{esc(metric)}" stroke="{color}" '
                     f'd="M{" L".join(vertices)}"/>')
        best = int(np.argmin(values))  # (first of equals: the earlier checkpoint, as @best)
        for i, r in enumerate(rows):
            cls = "point best" if i == best else "point"
            points.append(
                f'<circle class="{cls}" data-ref="{esc(r.ref)}" data-step="{r.step}" data-value="{float(values[i])!r}" '
                f'cx="{xs[i]:.1f}" cy="{ys[i]:.1f}" r="{4 if i == best else 3}" fill="{color}"/>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'data-metric="{esc(metric)}">{"".join(axis)}{"".join(paths)}{"".join(points)}</svg>')
    return (f'<section id="curves"><h2>Metrics</h2>{chooser}{svg}<p>One line per experiment (colours as in the '
            f'lineage); a child starts from its parent\'s point; the ringed point is each experiment\'s best (lowest '
            f'{esc(metric)}). Click a point for its checkpoint.</p></section>')


# --- the card ---------------------------------------------------------------------------------------
def card(found: Card, *, location: str, allow_actions: bool, token: str) -> str:
    row = found.row
    ref = row.ref
    refs = [ref] + [f"{name}@{row.step}" for name in found.names]
    root = shlex.quote(location)
    metrics = "".join(f"<dt>{esc(k)}</dt><dd>{esc(number(v))}</dd>" for k, v in sorted(row.metrics.items()))
    if row.exact:
        exact = "exact"
    else:
        error = "" if found.max_abs is None else f", max abs error {found.max_abs:.3g}"
        error += "" if found.rel_l2 is None else f", relative L2 {found.rel_l2:.3g}"
        exact = f"lossy: {found.codec or 'archived'} (chains of {row.chain} links{error})"
    v = found.verification
    if v is None:
        verified, cls = "not verified yet", ""
    elif v.ok:
        verified, cls = f"verified at {v.at}: every byte matches its digest ({v.blobs} blobs, {size(v.nbytes)})", "ok"
    else:
        verified, cls = f"DAMAGED (checked at {v.at}): {v.problem}", "damaged"
    if allow_actions:
        action = (f'<form class="verify" method="post" action="/verify"><input type="hidden" name="ref" '
                  f'value="{esc(ref)}"><input type="hidden" name="token" value="{esc(token)}">'
                  f'<button type="submit">verify</button></form>')
    else:
        action = f'<pre class="command">weightslab verify {esc(ref)} --root {esc(root)}</pre>'
    lossy = ", allow_lossy=True" if not row.exact else ""
    codes = " ".join(f'<code class="ref">{esc(r)}</code>' for r in refs)
    commands = [f"weightslab export {ref} model.safetensors --root {root}",
                f"system.resume({json.dumps(ref)}{lossy})",
                f"wl.fork({json.dumps(ref)}, ...)"]
    parent = (f'<p>experiment branched from <code>{esc(found.parent)}</code> '
              f'({esc(edge_label(found.reason, ()))})</p>' if found.parent else "")
    return (f'<div class="card" data-ref="{esc(ref)}"><h3>{esc(short_ref(ref))}'
            f'{esc(" (" + ", ".join(found.names) + ")") if found.names else ""}</h3>'
            f'<p>step <span class="step">{row.step}</span>; saved for <span class="reasons">'
            f'{esc(", ".join(row.reasons))}</span></p>{parent}'
            f'<dl class="metrics">{metrics}</dl>'
            f'<p>stored bytes only it holds: <span class="alone" data-bytes="{found.alone}">{size(found.alone)}</span>'
            f' (of {size(row.nbytes)} it references)</p>'
            f'<p><span class="exact">{esc(exact)}</span></p>'
            f'<p>integrity: <span class="verified {cls}">{esc(verified)}</span></p>{action}'
            f'<p>refs: {codes}</p>'
            + "".join(f'<pre class="command">{esc(c)}</pre>' for c in commands)
            + f'<p><button type="button" data-diff="a" data-ref="{esc(ref)}">diff: use as A</button> '
              f'<button type="button" data-diff="b" data-ref="{esc(ref)}">diff: use as B</button></p></div>')


# --- diff -------------------------------------------------------------------------------------------
def diff_section(overview: Overview, result: str | None, a: str = "", b: str = "") -> str:
    options = "".join(f'<option value="{esc(r.hash)}@latest">{esc(", ".join(r.names))}</option>'
                      for r in overview.experiments)
    return (f'<section id="diff"><h2>Diff two checkpoints</h2><form method="get" action="/diff">'
            f'<label>A <input name="a" list="refs" size="28" value="{esc(a)}"></label> '
            f'<label>B <input name="b" list="refs" size="28" value="{esc(b)}"></label> '
            f'<button type="submit">compare</button><datalist id="refs">{options}</datalist></form>'
            f'<div id="diff-result">{result or ""}</div></section>')


def diff(found: Comparison) -> str:
    def lines(cls: str, items: Sequence[str]) -> str:
        return f'<ul class="{cls}">' + "".join(f"<li>{esc(x)}</li>" for x in (items or ["(the same)"])) + "</ul>"
    rows = []
    for key, value in found.ranked():
        text = "shape differs" if value is None else ("identical" if value == 0 else f"{value:.3e}")
        rows.append(f'<tr data-key="{esc(key)}" data-value="{"" if value is None else repr(value)}"><td>'
                    f'{esc(key[len("models/"):])}</td><td class="n">{esc(text)}</td></tr>')
    only = f"<p>{len(found.only_in_one)} model tensors are in only one of them</p>" if found.only_in_one else ""
    return (f'<div class="diff-result" data-a="{esc(found.a)}" data-b="{esc(found.b)}"><h3>{esc(found.a)} -&gt; '
            f'{esc(found.b)}</h3><h4>hyperparameters</h4>{lines("hyperparams", found.hyperparams)}'
            f'<h4>architecture</h4>{lines("architecture", found.architecture)}'
            f'<h4>tensors (relative L2 norm of the difference, largest first)</h4><table class="tensors"><thead><tr>'
            f'<th>tensor</th><th>relative change</th></tr></thead><tbody>{"".join(rows)}</tbody></table>{only}</div>')


def diff_page(overview: Overview, result: str, a: str, b: str, *, nonce: str) -> str:
    body = (f'<header><h1>weightslab</h1><p>root <code class="root">{esc(overview.location)}</code> '
            f'(<a href="/">back to the page</a>)</p></header>' + diff_section(overview, result, a, b)
            + '<section id="card"></section>')
    return _document(overview.location, body, nonce=nonce)


def error(message: str) -> str:
    return f'<p class="error damaged">{esc(message)}</p>'


# --- storage ----------------------------------------------------------------------------------------
def storage_section(storage: Storage) -> str:
    rows = "".join(
        f'<tr data-experiment="{esc(r.hash)}"><td><code>{esc(short(r.hash))}</code></td><td>{esc(", ".join(r.names))}'
        f'</td><td class="n">{r.checkpoints}</td><td class="n">{r.archived}</td>'
        f'<td class="n" data-bytes="{r.bytes_alone}">{size(r.bytes_alone)}</td>'
        f'<td class="n" data-bytes="{storage.shared.get(r.hash, 0)}">{size(storage.shared.get(r.hash, 0))}</td></tr>'
        for r in storage.rows)
    alone = sum(r.bytes_alone for r in storage.rows)
    return (f'<section id="storage"><h2>Storage</h2><table class="storage"><thead><tr><th>experiment</th><th>names</th>'
            f'<th>checkpoints</th><th>archived (lossy)</th><th>bytes it alone holds</th><th>bytes shared with others'
            f'</th></tr></thead><tbody>{rows}</tbody><tfoot><tr><td colspan="4">every checkpoint references '
            f'<span class="total" data-bytes="{storage.total}">{size(storage.total)}</span> of stored blobs</td>'
            f'<td class="n" data-bytes="{alone}">{size(alone)}</td><td class="n" data-bytes="{storage.total - alone}">'
            f'{size(storage.total - alone)}</td></tr></tfoot></table>'
            f'<p id="gc"><a href="/gc">what would <code>weightslab gc</code> free?</a></p></section>')


def reclaimable(found: GcReport, *, remote: bool) -> str:
    if remote:
        return ('<span class="gc">a remote root\'s packs are not in the local mirror: run <code>weightslab gc '
                '--dry-run</code> for what gc would delete in the bucket</span>')
    return (f'<span class="gc" data-bytes="{found.bytes_freed}"><code>weightslab gc</code> would free '
            f'{size(found.bytes_freed)} now ({found.packs_deleted} packs deleted, {found.packs_rewritten} rewritten; '
            f'{size(found.bytes_dead_kept)} dead bytes left in young or mostly live packs; {found.live_blobs} live '
            f'blobs hold {size(found.bytes_live)}). A dry run: nothing was deleted.</span>')
