"""``weightslab ui``: a local web page over a root (server-rendered HTML and inline SVG, no network).

- :mod:`.site`: what the page shows, gathered from the root's catalog at every request (read-only);
- :mod:`.page`: rendering it as escaped HTML + SVG (pure functions);
- :mod:`.server`: the HTTP server (``make_server(root, host=, port=, allow_actions=)``).

The DOM contract (what browser tests rely on):

- ``<title>weightslab: ROOT</title>``;
- ``section#lineage`` with an ``svg``: ``g.node[data-experiment=HASH]`` (its ``text`` shows the short
  hash and the names), ``g.edge[data-parent=HASH][data-child=HASH][data-reason=REASON]`` with
  ``text.reason`` ("config: config.optimizer.lr: 0.1 -> 0.01"); REASON as recorded (config_change, fork, ...);
- ``section#curves``: ``select#metric`` (``option[value=NAME]``; a change reloads with ``?metric=NAME``),
  an ``svg`` with ``path.curve[data-experiment][data-metric]`` and per checkpoint recording a finite
  value ``circle.point[data-ref=HASH@STEP][data-step][data-value]``, ``circle.point.best`` per experiment;
- ``section#card``: a click on a point inserts ``/card?ref=`` there: ``div.card[data-ref]`` with
  ``span.step``, ``dl.metrics`` (``dt``/``dd``), ``span.reasons``, ``span.exact`` ("exact" or
  "lossy: ..."), ``span.alone[data-bytes]``, ``span.verified``, ``pre.command`` blocks, and
  ``form.verify`` (with ``--allow-actions``);
- ``section#diff``: a ``form`` with ``input[name=a]``, ``input[name=b]``; the result (in
  ``div#diff-result``, or the page ``/diff?a=&b=``) is ``div.diff-result`` with ``ul.hyperparams``,
  ``ul.architecture`` and ``table.tensors`` (``tr[data-key][data-value]``);
- ``section#storage`` with ``table.storage``: one ``tr[data-experiment=HASH]`` per experiment, and
  ``#gc`` (filled from ``/gc``).
"""

__all__: list[str] = []
