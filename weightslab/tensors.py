"""Tensors as the store's bytes, and back: the one place where a torch tensor meets a blob.

The store and the checkpoint manager know bytes, dtype *names* (the safetensors ones: ``"F32"``,
``"BF16"``) and shapes; the snapshot and the state layer know tensors. Turning one into the other
happens here: the dtype names, the raw bytes of a contiguous CPU tensor (no copy), a blob to store
from a tensor, and the tensors of a committed checkpoint read back, every byte verified.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import CorruptCheckpointError
from .storage.store import Blob

if TYPE_CHECKING:
    from .storage.manager import CheckpointManager
    from .storage.manifest import Manifest

__all__ = ["DTYPE_TAGS", "dtype_tag", "tag_dtype", "raw_bytes", "empty_like_entry", "blob_of", "load_tensors",
           "tensor_meta"]

if sys.byteorder != "little":  # safetensors and our packs are little-endian
    raise ImportError("weightslab stores tensors little-endian and does not support big-endian machines")

#: safetensors dtype names.
DTYPE_TAGS: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TAG_DTYPES = {tag: dtype for dtype, tag in DTYPE_TAGS.items()}


def dtype_tag(dtype: torch.dtype, *, key: str = "") -> str:
    try:
        return DTYPE_TAGS[dtype]
    except KeyError:
        raise TypeError(f"tensor {key!r} has dtype {dtype}, which the safetensors format cannot hold; "
                        f"convert it (supported: {', '.join(str(d) for d in DTYPE_TAGS)})") from None


def tag_dtype(tag: str) -> torch.dtype:
    try:
        return _TAG_DTYPES[tag]
    except (KeyError, TypeError):  # (manifests are checked when read: only a record built by hand gets here)
        raise CorruptCheckpointError(f"unknown tensor dtype {tag!r} in a checkpoint") from None


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("raw_bytes needs a contiguous CPU tensor")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def empty_like_entry(dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A CPU tensor to read a stored blob into."""
    return torch.empty(shape, dtype=tag_dtype(dtype))


def blob_of(key: str, tensor: torch.Tensor) -> Blob:
    """What the store needs to keep ``tensor`` (a contiguous CPU copy): its bytes, not copied."""
    return Blob(data=raw_bytes(tensor), dtype=dtype_tag(tensor.dtype, key=key), shape=tuple(tensor.shape),
                itemsize=tensor.element_size())


def load_tensors(manager: "CheckpointManager", manifest: "Manifest") -> dict[str, torch.Tensor]:
    """Every tensor of a committed checkpoint, each byte checked against its digest (a remote
    root's packs are fetched first). Tensors stored once under several keys (tied weights) are
    read once and copied. Nothing is allocated before every blob's size was checked against the
    packs that hold it: a manifest cannot make this allocate more than the root stores."""
    manager.check_stored(manifest)
    first: dict[tuple[str, str, tuple[int, ...]], str] = {}
    aliases: list[tuple[str, str]] = []
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in manifest.tensors.items():
        ident = (entry.content, entry.dtype, entry.shape)
        if ident in first:
            aliases.append((key, first[ident]))
            continue
        first[ident] = key
        tensors[key] = empty_like_entry(entry.dtype, entry.shape)
    manager.read_tensors(manifest, {key: raw_bytes(t) for key, t in tensors.items()})
    for key, source in aliases:
        tensors[key] = tensors[source].clone()
    return {k: tensors[k] for k in manifest.tensors}


def tensor_meta(manifest: "Manifest") -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and (global) shape of every tensor of the checkpoint, sharded ones included."""
    meta = {k: (tag_dtype(e.dtype), e.shape) for k, e in manifest.tensors.items()}
    sharded: Any = manifest.state.get("sharded")
    if isinstance(sharded, Mapping):
        meta.update({k: (tag_dtype(v["dtype"]), tuple(v["shape"])) for k, v in sharded["tensors"].items()})
    return meta
