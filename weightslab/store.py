"""Content-addressed blob storage: bytes in, verified bytes out.

The store knows bytes, not torch. A save hands it the raw bytes of its tensors; the store names
each by its digest, packs the blobs of one save into a single file (one file and one fsync round
per checkpoint, however many tensors), and returns where each landed. Reading checks every byte
against its digest.

A pack is a valid safetensors file whose tensor names are the blobs' digests, so any safetensors
tool can open it::

    <u64 little-endian header length> <JSON header, space padded to 8 bytes> <blob bytes ...>

The pack's own name is the digest of its header, which lists the digests and offsets of its
blobs: two saves with identical content produce the same pack, written once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

from .atomic import atomic_write, make_dirs
from .errors import CorruptCheckpointError
from .layout import Layout

__all__ = ["Blob", "BlobRef", "BlobStore", "DIGEST_ALGORITHM"]

DIGEST_ALGORITHM = "sha256"
_HASHERS: Mapping[str, Callable[[], Any]] = {"sha256": hashlib.sha256}
PACK_FORMAT = "weightslab.pack"
PACK_FORMAT_VERSION = "1"

BytesLike = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Blob:
    """Bytes to store, with the dtype tag and shape written into the pack header."""

    data: BytesLike
    dtype: str  # a safetensors dtype name ("F32", "BF16", ...); opaque to the store
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BlobRef:
    """Where one blob lives and how to check it."""

    digest: str  # "<algorithm>:<hex>"
    pack: str  # pack id: hex digest of the pack header
    offset: int  # absolute offset of the first byte in the pack file
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "pack": self.pack, "offset": self.offset, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BlobRef":
        return cls(digest=str(data["digest"]), pack=str(data["pack"]),
                   offset=int(data["offset"]), nbytes=int(data["nbytes"]))


def _digest(data: BytesLike, algorithm: str = DIGEST_ALGORITHM) -> str:
    # hashlib releases the GIL on large buffers, so this runs beside the training thread.
    return f"{algorithm}:{_HASHERS[algorithm](data).hexdigest()}"


def _as_bytes_view(data: BytesLike) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("blob data must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class BlobStore:
    """The ``objects/`` directory of one root."""

    def __init__(self, layout: Layout):
        self.layout = layout

    # --- writing ----------------------------------------------------------------------------
    def put(self, blobs: Sequence[Blob]) -> list[BlobRef]:
        """Store ``blobs`` in one pack (durably) and return a ref per blob, in order.

        Identical blobs (tied weights, repeated buffers) are stored once.
        """
        views = [_as_bytes_view(b.data) for b in blobs]
        digests = [_digest(v) for v in views]
        header: dict[str, Any] = {}
        order: list[int] = []  # index of the first blob holding each unique digest
        position = 0
        relative: dict[str, tuple[int, int]] = {}
        for i, (blob, digest) in enumerate(zip(blobs, digests)):
            if digest in relative:
                continue
            n = views[i].nbytes
            relative[digest] = (position, position + n)
            header[digest.split(":", 1)[1]] = {
                "dtype": blob.dtype, "shape": list(blob.shape), "data_offsets": [position, position + n]}
            position += n
            order.append(i)
        header["__metadata__"] = {"format": PACK_FORMAT, "format_version": PACK_FORMAT_VERSION,
                                  "digest": DIGEST_ALGORITHM}
        header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns data to 8 bytes
        pack_id = hashlib.sha256(header_bytes).hexdigest()
        data_start = 8 + len(header_bytes)

        path = self.layout.pack(pack_id)
        if not path.exists():
            make_dirs(path.parent)
            chunks: list[BytesLike] = [struct.pack("<Q", len(header_bytes)), header_bytes]
            chunks.extend(views[i] for i in order)
            atomic_write(path, chunks)
        return [BlobRef(digest=d, pack=pack_id, offset=data_start + relative[d][0],
                        nbytes=relative[d][1] - relative[d][0]) for d in digests]

    # --- reading ----------------------------------------------------------------------------
    def pack_path(self, ref: BlobRef) -> Path:
        return self.layout.pack(ref.pack)

    def read_into(self, items: Iterable[tuple[BlobRef, BytesLike]], *, checkpoint: str | None = None) -> None:
        """Fill each writable buffer with its blob's bytes and check them against the digest.

        Raises :class:`CorruptCheckpointError` naming the pack file (and ``checkpoint``, when
        given) if a pack is missing, truncated or does not match its digest.
        """
        by_pack: dict[str, list[tuple[BlobRef, memoryview]]] = {}
        for ref, out in items:
            by_pack.setdefault(ref.pack, []).append((ref, _as_bytes_view(out)))
        for pack_id, entries in by_pack.items():
            path = self.layout.pack(pack_id)
            try:
                f = open(path, "rb", buffering=0)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"pack {path} is missing{_of(checkpoint)}; the checkpoint cannot be restored. "
                    "Resume an earlier checkpoint, or run wl.verify() to list every damaged one.",
                    path=path, checkpoint=checkpoint) from None
            with f:
                for ref, view in entries:
                    if view.nbytes != ref.nbytes:
                        raise ValueError(f"buffer of {view.nbytes} bytes for a blob of {ref.nbytes} bytes")
                    f.seek(ref.offset)
                    got = 0
                    while got < ref.nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
                    if got != ref.nbytes:
                        raise CorruptCheckpointError(
                            f"pack {path} is truncated{_of(checkpoint)}: expected {ref.nbytes} bytes at "
                            f"offset {ref.offset}, found {got}. Resume an earlier checkpoint.",
                            path=path, checkpoint=checkpoint)
                    algorithm = ref.digest.split(":", 1)[0]
                    if algorithm not in _HASHERS:
                        raise CorruptCheckpointError(
                            f"unknown digest algorithm {algorithm!r} for a blob in {path}{_of(checkpoint)}; "
                            "upgrade weightslab", path=path, checkpoint=checkpoint)
                    if _digest(view, algorithm) != ref.digest:
                        raise CorruptCheckpointError(
                            f"pack {path} is corrupt{_of(checkpoint)}: the {ref.nbytes} bytes at offset "
                            f"{ref.offset} do not match their digest {ref.digest}. Resume an earlier "
                            "checkpoint, or run wl.verify() to list every damaged one.",
                            path=path, checkpoint=checkpoint)

    def read(self, ref: BlobRef, *, checkpoint: str | None = None) -> bytearray:
        out = bytearray(ref.nbytes)
        self.read_into([(ref, out)], checkpoint=checkpoint)
        return out

    def exists(self, ref: BlobRef) -> bool:
        return self.layout.pack(ref.pack).exists()


def _of(checkpoint: str | None) -> str:
    return f" (checkpoint {checkpoint})" if checkpoint else ""
