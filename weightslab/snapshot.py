"""A consistent copy of the tensors of a checkpoint, taken on the training thread.

Training goes on mutating its tensors the moment a save returns, so the background writer must
work on a copy. The copy lands in fresh, contiguous CPU tensors (one per distinct tensor: tied
weights and other aliases are copied once), which also gives the writer the raw little-endian
bytes it hashes and writes without further copies.
"""

from __future__ import annotations

import sys
from typing import Mapping

import torch

__all__ = ["DTYPE_TAGS", "dtype_tag", "tag_dtype", "take", "raw_bytes", "empty_like_entry"]

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
    except KeyError:
        raise ValueError(f"unknown tensor dtype {tag!r} in a checkpoint") from None


def take(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy every tensor into a fresh contiguous CPU tensor; aliases share one copy."""
    copies: dict[str, torch.Tensor] = {}
    by_identity: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for key, tensor in tensors.items():
        dtype_tag(tensor.dtype, key=key)  # fail before copying anything
        t = tensor.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.device.type != "meta" else None
        copy = by_identity.get(ident) if ident is not None else None
        if copy is None:
            copy = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            copy.copy_(t)
            if ident is not None:
                by_identity[ident] = copy
        copies[key] = copy
    return copies


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("raw_bytes needs a contiguous CPU tensor")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def empty_like_entry(dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A CPU tensor to read a stored blob into."""
    return torch.empty(shape, dtype=tag_dtype(dtype))
