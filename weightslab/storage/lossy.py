"""Lossy codecs of the archive tier: a floating tensor re-encoded as a small closed-loop delta.

Checkpoints that retention would delete can be *demoted* instead of deleted: each floating tensor is
re-encoded against the *decoded* previous link of its chain (a chain starts at an exact checkpoint).
Because every link is a delta against what a reader will actually reconstruct, and not against the
true previous value, the error of a link is the error of that link alone: errors never accumulate
along a chain (a value that was not updated in one link is still owed, and is paid by a later one).

Two codecs, both vectorised numpy (one Python step per bucket, level or block of a million elements,
never per element):

``"lc"`` -- LC-Checkpoint (Chen et al., ICML 2020)
    The delta ``d = target - base`` is bucketed by the sign and the binary exponent of each element.
    The ``2**bits - 1`` non-empty buckets with the largest exponents are kept ("priority
    promotion"); every element of a kept bucket is replaced by its bucket's mean, every other
    element by 0 (index 0). Bound, elementwise (``base`` = zeros when there is none)::

        |decoded - target| <= |target - base|        (+ one storage-dtype rounding, see below)

    because a bucket holds values of one sign in ``[2**e, 2**(e+1))``, so its mean is within
    ``2**e <= |d|`` of each of them. A ``second_moment`` tensor is delta-coded in sqrt space
    (``sqrt(decoded)`` against ``sqrt(base)``, clamped at 0 and squared back), so its decoded value
    is never negative and the bound holds for the square roots.

``"excp"`` -- ExCP (Li et al., ICML 2024), joint weight-momentum shrinking
    A ``weight`` is coded as the residual ``r = target - base``; a residual element is kept where
    its importance ``|r| * sqrt(v) / mean(sqrt(v))`` (``v``: the group's Adam second moment, or 1
    when the group has none) exceeds ``weight_prune`` times the median importance; the others are
    pruned (decoded = base, the residual is owed to the next link). Optimizer moments are coded as
    absolute values, not residuals: a first ``moment`` element is kept where ``|m| > moment_prune *
    mean(|m|)`` and (in a group with a weight) its weight residual was kept; pruned elements become
    0. Kept values are quantised to ``2**bits - 1`` non-uniform levels (1-D k-means). A
    ``second_moment`` is quantised in log space (so the relative error is even across its many
    orders of magnitude and the decoded value is positive), zero stays exactly zero, and it is
    pruned like a moment only with ``prune_second_moment=True`` (off by default: Adam divides by
    ``sqrt(v)``, and a zeroed ``v`` makes the next hundreds of steps of that element several times
    too large). Bound, elementwise: a weight obeys ``|decoded - target| <= |target - base|`` and a
    first moment ``|decoded - target| <= |target|`` (a kept element whose nearest level would break
    this is pruned instead); a second moment stays ``>= 0`` and within a factor of its level
    spacing (its relative error is what k-means minimises in log space).

Storage-dtype rounding: decoded values are rounded through the tensor's storage dtype (a no-op for
F32 and F64), which may add half a unit in the last place of the storage dtype on top of the bounds.

The payload is self-describing: magic, format version, codec, role, storage dtype, parameters, size,
the level table and two zstd frames (element gaps and level indices, or the dense index array):
see :func:`decode`, which checks every field against ``size``, ``dtype`` and ``base`` before it
allocates, so a damaged or foreign payload raises ValueError. Nothing here imports torch or does
file I/O.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .encoding import zstandard_module

__all__ = ["CODECS", "ROLES", "FLOAT_DTYPES", "LcParams", "ExcpParams", "CodecParams", "codec_params",
           "params_from_json", "Member", "Encoded", "encode_group", "decode", "to_compute", "to_storage",
           "FORMAT_VERSION"]

CODECS = ("lc", "excp")
#: ``second_moment``: Adam exp_avg_sq / max_exp_avg_sq, RMSprop square_avg, Adagrad sum: must stay >= 0.
ROLES = ("weight", "moment", "second_moment")
#: safetensors dtype names of the tensors a codec accepts; a tensor of another dtype is never lossy.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

FORMAT_VERSION = 1
_MAGIC = b"WLLZ"

BytesLike = Union[bytes, bytearray, memoryview, np.ndarray]

# Work in blocks of this many elements, so scratch arrays (int64 bucket keys, float64 sums) stay a
# few MB instead of a multiple of the tensor.
_CHUNK = 1 << 20
# k-means levels are fitted on an evenly strided sample of at most this many values, then every
# value is assigned and each level set to the exact mean of its values.
_KMEANS_SAMPLE = 1 << 17
_KMEANS_ITERS = 25
# Below this fraction of kept elements, the positions are stored as gaps between kept elements
# (bytes that zstd's Huffman stage codes within ~3% of their entropy); above it, the dense index
# array compresses better (measured on 4M random indices: gaps+codes came within 1-5% of the entropy
# up to 30% kept, the dense array 2x above it at 1-10% kept; dense won at 90% kept).
_SPARSE_MAX = 0.5
_ZSTD_LEVEL = 1  # level 3 and above were no smaller on index streams (Huffman does the work) and slower


# --- dtypes ---------------------------------------------------------------------------------
_STORAGE_NP = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def _compute_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float64) if dtype == "F64" else np.dtype(np.float32)


def _check_dtype(dtype: Any) -> str:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)} (a safetensors float dtype name), "
                         f"got {dtype!r}; tensors of other dtypes are kept exact, never lossy")
    return dtype


def to_compute(raw: BytesLike, dtype: str) -> np.ndarray:
    """A new 1-D array of the tensor's values: float32 for F16/BF16/F32, float64 for F64.

    BF16 has no numpy dtype: each uint16 is widened into the high half of a float32, which is exact.
    """
    _check_dtype(dtype)
    view = memoryview(raw).cast("B") if not isinstance(raw, np.ndarray) else memoryview(np.ascontiguousarray(raw)).cast("B")
    if view.nbytes % _ITEMSIZE[dtype]:
        raise ValueError(f"raw holds {view.nbytes} bytes, not a whole number of {dtype} elements "
                         f"({_ITEMSIZE[dtype]} bytes each)")
    if dtype == "BF16":
        return (np.frombuffer(view, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(view, dtype=_STORAGE_NP[dtype]).astype(_compute_dtype(dtype))


def to_storage(values: np.ndarray, dtype: str) -> bytes:
    """The raw bytes of ``values`` in the storage ``dtype``, rounded to nearest even.

    BF16 rounds the float32 value (a float64 input is first rounded to float32); NaN stays NaN
    (a NaN whose payload lives only in the dropped low bits becomes a quiet NaN). For every
    ``raw``, ``to_storage(to_compute(raw, d), d) == raw``.
    """
    return _storage_array(values, _check_dtype(dtype)).tobytes()


def _storage_array(values: np.ndarray, dtype: str) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if dtype != "BF16":
        return values.astype(_STORAGE_NP[dtype])
    bits = values.astype(np.float32).view(np.uint32)
    # Round to nearest even on the 16 dropped bits: add 0x7FFF plus the lowest kept bit.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # truncate NaNs (rounding could carry into the exponent); keep them NaN
        truncated = (bits[nan] >> 16).astype(np.uint16)
        rounded[nan] = np.where(truncated & 0x7F, truncated, truncated | 0x40)
    return rounded


def _through_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to the storage dtype and widened back (F32/F64: unchanged)."""
    if dtype in ("F32", "F64"):
        return values
    if dtype == "F16":
        return values.astype(np.float16).astype(np.float32)
    return (_storage_array(values, dtype).astype(np.uint32) << 16).view(np.float32)


# --- parameters -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LcParams:
    """LC-Checkpoint: keep the ``2**bits - 1`` (sign, exponent) buckets of the delta with the largest
    exponents, each element as its bucket's mean.

    ``bits`` (1..8): more bits keep smaller deltas (each extra bit doubles the buckets, about one
    more binade of each sign), at about one more bit per kept element before entropy coding.
    ``moment_bits`` (1..8, or None: ``bits``): the bits of optimizer moments.

    The default, 3, kept the loss of a run resumed 10 times from archived checkpoints within 1% of
    the exact run's in both of this project's benchmarks (``benchmarks/archive.py``,
    ``benchmarks/codec_quality.py``) at 23x smaller than ``torch.save``; 4 halves the ratio for a
    loss within 0.1%, 2 gives 60x for 2-3%.
    """

    bits: int = 3
    moment_bits: Optional[int] = None

    @property
    def codec(self) -> str:
        return "lc"

    def to_json(self) -> dict[str, Any]:
        # (an unset moment_bits is left out: a manifest repeats these for every link of every chain)
        return {"codec": self.codec, **{k: v for k, v in asdict(self).items() if v is not None}}


@dataclass(frozen=True, kw_only=True)
class ExcpParams:
    """ExCP: joint weight-momentum pruning, then ``2**bits - 1`` k-means levels per tensor.

    ``bits`` (1..8): levels of the non-uniform quantisation (index 0 is reserved for pruned/zero).
    ``weight_prune`` (>= 0): a weight-residual element is kept where its importance (``|r|`` times
    the normalised ``sqrt`` of Adam's second moment) exceeds this times the median importance.
    0 keeps every non-zero residual; larger prunes more (better ratio, more is owed to later links).
    ``moment_prune`` (>= 0): a first-moment element is kept where ``|m|`` exceeds this times the
    mean ``|m|`` (and its weight residual was kept). 0 keeps every moment of a kept weight.
    ``prune_second_moment``: prune the second moment like the first (ExCP's choice; off by
    default because a zeroed second moment inflates Adam's next steps).
    ``moment_bits`` (1..8, or None: ``bits``): the levels of the optimizer moments.
    """

    bits: int = 4
    moment_bits: Optional[int] = None
    weight_prune: float = 0.5
    moment_prune: float = 1.0
    prune_second_moment: bool = False

    @property
    def codec(self) -> str:
        return "excp"

    def to_json(self) -> dict[str, Any]:
        # (an unset moment_bits is left out: a manifest repeats these for every link of every chain)
        return {"codec": self.codec, **{k: v for k, v in asdict(self).items() if v is not None}}


CodecParams = Union[LcParams, ExcpParams]
_PARAM_CLASSES: dict[str, type] = {"lc": LcParams, "excp": ExcpParams}
_MAX_KNOB = 1e6  # a pruning multiplier beyond this prunes everything; refuse it as a typo


def codec_params(codec: str, **values: Any) -> CodecParams:
    """The parameters of ``codec`` (``"lc"`` or ``"excp"``), defaults for those not given, checked."""
    if codec not in _PARAM_CLASSES:
        raise ValueError(f"unknown lossy codec {codec!r}; expected one of {', '.join(map(repr, CODECS))}")
    cls = _PARAM_CLASSES[codec]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for lossy codec {codec!r}; "
                         f"allowed: {', '.join(allowed)}")
    for name, value in values.items():
        _check_knob(codec, name, value)
    return cls(**values)


def params_from_json(data: Mapping[str, Any]) -> CodecParams:
    """Parameters read back from :meth:`to_json` output (untrusted: checked like :func:`codec_params`)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"lossy codec parameters must be a mapping with a 'codec' key, got {type(data).__name__}")
    if "codec" not in data:
        raise ValueError(f"lossy codec parameters have no 'codec' key (one of {', '.join(map(repr, CODECS))}); "
                         f"got keys {sorted(map(str, data))}")
    values = {key: value for key, value in data.items() if key != "codec"}
    if not all(isinstance(key, str) for key in values):
        raise ValueError(f"lossy codec parameter names must be strings, got {sorted(map(repr, values))}")
    return codec_params(data["codec"], **values)


def _check_knob(codec: str, name: str, value: Any) -> None:
    if name == "moment_bits" and value is None:
        return
    if name in ("bits", "moment_bits"):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 8:
            raise ValueError(f"{name} must be an int from 1 to 8, got {value!r} (codec {codec!r})")
    elif name == "prune_second_moment":
        if not isinstance(value, bool):
            raise ValueError(f"prune_second_moment must be True or False, got {value!r} (codec {codec!r})")
    else:  # weight_prune, moment_prune
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or not 0 <= value <= _MAX_KNOB):
            raise ValueError(f"{name} must be a number from 0 to {_MAX_KNOB:g}, got {value!r} (codec {codec!r})")


# --- members and results --------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """One tensor of a group: ``target`` (1-D, compute dtype, finite) to encode against ``base``
    (the decoded previous value, same size; None: against zeros)."""

    key: str
    dtype: str
    target: np.ndarray
    base: Optional[np.ndarray]
    role: str


@dataclass(frozen=True)
class Encoded:
    """One member encoded. ``decoded`` is bitwise what :func:`decode` returns for ``payload``.

    ``rel_l2`` is ``||decoded - target|| / ||target||``; for an all-zero target it is 0.0 when the
    decoded tensor is also all zero and ``inf`` otherwise.
    """

    payload: bytes
    decoded: np.ndarray
    max_abs: float
    rel_l2: float


# How an element is rebuilt from its index into the level table (stored in the payload).
_DELTA, _DELTA_SQRT, _ABSOLUTE = 0, 1, 2
_CODEC_IDS = {"lc": 0, "excp": 1}
_ROLE_IDS = {role: i for i, role in enumerate(ROLES)}
_DTYPE_IDS = {dtype: i for i, dtype in enumerate(FLOAT_DTYPES)}
_LAYOUT_DENSE, _LAYOUT_SPARSE = 0, 1
# magic, version, codec, role, dtype, kind, layout, has_base, table length, params length, size, kept,
# frame 1 length, frame 2 length
_HEADER = struct.Struct("<4sBBBBBBBHHQQQQ")


def encode_group(params: CodecParams, members: Sequence[Member]) -> list[Encoded]:
    """Encode one parameter's tensors (its weight and optimizer moments, or a lone tensor).

    ``"lc"`` encodes each member alone; ``"excp"`` prunes the moments where the weight residual was
    pruned and weighs the weight residual by the second moment (members of the weight's size).
    Returns one :class:`Encoded` per member, in order.
    """
    if not isinstance(params, (LcParams, ExcpParams)):
        raise ValueError(f"params must be LcParams or ExcpParams (see codec_params), got {type(params).__name__}")
    for name, value in asdict(params).items():
        _check_knob(params.codec, name, value)
    members = list(members)
    for member in members:
        _check_member(member)
    if isinstance(params, LcParams):
        return [_finish(params, member, *_lc(params, member)) for member in members]
    return _excp_group(params, members)


def _check_member(member: Member) -> None:
    if not isinstance(member, Member):
        raise ValueError(f"members must be Member objects, got {type(member).__name__}")
    _check_dtype(member.dtype)
    if member.role not in ROLES:
        raise ValueError(f"member {member.key!r} has role {member.role!r}; expected one of {', '.join(ROLES)}")
    want = _compute_dtype(member.dtype)
    for name, array in (("target", member.target), ("base", member.base)):
        if array is None and name == "base":
            continue
        if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != want:
            raise ValueError(f"member {member.key!r}: {name} must be a 1-D numpy array of {want} (the compute "
                             f"dtype of {member.dtype}; see to_compute), got "
                             f"{getattr(array, 'dtype', type(array).__name__)} of shape {getattr(array, 'shape', '?')}")
        if not np.isfinite(array).all():
            raise ValueError(f"member {member.key!r}: {name} holds NaN or infinite values; keep such a tensor "
                             "exact (lossless) instead of encoding it")
    if member.base is not None and member.base.size != member.target.size:
        raise ValueError(f"member {member.key!r}: base has {member.base.size} elements but target has "
                         f"{member.target.size}; base must be the decoded previous value of the same tensor")
    if member.role == "second_moment":
        for name, array in (("target", member.target), ("base", member.base)):
            if array is not None and array.size and array.min() < 0:
                raise ValueError(f"member {member.key!r} has role 'second_moment' but its {name} holds negative "
                                 "values; a second moment (exp_avg_sq, square_avg, ...) is never negative. "
                                 "Give it the role 'moment'")


def _finish(params: CodecParams, member: Member, kind: int, table: np.ndarray, index: np.ndarray) -> Encoded:
    """Build the payload and the decoded tensor (by the very function :func:`decode` uses)."""
    has_base = member.base is not None and kind != _ABSOLUTE
    base = member.base if has_base else None
    decoded = _reconstruct(kind, table, index, base, member.dtype)
    payload = _pack(params, member, kind, table, index, has_base)
    target = member.target
    diff = decoded - target
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    norm = float(np.linalg.norm(target))
    err = float(np.linalg.norm(diff))
    rel = err / norm if norm else (0.0 if err == 0 else math.inf)
    return Encoded(payload=payload, decoded=decoded, max_abs=max_abs, rel_l2=rel)


def _reconstruct(kind: int, table: np.ndarray, index: np.ndarray, base: Optional[np.ndarray],
                 dtype: str) -> np.ndarray:
    """The decoded tensor: ``table[index]`` applied to ``base`` as ``kind`` says, in storage precision."""
    table = table.astype(_compute_dtype(dtype))
    if kind == _ABSOLUTE or base is None:
        values = table[index]
        if kind == _DELTA_SQRT:
            np.maximum(values, 0, out=values)
            values *= values
    elif kind == _DELTA:
        values = base + table[index]
    else:  # _DELTA_SQRT: untouched elements keep their base bit for bit (sqrt then square may not)
        values = base.copy()
        moved = np.flatnonzero(index)
        root = np.sqrt(base[moved]) + table[index[moved]]
        np.maximum(root, 0, out=root)
        values[moved] = root * root
    return _through_storage(values, dtype)


def _bits(params: CodecParams, role: str) -> int:
    """The bits a member of ``role`` is coded with: ``moment_bits`` for optimizer moments, if set."""
    return params.moment_bits if role != "weight" and params.moment_bits is not None else params.bits


# --- LC-Checkpoint ----------------------------------------------------------------------------
def _lc(params: LcParams, member: Member) -> tuple[int, np.ndarray, np.ndarray]:
    target, base = member.target, member.base
    kind = _DELTA
    if member.role == "second_moment":
        kind = _DELTA_SQRT
        target = np.sqrt(target)
        base = None if base is None else np.sqrt(base)
    delta = target - base if base is not None else target.copy()
    return (kind, *_lc_quantise(delta, _bits(params, member.role)))


def _lc_quantise(delta: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Priority promotion over (sign, exponent) buckets: (table, uint8 index per element)."""
    mantissa = 23 if delta.dtype == np.float32 else 52
    exponent_bits = 8 if delta.dtype == np.float32 else 11
    raw = delta.view(np.uint32 if delta.dtype == np.float32 else np.uint64)
    n_keys = 1 << (exponent_bits + 1)
    counts = np.zeros(n_keys, dtype=np.int64)
    for start in range(0, delta.size, _CHUNK):
        keys = (raw[start:start + _CHUNK] >> mantissa).astype(np.intp)
        counts += np.bincount(keys, minlength=n_keys)
    key_ids = np.arange(n_keys)
    exponent = key_ids & ((1 << exponent_bits) - 1)
    # Exponent field 0 (zero, subnormals) and all-ones (an overflowed delta) are never kept: a
    # subnormal bucket's mean is not within |d| of its members, and inf has no mean.
    eligible = (counts > 0) & (exponent > 0) & (exponent < (1 << exponent_bits) - 1)
    candidates = key_ids[eligible]
    order = np.lexsort((candidates, -exponent[candidates]))  # largest exponent first, then sign
    kept = candidates[order][:(1 << bits) - 1]
    lut = np.zeros(n_keys, dtype=np.uint8)
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint8)
    index = np.empty(delta.size, dtype=np.uint8)
    sums = np.zeros(1 << bits, dtype=np.float64)
    for start in range(0, delta.size, _CHUNK):
        chunk = slice(start, start + _CHUNK)
        index[chunk] = lut[raw[chunk] >> mantissa]
        sums += np.bincount(index[chunk], weights=delta[chunk], minlength=1 << bits)
    table = np.zeros(kept.size + 1, dtype=np.float64)
    table[1:] = sums[1:kept.size + 1] / counts[kept]
    # Rounded to the compute dtype, a mean stays inside its bucket's closed binade, so the bound holds.
    return table.astype(delta.dtype).astype(np.float64), index


# --- ExCP ---------------------------------------------------------------------------------------
def _excp_group(params: ExcpParams, members: list[Member]) -> list[Encoded]:
    weights = [m for m in members if m.role == "weight"]
    weight = weights[0] if len(weights) == 1 else None  # joint shrinking needs one weight to steer it
    size = weight.target.size if weight is not None else None
    second = next((m for m in members if m.role == "second_moment" and m.target.size == size), None)
    results: dict[int, Encoded] = {}
    weight_kept: Optional[np.ndarray] = None
    if weight is not None:  # the weight first: its mask steers the moments
        importance = None if second is None else np.sqrt(second.target)
        table, index = _excp_weight(params, weight, importance)
        weight_kept = index != 0
        results[id(weight)] = _finish(params, weight, _DELTA, table, index)
    out = []
    for member in members:
        if id(member) not in results:
            joint = weight_kept if weight_kept is not None and member.target.size == size else None
            if member.role == "weight":
                table, index = _excp_weight(params, member, None)
            elif member.role == "moment":
                table, index = _excp_moment(params, member.target, joint)
            else:
                table, index = _excp_second(params, member.target, joint)
            results[id(member)] = _finish(params, member, _DELTA if member.role == "weight" else _ABSOLUTE,
                                          table, index)
        out.append(results[id(member)])
    return out


def _excp_weight(params: ExcpParams, member: Member, importance: Optional[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    residual = member.target - member.base if member.base is not None else member.target.copy()
    score = np.abs(residual)
    if importance is not None:
        mean = float(importance.mean(dtype=np.float64))
        if mean > 0:
            score *= importance / np.asarray(mean, dtype=importance.dtype)
    threshold = params.weight_prune * _sample_median(score)
    keep = np.flatnonzero((score > threshold) & (residual != 0))
    return _quantise_kept(residual, keep, params.bits, bounded=True)


def _excp_moment(params: ExcpParams, values: np.ndarray, joint: Optional[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    magnitude = np.abs(values)
    mask = magnitude > params.moment_prune * float(magnitude.mean(dtype=np.float64)) if values.size else magnitude > 0
    mask &= values != 0
    if joint is not None:
        mask &= joint
    return _quantise_kept(values, np.flatnonzero(mask), _bits(params, "moment"), bounded=True)


def _excp_second(params: ExcpParams, values: np.ndarray, joint: Optional[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    mask = values > 0
    if params.prune_second_moment:
        root = np.sqrt(values)
        mask &= root > params.moment_prune * float(root.mean(dtype=np.float64)) if values.size else mask
        if joint is not None:
            mask &= joint
    keep = np.flatnonzero(mask)
    log_table, index = _quantise_kept(np.log(values[keep].astype(np.float64)), None, _bits(params, "second_moment"),
                                      bounded=False,
                                      size=values.size, positions=keep)
    table = np.exp(log_table)
    table[0] = 0.0  # zero (and pruned) stays exactly zero; every level is positive
    table = table.astype(values.dtype)
    # A level that underflows or overflows in float32 would turn a positive value into 0 or inf.
    table[1:] = np.clip(table[1:], np.finfo(values.dtype).tiny, np.finfo(values.dtype).max)
    return table.astype(np.float64), index


def _quantise_kept(values: np.ndarray, keep: Optional[np.ndarray], bits: int, *, bounded: bool,
                   size: Optional[int] = None, positions: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """k-means levels for ``values[keep]`` (or for ``values`` at ``positions`` of a tensor of ``size``):
    (table with table[0] = 0, uint8 index per element of the tensor, 0 where not kept).

    ``bounded``: a kept element whose level is farther from it than it is from 0 is dropped to index
    0, so that ``|decoded - value| <= |value|`` holds for every element.
    """
    if keep is not None:
        positions, kept_values, size = keep, values[keep], values.size
    else:
        kept_values = values
    compute = values.dtype if bounded else np.float64
    levels, assignment = _kmeans(kept_values, (1 << bits) - 1)
    levels = levels.astype(compute).astype(np.float64) if bounded else levels
    table = np.concatenate(([0.0], levels))
    index = np.zeros(size, dtype=np.uint8)
    codes = assignment + np.uint8(1)
    if bounded and kept_values.size:
        err = np.abs(levels.astype(compute)[assignment] - kept_values)
        codes[err > np.abs(kept_values)] = 0
    index[positions] = codes
    return table, index


def _sample(values: np.ndarray) -> np.ndarray:
    step = max(1, values.size // _KMEANS_SAMPLE)
    return values[::step]


def _sample_median(values: np.ndarray) -> float:
    return float(np.median(_sample(values))) if values.size else 0.0


def _kmeans(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) with at most ``k`` levels: (sorted float64 levels, uint8 level per value)."""
    if values.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.uint8)
    sample = np.sort(_sample(values).astype(np.float64))
    levels = np.unique(sample[((np.arange(k) + 0.5) * sample.size / k).astype(np.intp)])  # quantile start
    for _ in range(_KMEANS_ITERS):
        assignment = np.searchsorted((levels[1:] + levels[:-1]) / 2, sample)
        counts = np.bincount(assignment, minlength=levels.size)
        sums = np.bincount(assignment, weights=sample, minlength=levels.size)
        filled = counts > 0
        new = np.unique(sums[filled] / counts[filled])
        if new.size == levels.size and np.array_equal(new, levels):
            break
        levels = new
    # Assign every value, then make each level the exact mean of its values (the L2-best level).
    mids = (levels[1:] + levels[:-1]) / 2
    assignment = np.empty(values.size, dtype=np.uint8)
    counts = np.zeros(levels.size, dtype=np.int64)
    sums = np.zeros(levels.size, dtype=np.float64)
    for start in range(0, values.size, _CHUNK):
        chunk = values[start:start + _CHUNK]
        found = np.searchsorted(mids, chunk)
        assignment[start:start + _CHUNK] = found
        counts += np.bincount(found, minlength=levels.size)
        sums += np.bincount(found, weights=chunk, minlength=levels.size)
    filled = counts > 0
    levels = levels.copy()
    levels[filled] = sums[filled] / counts[filled]
    return levels, assignment


# --- payload ------------------------------------------------------------------------------------
def _pack(params: CodecParams, member: Member, kind: int, table: np.ndarray, index: np.ndarray,
          has_base: bool) -> bytes:
    zstd = zstandard_module()
    compressor = zstd.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    kept = int(np.count_nonzero(index))  # counting first: flatnonzero of a dense index costs 4x the encode
    if index.size and kept <= _SPARSE_MAX * index.size:
        layout = _LAYOUT_SPARSE
        positions = np.flatnonzero(index)
        frames = [compressor.compress(_gap_bytes(positions).tobytes()),
                  compressor.compress(index[positions].tobytes())]
    else:
        layout = _LAYOUT_DENSE
        frames = [compressor.compress(index.tobytes()), b""]
    params_json = json.dumps(params.to_json(), sort_keys=True, separators=(",", ":")).encode()
    head = _HEADER.pack(_MAGIC, FORMAT_VERSION, _CODEC_IDS[params.codec], _ROLE_IDS[member.role],
                        _DTYPE_IDS[member.dtype], kind, layout, int(has_base), table.size, len(params_json),
                        index.size, kept, len(frames[0]), len(frames[1]))
    described = head + params_json + table.astype("<f8").tobytes()
    return described + struct.pack("<I", zlib.crc32(described)) + frames[0] + frames[1]


def _gap_bytes(positions: np.ndarray) -> np.ndarray:
    """Gaps between kept positions as bytes: a gap ``g`` is ``g // 255`` bytes of 255, then ``g % 255``."""
    gaps = np.diff(positions, prepend=-1)
    escapes = gaps // 255
    out = np.full(positions.size + int(escapes.sum()), 255, dtype=np.uint8)
    out[np.cumsum(escapes + 1) - 1] = gaps % 255
    return out


def _damaged(detail: str) -> ValueError:
    return ValueError(f"the lossy payload is damaged or does not belong here: {detail}. Restore the tensor from "
                      "another checkpoint of the chain or another copy of the blob")


def decode(payload: BytesLike, base: Optional[np.ndarray], *, dtype: str, size: int) -> np.ndarray:
    """The 1-D compute-dtype tensor of ``size`` elements that ``payload`` encodes against ``base``
    (the decoded previous link; None if the link was encoded against zeros).

    Raises ValueError, saying what is wrong, for a payload that is damaged (checksum, truncation,
    out-of-range field), of another format version, size or dtype, or a base that does not match
    it. Nothing larger than ``size`` elements (plus the payload's own length) is allocated.
    """
    _check_dtype(dtype)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size must be a non-negative int (the tensor's element count), got {size!r}")
    data = memoryview(payload).cast("B") if not isinstance(payload, np.ndarray) else memoryview(payload.tobytes())
    if data.nbytes < _HEADER.size + 4:
        raise _damaged(f"it holds {data.nbytes} bytes, fewer than a header")
    (magic, version, codec_id, role_id, dtype_id, kind, layout, has_base, table_len, params_len, n, kept,
     len1, len2) = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise _damaged(f"it starts with {bytes(magic)!r}, not the lossy payload magic {_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"the lossy payload has format version {version}, but this weightslab reads version "
                         f"{FORMAT_VERSION}; upgrade weightslab to read it")
    described_end = _HEADER.size + params_len + 8 * table_len
    if data.nbytes != described_end + 4 + len1 + len2:
        raise _damaged(f"it holds {data.nbytes} bytes where its header describes {described_end + 4 + len1 + len2}")
    if zlib.crc32(data[:described_end]) != struct.unpack_from("<I", data, described_end)[0]:
        raise _damaged("its header checksum does not match")
    if codec_id >= len(CODECS) or role_id >= len(ROLES) or dtype_id >= len(FLOAT_DTYPES) or kind > _ABSOLUTE \
            or layout > _LAYOUT_SPARSE or has_base > 1 or not 1 <= table_len <= 256 or kept > n:
        raise _damaged("a header field is out of range")
    if FLOAT_DTYPES[dtype_id] != dtype:
        raise _damaged(f"it encodes a {FLOAT_DTYPES[dtype_id]} tensor, not {dtype}")
    if n != size:
        raise _damaged(f"it encodes {n} elements, not {size}")
    try:
        params_from_json(json.loads(bytes(data[_HEADER.size:_HEADER.size + params_len])))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(f"its codec parameters are invalid ({exc})") from None
    table = np.frombuffer(data[_HEADER.size + params_len:described_end], dtype="<f8").astype(np.float64)
    if not np.isfinite(table).all() or table[0] != 0:
        raise _damaged("its level table holds non-finite values or a non-zero level 0")
    if kind == _ABSOLUTE and ROLES[role_id] == "second_moment" and (table < 0).any():
        raise _damaged("its second-moment levels are negative")
    if base is not None:
        want = _compute_dtype(dtype)
        if not isinstance(base, np.ndarray) or base.ndim != 1 or base.dtype != want or base.size != size:
            raise ValueError(f"base must be a 1-D {want} array of {size} elements (the decoded previous link), "
                             f"got {getattr(base, 'dtype', type(base).__name__)} of shape {getattr(base, 'shape', '?')}")
    if kind != _ABSOLUTE and bool(has_base) != (base is not None):
        raise _damaged("it was encoded against a previous value, but no base was given" if has_base else
                       "it was encoded against zeros, but a base was given")
    frames = data[described_end + 4:]
    if layout == _LAYOUT_DENSE:
        if len2:
            raise _damaged("a dense payload holds a second frame")
        index = np.frombuffer(_decompress(frames[:len1], n), dtype=np.uint8)
    else:
        gaps = np.frombuffer(_decompress(frames[:len1], None, limit=kept + n // 255 + 1), dtype=np.uint8)
        codes = np.frombuffer(_decompress(frames[len1:], kept), dtype=np.uint8)
        ends = gaps < 255
        if int(ends.sum()) != kept or (gaps.size and not ends[-1]):
            raise _damaged("its position stream does not hold one position per kept element")
        positions = np.cumsum(gaps, dtype=np.int64)[ends] - 1
        if kept and (positions[-1] >= n or (np.diff(positions) <= 0).any() or positions[0] < 0):
            raise _damaged("its positions are out of order or out of range")
        index = np.zeros(n, dtype=np.uint8)
        index[positions] = codes
        if kept and codes.min() == 0:
            raise _damaged("a kept element has index 0")
    if index.size and int(index.max()) >= table_len:
        raise _damaged(f"an index exceeds the {table_len} levels of its table")
    return _reconstruct(kind, table, index, base if has_base else None, dtype)


def _decompress(frame: memoryview, exact: Optional[int], *, limit: Optional[int] = None) -> bytes:
    """One checked zstd frame of exactly ``exact`` bytes (or at most ``limit``), never allocating more."""
    zstd = zstandard_module()
    try:
        content = zstd.get_frame_parameters(frame).content_size
    except zstd.ZstdError as exc:
        raise _damaged(f"a zstd frame header is unreadable ({exc})") from None
    bound = exact if exact is not None else limit
    if content == zstd.CONTENTSIZE_UNKNOWN or content > bound or (exact is not None and content != exact):
        raise _damaged(f"a zstd frame records {content} bytes where {'exactly' if exact is not None else 'at most'} "
                       f"{bound} were expected")
    try:
        out = zstd.ZstdDecompressor().decompress(frame, max_output_size=max(bound, 1))
    except zstd.ZstdError as exc:
        raise _damaged(f"zstd could not decompress it ({exc})") from None
    if len(out) != content:
        raise _damaged("a zstd frame decompressed to another size than its header records")
    return out
