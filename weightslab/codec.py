"""Turning nested training state into JSON plus a table of tensors, and back, without pickle.

State dicts of models, optimizers, schedulers and scalers, RNG states and user state are trees of
dicts, lists, tuples, numbers, strings, tensors and numpy arrays. :func:`encode` replaces every
tensor by a reference into a flat table (saved as safetensors-compatible blobs) and every value
JSON cannot hold exactly (tuples, non-string dict keys, NaN and infinities, bytes) by a small
tagged object, so :func:`decode` rebuilds the same tree, types included. Anything else is refused
with an error that names its path: loading must never need to run code.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path, PurePath
from typing import Any, Mapping, MutableMapping

import numpy as np
import torch

from .canonical import TAG
from .errors import StateError

__all__ = ["TAG", "encode", "decode"]

_DATES = {"datetime": _dt.datetime, "date": _dt.date, "time": _dt.time}
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _float(value: float) -> Any:
    if math.isfinite(value):
        return value  # json writes repr(), the shortest string that round-trips exactly
    return {TAG: "float", "value": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def encode(value: Any, *, path: str, tensors: MutableMapping[str, torch.Tensor], what: str = "state") -> Any:
    """Encode ``value`` as JSON-ready data, moving tensors and arrays into ``tensors``.

    ``path`` names the value (``'optimizers/main'``); tensor keys extend it, so a key says where
    a tensor came from. ``what`` names the owner in error messages.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum and friends become plain ints
    if isinstance(value, float):
        return _float(float(value))
    if isinstance(value, torch.Tensor):
        return {TAG: "tensor", "key": _add(tensors, path, value, what)}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.kind not in "biufc":
            raise StateError(
                f"cannot save {what}: the numpy array at '{path}' has dtype {value.dtype}, which has no "
                "safe binary form; convert it to a numeric array or to a list of plain values")
        if not value.dtype.isnative:  # big-endian data: store the same values in native byte order
            value = value.astype(value.dtype.newbyteorder("="))
        if not value.flags.c_contiguous:
            value = np.ascontiguousarray(value).reshape(value.shape)  # (keeps 0-d arrays 0-d)
        try:
            tensor = torch.from_numpy(value)
        except (TypeError, ValueError) as exc:
            raise StateError(f"cannot save {what}: the numpy array at '{path}' has dtype {value.dtype}, which "
                             f"torch cannot hold ({exc}); convert it, for instance with .astype(np.float64)") from None
        return {TAG: "ndarray", "key": _add(tensors, path, tensor, what)}
    if isinstance(value, np.generic):
        return encode(value.item(), path=path, tensors=tensors, what=what)
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: encode(v, path=f"{path}/{k}", tensors=tensors, what=what) for k, v in value.items()}
        items = []
        for k, v in value.items():
            key = encode(k, path=f"{path}/<key {k!r}>", tensors={}, what=what) if not isinstance(k, str) else k
            items.append([key, encode(v, path=f"{path}/{k}", tensors=tensors, what=what)])
        return {TAG: "dict", "items": items}
    if isinstance(value, tuple):  # torch.Size included
        return {TAG: "tuple", "items": [encode(v, path=f"{path}/{i}", tensors=tensors, what=what)
                                        for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, path=f"{path}/{i}", tensors=tensors, what=what) for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray)):
        return {TAG: "bytes", "hex": bytes(value).hex()}
    if isinstance(value, torch.dtype):
        return {TAG: "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {TAG: "device", "name": str(value)}
    if isinstance(value, PurePath):
        return {TAG: "path", "value": str(value)}
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):  # YAML reads timestamps as these
        # Subclasses (pandas.Timestamp, ...) are stored as the standard type they extend.
        kind = next(k for k in ("datetime", "date", "time") if isinstance(value, _DATES[k]))
        return {TAG: kind, "iso": _DATES[kind].isoformat(value)}
    raise StateError(
        f"cannot save {what}: the value at '{path}' is a {type(value).__module__}.{type(value).__qualname__}, "
        "which can only be stored by pickling it, and weightslab never pickles. Return plain data "
        "instead (numbers, strings, lists, dicts, tuples, tensors, numpy arrays), for instance from a "
        "state_dict() method or a register_state getter.")


def _add(tensors: MutableMapping[str, torch.Tensor], path: str, tensor: torch.Tensor, what: str) -> str:
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise StateError(f"cannot save {what}: the tensor at '{path}' has layout {tensor.layout}; "
                         "only dense (strided) tensors are supported; call .to_dense() first")
    if tensor.is_quantized:
        raise StateError(f"cannot save {what}: the tensor at '{path}' is quantized; dequantize it first")
    if tensor.device.type == "meta":
        raise StateError(f"cannot save {what}: the tensor at '{path}' is on the meta device and has no data")
    key, n = path, 1
    while key in tensors:  # a dict key containing '/' could collide with a nested path
        n += 1
        key = f"{path}#{n}"
    tensors[key] = tensor
    return key


def decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the value :func:`encode` produced, taking tensors from ``tensors``."""
    if isinstance(node, list):
        return [decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tag = node.get(TAG)
    if tag is None:
        return {k: decode(v, tensors) for k, v in node.items()}
    if tag == "tensor":
        return tensors[node["key"]]
    if tag == "ndarray":
        return tensors[node["key"]].numpy()
    if tag == "tuple":
        return tuple(decode(v, tensors) for v in node["items"])
    if tag == "dict":
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in node["items"]}
    if tag == "float":
        return _SPECIAL_FLOATS[node["value"]]
    if tag == "bytes":
        return bytes.fromhex(node["hex"])
    if tag == "dtype":
        dtype = getattr(torch, str(node["name"]), None)
        if not isinstance(dtype, torch.dtype):
            raise StateError(f"unknown torch dtype {node['name']!r} in a checkpoint")
        return dtype
    if tag == "device":
        return torch.device(node["name"])
    if tag == "path":
        return Path(node["value"])
    if tag in _DATES:
        return _DATES[tag].fromisoformat(node["iso"])
    raise StateError(f"unknown tagged value {tag!r} in a checkpoint; it was written by a newer weightslab")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key
