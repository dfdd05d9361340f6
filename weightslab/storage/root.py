"""A weightslab root: the local directory checkpoints are written to and read from, and, for a remote
root, the bucket it mirrors.

Three kinds of caller open a root, and each used to do it its own way: training (which creates it),
the Python root operations (``wl.verify``, ``wl.prune``, ...) and the command line (which must find
an existing one and say so plainly when the path is wrong). :meth:`Root.create` and
:meth:`Root.existing` are those two ways, for a path and for an fsspec URL alike:

- a local path is the root itself;
- a URL (``s3://bucket/runs``) is read and written through a local directory: a training's *staging*
  root (where it commits before uploading), or the command line's read-only *view*, a mirror of the
  bucket's manifests kept apart from any training's staging root (which may hold checkpoints not
  uploaded yet).

Nothing here imports torch: ``weightslab ls`` opens roots too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, NotARootError
from .layout import Layout
from .remote import RemoteRoot, is_remote, staging_dir

__all__ = ["Root", "default_location", "is_root"]


def default_location() -> str:
    """Where a root is when nobody says: ``$WEIGHTSLAB_ROOT``, else ``./experiments``."""
    return os.environ.get("WEIGHTSLAB_ROOT") or "./experiments"


def is_root(path: Path) -> bool:
    """Whether ``path`` looks like a weightslab root (it has checkpoints or objects)."""
    return (path / "checkpoints").is_dir() or (path / "objects").is_dir()


@dataclass(frozen=True, eq=False)
class Root:
    """Where checkpoints live: ``local`` always; ``remote`` too when the root is an fsspec URL."""

    local: Path
    remote: RemoteRoot | None = None

    @property
    def layout(self) -> Layout:
        return self.remote.layout if self.remote is not None else Layout(self.local)

    @property
    def location(self) -> str:
        """What the user named: the URL of a remote root, else the local path."""
        return self.remote.url if self.remote is not None else str(self.local)

    @classmethod
    def create(cls, location: str | os.PathLike[str]) -> "Root":
        """The root a training writes to (created on first write): a path, or a URL whose checkpoints
        are committed under a local staging root and uploaded from there."""
        if is_remote(location):
            url = str(location)
            return cls(staging_dir(url), _remote(url, Layout(staging_dir(url))))
        return cls(Path(location).expanduser().absolute())

    @classmethod
    def existing(cls, location: str | os.PathLike[str] | None = None) -> "Root":
        """A root that must exist already (default: :func:`default_location`); a URL is read through
        a local mirror of its manifests, records and names, brought up to date now.

        Raises :class:`NotARootError` naming the place when there is no weightslab root there.
        """
        location = default_location() if location is None else location
        if is_remote(location):
            url = str(location)
            remote = _remote(url, Layout(staging_dir(url, view=True)))
            try:
                remote.pull_index(mirror=True)
            except OSError as exc:
                raise NotARootError(f"{url} cannot be read ({type(exc).__name__}: {exc}); check the URL and the "
                                    "credentials") from None
            root = cls(remote.layout.root, remote)
            if not (root.local / "checkpoints").is_dir():
                raise NotARootError(f"{url} is not a weightslab root (it holds no committed checkpoint); pass the "
                                    "root_log_dir your training used")
            return root
        path = Path(location).expanduser().absolute()
        if not is_root(path):
            raise NotARootError(f"{path} is not a weightslab root (it has no checkpoints/ or objects/ directory); "
                                "pass the root_log_dir your training used, or set WEIGHTSLAB_ROOT")
        return cls(path)


def _remote(url: str, layout: Layout) -> RemoteRoot:
    try:
        return RemoteRoot(url, layout)
    except ImportError as exc:  # fsspec (or the filesystem's own package) is missing: say which extra
        raise ConfigError(str(exc)) from exc
