"""The files of a sharded save, as a manifest records them, and their verification.

A distributed job's sharded tensors (FSDP2 parameters and their optimizer state) are written by
every rank with torch.distributed.checkpoint (:mod:`weightslab.distributed.sharded`); the manifest keeps the
name, size and SHA-256 of each file. Reading that record and checking the files against it needs
no torch: ``weightslab verify``, garbage collection and a remote root's upload use it as they are.
"""

from __future__ import annotations

import hashlib
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import CorruptCheckpointError, FormatVersionError
from .store import DIGEST_ALGORITHM

__all__ = ["LAYOUT", "SUFFIX", "ShardedFiles", "verify", "file_digest", "check_file", "OK", "MISSING", "UNREADABLE",
           "WRONG_SIZE", "WRONG_DIGEST", "PROBLEMS"]

#: Names the on-disk arrangement :class:`ShardedFiles` describes; a reader refuses another.
LAYOUT = "torch.distributed.checkpoint+safetensors/1"
SUFFIX = ".safetensors"
_DIGEST = re.compile(rf"{DIGEST_ALGORITHM}:[0-9a-f]{{64}}")
READ_CHUNK = 8 << 20

# What the rank that checked a file found (the other ranks report OK for it, so the element-wise
# maximum the ranks agree on is that rank's finding).
OK, MISSING, UNREADABLE, WRONG_SIZE, WRONG_DIGEST = range(5)
PROBLEMS = {
    MISSING: "is missing",
    UNREADABLE: "cannot be read",
    WRONG_SIZE: "does not have the size recorded at save",
    WRONG_DIGEST: f"does not match the {DIGEST_ALGORITHM} digest recorded at save",
}


@dataclass(frozen=True)
class ShardedFiles:
    """The files of one sharded save, as a manifest records them.

    ``files`` maps each file's name (relative to the save's directory) to its size in bytes and
    its digest (``"sha256:<hex>"``); ``world_size`` is the number of ranks that saved (for
    information: loading reshards to any world size). A name that could reach outside the
    directory, or a malformed size or digest, raises ``CorruptCheckpointError``: a record comes
    from a manifest, and a damaged one must not steer a reader to other files.
    """

    files: Mapping[str, tuple[int, str]]
    world_size: int

    def __post_init__(self) -> None:
        files: dict[str, tuple[int, str]] = {}
        for name, entry in dict(self.files).items():
            if not _is_plain_name(name):
                raise CorruptCheckpointError(f"sharded file name {name!r}: expected a plain '*{SUFFIX}' name "
                                             "inside the checkpoint's directory")
            size, digest = entry
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise CorruptCheckpointError(f"sharded file {name}: size {size!r} is not a non-negative integer")
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise CorruptCheckpointError(f"sharded file {name}: digest {digest!r} is not "
                                             f"'{DIGEST_ALGORITHM}:<64 hex digits>'")
            files[name] = (size, digest)
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise CorruptCheckpointError(f"world_size {self.world_size!r} is not a positive integer")
        object.__setattr__(self, "files", types.MappingProxyType(dict(sorted(files.items()))))

    @property
    def nbytes(self) -> int:
        """The bytes of all files together."""
        return sum(size for size, _ in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {"layout": LAYOUT, "world_size": self.world_size,
                "files": {name: {"size": size, "digest": digest} for name, (size, digest) in self.files.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ShardedFiles":
        """Read what :meth:`to_json` wrote; a malformed record raises ``CorruptCheckpointError``
        (it came from a damaged or hand-edited manifest)."""
        layout = data.get("layout") if isinstance(data, Mapping) else None
        if layout != LAYOUT:
            raise FormatVersionError(f"sharded files in layout {layout!r}; this weightslab reads {LAYOUT!r}. "
                                     "Upgrade weightslab to load this checkpoint")
        try:
            files = {name: (entry["size"], entry["digest"]) for name, entry in data["files"].items()}
            return cls(files=files, world_size=data["world_size"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"the manifest's record of sharded files is malformed ({exc}); the "
                                         "manifest is damaged: load an earlier checkpoint") from None


def verify(directory: Path | str, files: ShardedFiles) -> list[str]:
    """Check every file of a sharded save against its record, in this process alone (no process
    group needed, as for ``weightslab verify``): one line per problem, empty if all is well."""
    directory = Path(directory)
    problems = []
    for name, (size, digest) in files.files.items():
        code, detail = check_file(directory / name, size, digest)
        if code != OK:
            problems.append(f"{directory / name}: {detail}")
    return problems


def _is_plain_name(name: object) -> bool:
    return (isinstance(name, str) and name.endswith(SUFFIX) and not name.startswith(".")
            and "/" not in name and "\\" not in name and os.path.basename(name) == name)


def file_digest(path: Path) -> tuple[int, str]:
    """The size and digest of a file, read in chunks (a shard file may be as large as memory)."""
    hasher = hashlib.new(DIGEST_ALGORITHM)
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(view[:n])  # hashlib releases the GIL on large buffers
            size += n
    return size, f"{DIGEST_ALGORITHM}:{hasher.hexdigest()}"


def check_file(path: Path, size: int, digest: str) -> tuple[int, str]:
    """``(OK, "")`` or a problem code with a line saying what is wrong."""
    try:
        actual_size = path.stat().st_size
        if actual_size != size:
            return WRONG_SIZE, f"{actual_size} bytes, {size} recorded at save"
        actual_size, actual = file_digest(path)
    except FileNotFoundError:
        return MISSING, "missing"
    except OSError as exc:
        return UNREADABLE, f"cannot be read ({exc})"
    if actual_size != size:
        return WRONG_SIZE, f"{actual_size} bytes, {size} recorded at save"
    if actual != digest:
        return WRONG_DIGEST, f"content does not match its recorded digest ({actual}, {digest} recorded at save)"
    return OK, ""
