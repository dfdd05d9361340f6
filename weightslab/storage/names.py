"""Human names for experiments: ``<root>/names/<name>.json``, one small sealed document per name.

A name points at one experiment hash, like a git branch points at a commit; an experiment may have
several names. Names live apart from ``experiment.json`` because that record is written once and
never changed, while a person names an experiment whenever they like. Each name is its own file,
written atomically, so naming never rewrites a shared file and two processes naming different
experiments cannot lose each other's work.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import CorruptCheckpointError, WeightslabError
from ..refs import check_name
from .atomic import atomic_write, make_dirs
from .identifiers import check_experiment
from .layout import Layout
from .manifest import FORMAT_VERSION, seal, unseal

__all__ = ["read_names", "set_name", "names_of", "check_new_name"]

log = logging.getLogger(__name__)

KIND = "weightslab.name"


def read_names(layout: Layout) -> dict[str, str]:
    """``{name: experiment hash}`` of every readable name of the root (damaged files are skipped
    with a warning: a name is a convenience, the experiment itself is unaffected). A file counts
    when it is a regular file (not a link), holds a valid name, the one its file name says, and an
    experiment hash: the hash builds paths."""
    names: dict[str, str] = {}
    try:
        paths = sorted(layout.names_dir.glob("*.json"))
    except (FileNotFoundError, NotADirectoryError):
        return names
    for path in paths:
        try:
            if path.is_symlink():
                raise ValueError("it is a symbolic link, and weightslab never follows links in a root")
            body: dict[str, Any] = unseal(path.read_bytes(), path=path, kind=KIND)
            name = check_name(body["name"])
            if f"{name}.json" != path.name:
                raise ValueError(f"it holds the name {name!r}, not the one its file name says")
            names[name] = check_experiment(body["experiment"])
        except FileNotFoundError:
            continue  # renamed meanwhile
        except (WeightslabError, KeyError, TypeError, ValueError, OSError) as exc:
            log.warning("ignoring the experiment name file %s: %s; delete it, or name the experiment again", path, exc)
    return names


def names_of(layout: Layout, exp_hash: str) -> list[str]:
    """The names pointing at ``exp_hash``, sorted."""
    return sorted(name for name, h in read_names(layout).items() if h == exp_hash)


def check_new_name(layout: Layout, name: str) -> None:
    """ValueError unless ``name`` can name a new experiment: it is valid and names none yet."""
    check_name(name)
    current = read_names(layout).get(name)
    if current is not None:
        raise ValueError(f"that name already names experiment {current}; continue it with "
                         f"system.resume('{name}@latest'), or choose another name")


def set_name(layout: Layout, name: str, exp_hash: str, *, created: str, replace: bool = False) -> None:
    """Point ``name`` at ``exp_hash``. Raises ValueError for a name that is not valid, or that
    already names another experiment unless ``replace``."""
    check_name(name)
    path = layout.name_file(name)
    try:
        current = unseal(path.read_bytes(), path=path, kind=KIND).get("experiment")
    except FileNotFoundError:
        current = None
    except CorruptCheckpointError:
        current = None  # a damaged name file is replaced
    if current == exp_hash:
        return
    if current is not None and not replace:
        raise ValueError(f"the name {name!r} already names experiment {current}; choose another name, or pass "
                         "replace=True to move it")
    make_dirs(layout.names_dir)
    atomic_write(path, seal({"format_version": FORMAT_VERSION, "kind": KIND, "name": name,
                             "experiment": exp_hash, "created": created}))
