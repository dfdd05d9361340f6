"""The ``weightslab`` command line: browse, compare, verify, clean and export experiments.

Every subcommand reads a root (``--root``, default ``$WEIGHTSLAB_ROOT`` or ``./experiments``)
without the model's code; listings come from the catalog (``index.sqlite``, derived from the
manifests and rebuilt when missing or damaged). Output fits 80 columns and is coloured only on a
terminal (``NO_COLOR`` or ``--color never`` turn it off); every listing has ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import yaml

from .._version import __version__
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, NotARootError, WeightslabError
from ..refs import short, short_ref
from ..units import size
from ..storage.experiment import ExperimentRecord
from ..storage.layout import Layout
from ..storage.names import read_names
from ..storage.root import Root

__all__ = ["main", "EXIT_CODES"]

#: What a script can rely on.
EXIT_CODES = {
    0: "success",
    1: "verify found damaged checkpoints (each is named on the output)",
    2: "bad usage: an unknown option, or a ref that is not written as a ref",
    3: "the root is not a weightslab root",
    4: "the ref names nothing: no such experiment, name or step",
    5: "a manifest or experiment record is damaged, or written by a newer weightslab",
    6: "any other error: the disk, the operating system, a bad argument (the message says what)",
}

WIDTH = 80


class CliError(Exception):
    """An error with its exit code, printed as one line."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --- output ----------------------------------------------------------------------------------------
class Out:
    """Where the command writes, and whether it may use colour."""

    def __init__(self, stream: TextIO, color: str):
        self.stream = stream
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.color = color == "always" or (color == "auto" and tty and not os.environ.get("NO_COLOR"))

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def json(self, value: Any) -> None:
        self.stream.write(json.dumps(value, indent=1, sort_keys=False, default=str) + "\n")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "~"


def _table(out: Out, header: Sequence[str], rows: Iterable[Sequence[str]], widths: Sequence[int]) -> None:
    def fmt(cells: Sequence[str]) -> str:
        return " ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out.line(out.paint(fmt(header), "1"))
    for row in rows:
        out.line(fmt(row))


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


# --- the root ----------------------------------------------------------------------------------------
def _root(args: argparse.Namespace) -> Root:
    """The root the command reads, opened once: a remote root through a local mirror of its
    manifests (packs are fetched when a command reads tensors)."""
    if getattr(args, "opened", None) is None:
        try:
            args.opened = Root.existing(args.root or None)
        except NotARootError as exc:
            raise CliError(f"{exc}", 3) from None
    return args.opened


def _fetch(args: argparse.Namespace, manifests: Iterable[Any]) -> None:
    """On a remote root: the packs these checkpoints need, into the local mirror (for the commands
    that hand the mirror to code with a manager of its own, such as export)."""
    remote = _root(args).remote
    if remote is not None:
        for manifest in manifests:
            remote.pull_packs(manifest)


def _manager(args: argparse.Namespace) -> Any:
    from ..storage.manager import CheckpointManager
    return CheckpointManager(_root(args))


def _catalog(root: Any) -> Any:
    from .catalog import Catalog
    return Catalog(root)


def _record(layout: Layout, exp_hash: str) -> ExperimentRecord | None:
    """The experiment's record, or None when it is missing or damaged (a listing goes on without
    its changes; the catalog already warned about a damaged one)."""
    path = layout.experiment_record(exp_hash)
    try:
        return ExperimentRecord.from_bytes(path.read_bytes(), path=path)
    except (FileNotFoundError, CorruptCheckpointError, FormatVersionError):
        return None


def _entry(manager: Any, ref: str) -> Any:
    """The one checkpoint ``ref`` means."""
    try:
        entries = manager.candidates(ref)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    if not entries:
        raise CliError(f"{ref!r} names no checkpoint under {manager.layout.root}; `weightslab ls` lists what is "
                       "there", 4)
    return entries[0]


def _experiment(manager: Any, ref: str) -> str:
    """The experiment hash ``ref`` means: a name, a hash (prefix), or any checkpoint ref."""
    names = manager.names()
    if ref in names:
        return names[ref]
    bare = "@" not in ref and not os.path.exists(ref)
    return _entry(manager, f"{ref}@latest" if bare else ref).experiment


def _pick_metric(row: Any, wanted: str | None) -> tuple[str, float] | None:
    """The BEST cell: ``--metric NAME`` (lowest wins) or ``NAME:max``; by default loss, else the first."""
    name, _, mode = (wanted or "").partition(":")
    values = row.highest if mode == "max" else row.best
    if not values:
        return None
    if not name:
        name = "loss" if "loss" in values else sorted(values)[0]
    return (name, values[name]) if name in values else None


# --- ls ------------------------------------------------------------------------------------------------
_REASONS = {"config_change": "config", "model_change": "model", "restart_with_changes": "restart",
            "resume_with_changes": "resume"}


def cmd_ls(args: argparse.Namespace, out: Out) -> int:
    layout = _root(args).layout
    with _catalog(layout) as catalog:
        rows = catalog.experiments()
    if args.json:
        out.json([dataclasses.asdict(r) for r in rows])
        return 0
    if not rows:
        out.line(f"no experiments under {layout.root}")
        return 0
    table = []
    for r in rows:
        best = _pick_metric(r, args.metric)
        steps = "-" if r.first_step is None else f"{r.first_step}-{r.last_step}"
        # CKPTS: committed ("~N": N of them in the lossy archive), and "+N" saves replaced before they
        # were written (backpressure="latest")
        count = str(r.checkpoints) + (f"~{r.archived}" if r.archived else "") + (f"+{r.dropped}" if r.dropped else "")
        table.append([short(r.hash), ",".join(r.names) or "-", short_ref(r.parent), r.reason or "-", steps,
                      count, size(r.bytes_alone),
                      f"{best[0]} {_number(best[1])}" if best else "-"])
        table[-1][3] = _REASONS.get(table[-1][3], table[-1][3])
    _table(out, ["HASH", "NAME", "PARENT", "REASON", "STEPS", "CKPTS", "ALONE", "BEST"], table,
           [8, 10, 13, 7, 11, 5, 8, 11])  # 80 columns with the separating spaces
    return 0


# --- log -----------------------------------------------------------------------------------------------
def cmd_log(args: argparse.Namespace, out: Out) -> int:
    layout = _root(args).layout
    with _catalog(layout) as catalog:
        rows = {r.hash: r for r in catalog.experiments()}
    children: dict[str | None, list[str]] = {}
    for h, r in rows.items():
        parent = r.parent.split("@")[0] if r.parent else None
        children.setdefault(parent if parent in rows else None, []).append(h)
    focus: set[str] | None = None
    if args.ref:
        target = _experiment(_manager(args), args.ref)
        focus = {target}
        h = target  # its ancestors ...
        while rows.get(h) and rows[h].parent and rows[h].parent.split("@")[0] in rows:
            h = rows[h].parent.split("@")[0]
            focus.add(h)
        todo = [target]  # ... and its descendants
        while todo:
            for child in children.get(todo.pop(), []):
                focus.add(child)
                todo.append(child)
    records = {h: _record(layout, h) for h in rows if focus is None or h in focus}
    if args.json:
        out.json([{"hash": h, "names": list(rows[h].names), "parent": rows[h].parent, "reason": rows[h].reason,
                   "changes": list(records[h].parent.changes) if records[h] and records[h].parent else [],
                   "children": [c for c in children.get(h, []) if c in records],
                   "steps": [rows[h].first_step, rows[h].last_step], "checkpoints": rows[h].checkpoints,
                   "archived": rows[h].archived}
                  for h in records])
        return 0

    def show(h: str, prefix: str, last: bool, top: bool) -> None:
        r, rec = rows[h], records[h]
        branch = "" if top else ("`-- " if last else "|-- ")
        names = f" ({', '.join(r.names)})" if r.names else ""
        steps = "no checkpoints" if r.first_step is None else \
            f"steps {r.first_step}-{r.last_step}, {r.checkpoints} checkpoint{'s' * (r.checkpoints != 1)}" + \
            (f" ({r.archived} in the lossy archive)" if r.archived else "") + \
            (f" ({r.dropped} replaced by newer saves)" if r.dropped else "")
        text = _cut(f"{prefix}{branch}* {short(h)}{names}  {steps}", WIDTH)
        out.line(text.replace(f"* {short(h)}", f"* {out.paint(short(h), '33')}", 1))
        inner = prefix + ("" if top else ("    " if last else "|   "))
        if rec is not None and rec.parent is not None:
            what = "; ".join(rec.parent.changes) or "no readable difference"
            out.line(_cut(f"{inner}{'|' if children.get(h) else ' '}   {rec.parent.reason} at "
                          f"{short_ref(rec.parent.ref)}: {what}", WIDTH))
        kids = [c for c in children.get(h, []) if c in records]
        for i, child in enumerate(kids):
            show(child, inner, i == len(kids) - 1, False)

    roots = [h for h in children.get(None, []) if h in records]
    if not roots:
        out.line(f"no experiments under {layout.root}")
    for h in roots:
        show(h, "", True, True)
    return 0


# --- show ----------------------------------------------------------------------------------------------
def _hyperparams(manifest: Any) -> dict[str, Any]:
    from .comparison import hyperparams_of
    return hyperparams_of(manifest)


def _yaml(value: Any) -> str:
    plain = json.loads(json.dumps(value, default=str))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, width=WIDTH - 4).rstrip()


def cmd_show(args: argparse.Namespace, out: Out) -> int:
    manager = _manager(args)
    entry = _entry(manager, args.ref)
    manifest = manager.read_manifest(entry)
    record = manager.read_experiment(manifest.experiment)
    names = [n for n, h in read_names(manager.layout).items() if h == manifest.experiment]
    from .. import codec
    metrics = codec.decode(dict(manifest.metrics), {})
    raw = sum(t.size for t in manifest.tensors.values())
    models: dict[str, int] = {}
    for key, t in manifest.tensors.items():
        if key.startswith("models/"):
            name = key.split("/")[1]
            models[name] = models.get(name, 0) + math.prod(t.shape)
    info = {
        "ref": manifest.ref, "names": names, "step": manifest.step, "created": manifest.created,
        "reasons": list(manifest.reasons), "changes": list(manifest.changes), "metrics": metrics,
        "tensors": len(manifest.tensors), "stored_bytes": manifest.total_bytes, "raw_bytes": raw,
        "parent": record.parent.to_json() if record and record.parent else None,
        "branch": record.branch if record else None, "hyperparams": _hyperparams(manifest),
        "parameters": models, "path": str(entry.path), "exact": manifest.exact, "archive": dict(manifest.archive),
        "errors": {k: {"max_abs": t.max_abs, "rel_l2": t.rel_l2, "links": len(t.links)}
                   for k, t in manifest.tensors.items() if not t.exact},
    }
    if args.json:
        out.json(info)
        return 0
    out.line(out.paint(f"checkpoint {manifest.ref}", "1") + (f"  ({', '.join(names)})" if names else ""))
    out.line(f"created     {manifest.created}")
    out.line(f"reasons     {', '.join(manifest.reasons)}")
    if metrics:
        out.line(_cut("metrics     " + ", ".join(f"{k}={_number(float(v))}" for k, v in metrics.items()), WIDTH))
    out.line(f"tensors     {len(manifest.tensors)}, {size(manifest.total_bytes)} stored ({size(raw)} raw)")
    if not manifest.exact:  # (a checkpoint of the lossy archive: what it is, its errors, how to resume it)
        archive, worst = manifest.archive, sorted(((t.rel_l2, k, t) for k, t in manifest.tensors.items()
                                                    if not t.exact), reverse=True)
        settings = " ".join(f"{k}={v}" for k, v in dict(archive.get("params", {})).items() if k != "codec")
        out.line(out.paint(f"exact       no: lossy archive, {archive.get('codec', '?')} {settings}", "33"))
        out.line(_cut(f"              {len(worst)} tensors lossy: max abs error {archive.get('max_abs', 0):.3g}, "
                      f"relative L2 {archive.get('rel_l2', 0):.3g} at most", WIDTH))
        out.line(_cut(f"              against {archive.get('base', '?')}, chains of {archive.get('chain', '?')} links",
                      WIDTH))
        out.line("              resume it only with allow_lossy=True")
        for _, key, t in worst[:5]:
            out.line(_cut(f"              {key}: max abs {t.max_abs:.3g}, rel L2 {t.rel_l2:.3g}", WIDTH))
    if record and record.parent:
        out.line(_cut(f"parent      {record.parent.ref} ({record.parent.reason})", WIDTH))
        for change in record.parent.changes:
            out.line(_cut(f"              {change}", WIDTH))
    for change in manifest.changes:
        if change.get("kind") not in ("config_change", "model_change") and change.get("diff"):
            out.line(_cut(f"change      {change.get('kind')}: {'; '.join(map(str, change['diff']))}", WIDTH))
    out.line(_cut(f"file        {os.path.relpath(entry.path, manager.layout.root)} (under --root)", WIDTH))
    out.line(out.paint("hyperparameters", "1"))
    hp = _hyperparams(manifest)
    out.line("\n".join("  " + line for line in _yaml(hp).splitlines()) if hp else "  (none registered)")
    out.line(out.paint("architecture", "1"))
    for model, modules in (record.architecture if record else []):
        out.line(_cut(f"  model {model!r}: {len(modules)} modules, {models.get(model, 0):,} parameters", WIDTH))
        for m in modules[1:]:
            out.line(_cut(f"    {m['name']:<24} {m['class'].rsplit('.', 1)[-1]}({m['config']})", WIDTH))
    return 0


# --- diff ----------------------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace, out: Out) -> int:
    from .comparison import compare
    manager = _manager(args)
    ea, eb = _entry(manager, args.a), _entry(manager, args.b)
    found = compare(manager, manager.read_manifest(ea), manager.read_manifest(eb))
    if args.json:
        out.json(found.to_json())
        return 0
    out.line(out.paint(f"{found.a} -> {found.b}", "1"))
    out.line(out.paint("hyperparameters", "1"))
    for line in found.hyperparams or ["(the same)"]:
        out.line(_cut(f"  {line}", WIDTH))
    out.line(out.paint("architecture", "1"))
    for line in found.architecture or ["(the same)"]:
        out.line(_cut(f"  {line}", WIDTH))
    out.line(out.paint("tensors (relative L2 norm of the difference, largest first)", "1"))
    ranked = found.ranked()
    shown = ranked if args.all else ranked[:20]
    for key, value in shown:
        text = "shape differs" if value is None else ("identical" if value == 0 else f"{value:.3e}")
        out.line(_cut(f"  {key[len('models/'):]:<60} {text}", WIDTH))
    if len(ranked) > len(shown):
        out.line(f"  ... and {len(ranked) - len(shown)} more (--all shows them)")
    if found.only_in_one:
        out.line(f"  {len(found.only_in_one)} model tensors are in only one of them")
    return 0


# --- verify, gc, prune ------------------------------------------------------------------------------------
def _progress_bar(stream: TextIO) -> Callable[[int, int], None] | None:
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None

    def show(done: int, total: int) -> None:
        width = 40
        filled = int(width * done / total) if total else width
        stream.write(f"\rverifying [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show


def cmd_verify(args: argparse.Namespace, out: Out) -> int:
    manager = _manager(args)
    if args.ref is not None:
        _entry(manager, args.ref)  # an unknown ref is exit 4, not "damaged"
    report = manager.verify(args.ref, progress=_progress_bar(sys.stderr))
    if args.json:
        out.json({"ok": report.ok, "checked": list(report.checked), "blobs": report.blobs, "bytes": report.nbytes,
                  "damaged": [{"ref": r, "problem": why} for r, why in report.damaged]})
    else:
        verdict = out.paint("all verify", "32") if report.ok else out.paint(f"{len(report.damaged)} damaged", "31")
        out.line(f"{len(report.checked)} checkpoints, {report.blobs} blobs ({size(report.nbytes)}) checked: "
                 f"{verdict}")
        for ref, why in report.damaged:
            out.line(f"  {ref}: {why}")
    return 0 if report.ok else 1


def cmd_gc(args: argparse.Namespace, out: Out) -> int:
    from ..storage import garbage
    manager = _manager(args)
    remote = _root(args).remote
    if remote is not None:  # the bucket's packs, not the local mirror's
        report = garbage.collect_remote(remote, grace_seconds=args.grace, dry_run=args.dry_run)
    else:
        report = garbage.collect(manager, grace_seconds=args.grace, dry_run=args.dry_run)
    if args.json:
        out.json(dataclasses.asdict(report))
    else:
        out.line(str(report))
    return 0


def _bytes_only_in(manager: Any, deleted: Sequence[str], kept: Sequence[str]) -> int:
    """Stored bytes of the blobs only the ``deleted`` checkpoints reference (what gc then frees)."""
    def blobs(refs: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for ref in refs:
            for t in manager.read_manifest(_entry(manager, ref)).tensors.values():
                for blob in t.blobs():
                    found[blob.digest] = blob.nbytes
        return found
    gone, stay = blobs(deleted), blobs(kept)
    return sum(n for d, n in gone.items() if d not in stay)


def cmd_prune(args: argparse.Namespace, out: Out) -> int:
    from ..retention import Retention
    manager = _manager(args)
    if not any((args.keep_last, args.keep_every, args.keep_best, args.keep_changes)):
        raise CliError("prune needs a policy: --keep-last N, --keep-every K, --keep-best K --metric M or "
                       "--keep-changes", 2)
    try:
        retention = Retention.of(keep_last=args.keep_last, keep_every=args.keep_every, keep_best=args.keep_best,
                                 metric=args.metric, mode=args.mode, keep_changes=args.keep_changes,
                                 archive=_archive(args))
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    plan = manager.apply_retention(retention, dry_run=True)
    freed = _bytes_only_in(manager, plan.delete_refs, plan.keep_refs)
    if not args.dry_run and (plan.delete or plan.demote):
        plan = manager.apply_retention(retention)  # (on a remote root, the bucket's commit objects go first)
    if args.json:
        out.json({"dry_run": args.dry_run, "delete": list(plan.delete_refs), "keep": {r: list(plan.why.get(r, ()))
                  for r in plan.keep_refs}, "archive": list(plan.demote_refs), "bytes_freed_by_gc": freed})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    out.line(f"{verb} {len(plan.delete)} of {len(plan.delete) + len(plan.keep)} checkpoints; `weightslab gc` then "
             f"frees {size(freed)}")
    for ref in plan.delete_refs:
        out.line(f"  - {ref}")
    if retention.archive is not None:
        verb = "would archive" if args.dry_run else "archived"
        out.line(f"{verb} {len(plan.demote)} with {retention.archive.describe()}; `weightslab gc` then frees the "
                 "exact bytes only they held")
        for demotion in plan.demote:
            out.line(f"  ~ {demotion.ref} (against {demotion.base.ref}, link {demotion.chain})")
    return 0


def _archive(args: argparse.Namespace) -> Any:
    """The archive ``prune --archive CODEC [--bits N] [--codec-param K=V ...]`` asks for, or None."""
    settings: dict[str, Any] = {}
    for item in args.codec_param or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--codec-param {item!r}: expected KEY=VALUE, such as bits=3", 2)
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    if args.bits is not None:
        settings["bits"] = args.bits
    if args.archive is None:
        if settings or args.max_chain is not None or args.optimizer is not None:
            raise CliError("--bits, --codec-param, --max-chain and --optimizer set up the lossy archive: add "
                           "--archive lc or --archive excp", 2)
        return None
    from ..storage.archive import Archive
    given = {k: v for k, v in (("max_chain", args.max_chain), ("optimizer", args.optimizer)) if v is not None}
    return Archive.of(args.archive, **given, **settings)  # (what is not given: Archive's defaults)


# --- export, resume-info, reindex ----------------------------------------------------------------------
def cmd_export(args: argparse.Namespace, out: Out) -> int:
    from ..portable import export
    manager = _manager(args)
    entry = _entry(manager, args.ref)
    _fetch(args, [manager.read_manifest(entry)])
    try:
        path = export(str(entry.path), args.out, root=manager.layout.root, model=args.model)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    if args.json:
        out.json({"ref": entry.ref, "path": str(path), "bytes": path.stat().st_size})
    else:
        out.line(f"wrote {entry.ref} to {path} ({size(path.stat().st_size)})")
    return 0


def cmd_resume_info(args: argparse.Namespace, out: Out) -> int:
    manager = _manager(args)
    entry = _entry(manager, args.ref)
    manifest = manager.read_manifest(entry)
    state = manifest.state
    groups = {kind: sorted(state.get(kind, {})) for kind in
              ("models", "optimizers", "schedulers", "scalers", "dataloaders", "custom", "hyperparams")}
    rng = sorted(state.get("rng", {})) if isinstance(state.get("rng"), Mapping) else []
    info = {"ref": manifest.ref, "step": manifest.step, "next_step": manifest.step + 1, **groups, "rng": rng,
            "tensors": len(manifest.tensors), "bytes": manifest.total_bytes}
    if args.json:
        out.json(info)
        return 0
    out.line(out.paint(f"resume({manifest.ref!r}) restores step {manifest.step}; the loop continues at step "
                       f"{manifest.step + 1}", "1"))
    labels = {"models": "models", "optimizers": "optimizers", "schedulers": "schedulers", "scalers": "grad scalers",
              "dataloaders": "loader positions", "custom": "custom state", "hyperparams": "hyperparameters"}
    for kind, label in labels.items():
        out.line(_cut(f"  {label:<17} {', '.join(groups[kind]) or '-'}", WIDTH))
    out.line(_cut(f"  {'random generators':<17} {', '.join(rng) or '-'} (restored last)", WIDTH))
    out.line(f"  {len(manifest.tensors)} tensors, {size(manifest.total_bytes)}, every byte verified on the way in")
    out.line("  it must be registered under the same names, with the same architecture")
    return 0


def cmd_reindex(args: argparse.Namespace, out: Out) -> int:
    layout = _root(args).layout
    with _catalog(layout) as catalog:
        count = catalog.reindex()
    if args.json:
        out.json({"checkpoints": count, "path": str(layout.catalog_path)})
    else:
        out.line(f"indexed {count} checkpoints into {layout.catalog_path}")
    return 0


# --- ui ----------------------------------------------------------------------------------------------
def cmd_ui(args: argparse.Namespace, out: Out) -> int:
    from ..ui.server import is_loopback, make_server
    try:
        server = make_server(args.root or None, host=args.host, port=args.port, allow_actions=args.allow_actions)
    except NotARootError as exc:
        raise CliError(f"{exc}", 3) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); pick another --port, or 0 "
                       "for any free one", 6) from None
    if not is_loopback(args.host):
        sys.stderr.write(f"weightslab: warning: listening on {args.host}: anyone who can reach this address sees "
                         "the runs of this root" + (" and can verify checkpoints" if args.allow_actions else "") +
                         "; the default, 127.0.0.1, is this machine only\n")
    out.line(f"weightslab ui: {server.url} (root {server.site.location}"
             f"{', actions allowed' if args.allow_actions else ', read-only'}); Ctrl-C stops it")
    out.stream.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


# --- the parser ----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {what}" for code, what in EXIT_CODES.items())
    p = argparse.ArgumentParser(
        prog="weightslab", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Browse, compare, verify, clean and export the experiments of a weightslab root.",
        epilog=f"refs: <hash>@<step>, <hash>@latest, <hash>@best[:metric[:max]], <name>@..., or a manifest "
               f"path (a unique hash prefix of 4+ characters is enough)\n\nexit codes:\n{codes}")
    p.add_argument("--version", action="version", version=f"weightslab {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    # Accepted before or after the subcommand; after it, only when given (SUPPRESS), so that a
    # value given before the subcommand is not overwritten by the subcommand's default.
    for parser_, default in ((p, True), (common, False)):
        keep = (lambda value: value) if default else (lambda value: argparse.SUPPRESS)
        parser_.add_argument("--root", default=keep(None),
                             help="the root_log_dir training used (default: $WEIGHTSLAB_ROOT or ./experiments)")
        parser_.add_argument("--json", action="store_true", default=keep(False), help="machine-readable output")
        parser_.add_argument("--color", choices=("auto", "always", "never"), default=keep("auto"),
                             help="colour the output (auto: only on a terminal, unless NO_COLOR is set)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help,
                            epilog=f"exit codes:\n{codes}", formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        return sp

    sp = add("ls", cmd_ls, "one row per experiment: hash, name, parent, reason, steps, checkpoints, bytes it "
                           "alone holds, best metric")
    sp.add_argument("--metric", help="the metric of the BEST column, lowest wins; NAME:max when higher is better "
                                     "(default: loss, else the first recorded)")
    sp = add("log", cmd_log, "the lineage as a tree, with the reason of each branch point")
    sp.add_argument("ref", nargs="?", help="show only this experiment's ancestors and descendants")
    sp = add("show", cmd_show, "one checkpoint: manifest, hyperparameters, metrics, sizes, architecture")
    sp.add_argument("ref")
    sp = add("diff", cmd_diff, "hyperparameter, architecture and per-tensor differences of two checkpoints")
    sp.add_argument("a")
    sp.add_argument("b")
    sp.add_argument("--all", action="store_true", help="list every tensor, not the 20 that changed most")
    sp = add("verify", cmd_verify, "read back and check every byte of one or all checkpoints; exit 1 naming "
                                   "every damaged file")
    sp.add_argument("ref", nargs="?")
    sp = add("gc", cmd_gc, "delete the stored bytes no checkpoint references any more")
    sp.add_argument("--dry-run", action="store_true", help="only say what would be freed")
    sp.add_argument("--grace", type=float, default=300.0, help="leave packs younger than this many seconds")
    sp = add("prune", cmd_prune, "delete the checkpoints a retention policy does not keep (then run gc)")
    sp.add_argument("--keep-last", type=int)
    sp.add_argument("--keep-every", type=int)
    sp.add_argument("--keep-best", type=int)
    sp.add_argument("--metric")
    sp.add_argument("--mode", choices=("min", "max"), default="min")
    sp.add_argument("--keep-changes", action="store_true", help="keep checkpoints taken on a change")
    sp.add_argument("--dry-run", action="store_true", help="only say what would go")
    sp.add_argument("--archive", choices=("lc", "excp"), help="demote what would be deleted to the lossy archive "
                    "with this codec instead (guides/storage.md)")
    sp.add_argument("--bits", type=int, help="the codec's bits (lc: 2**bits - 1 buckets; excp: quantization levels)")
    sp.add_argument("--codec-param", action="append", metavar="KEY=VALUE", help="another parameter of the codec")
    sp.add_argument("--max-chain", type=int, help="the longest chain of lossy links (default 16)")
    sp.add_argument("--optimizer", choices=("lossy", "exact"), help="archive optimizer state too (lossy, the "
                    "default) or keep it exact")
    sp = add("export", cmd_export, "write a checkpoint as one .safetensors (weights) or .pt (everything) file")
    sp.add_argument("ref")
    sp.add_argument("out")
    sp.add_argument("--model", help="which model, when the checkpoint holds several (.safetensors)")
    sp = add("resume-info", cmd_resume_info, "what a resume from REF would restore")
    sp.add_argument("ref")
    add("reindex", cmd_reindex, "rebuild the catalog (index.sqlite) from the manifests")
    sp = add("ui", cmd_ui, "a local web page over the root: lineage, metric curves, checkpoints, diffs, storage "
                           "(serves until Ctrl-C)")
    sp.add_argument("--port", type=int, default=8765, help="the port to listen on (default 8765; 0: any free port)")
    sp.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                    "only; another address lets anyone who reaches it see the runs)")
    sp.add_argument("--allow-actions", action="store_true", help="let the page verify checkpoints (a button per "
                    "checkpoint; nothing destructive); without it the page only reads")
    return p


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None) -> int:
    args = parser().parse_args(argv)
    out = Out(stdout or sys.stdout, args.color)
    try:
        return args.func(args, out)
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except CheckpointNotFoundError as exc:
        return _fail(str(exc), 4)
    except (CorruptCheckpointError, FormatVersionError) as exc:
        return _fail(str(exc), 5)
    except WeightslabError as exc:
        return _fail(str(exc), 6)
    except BrokenPipeError:  # `weightslab ls | head`
        return 0
    except OSError as exc:  # a path too long, a file where a directory belongs, a full or read-only disk
        return _fail(_os_error(exc), 6)
    except Exception as exc:  # noqa: BLE001 - a command line answers with one line and its exit code
        if os.environ.get("WEIGHTSLAB_DEBUG"):
            raise
        return _fail(f"{exc} ({type(exc).__name__}; set WEIGHTSLAB_DEBUG=1 for the traceback)", 6)


def _os_error(exc: OSError) -> str:
    """``[Errno 36] File name too long: '/very/long/...'`` as ``/very/long/...: file name too long``."""
    if exc.filename is None or exc.strerror is None:
        return str(exc)
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"{where}: {exc.strerror[:1].lower()}{exc.strerror[1:]}"


def _fail(message: str, code: int) -> int:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    sys.stderr.write(f"weightslab: error: {one_line}\n")
    return code
