"""The grammar of every identifier a root's files hold, in one place.

A root is not always written by its reader alone: it may be shared by a team, copied from someone,
or a bucket others can write. A self-digest catches damage, not a deliberate edit, so whatever is
read from a manifest, an experiment record or a name file is checked here before it builds a path
(``checkpoints/<experiment>/model/<experiment>_step_<step>.json``, ``objects/<pack>``), sizes a
buffer or reaches the catalog. Each ``check_*`` returns the value when it fits its grammar exactly
and raises ``ValueError`` saying what it should be otherwise; readers turn that into a damaged
checkpoint naming the file (:class:`~weightslab.errors.CorruptCheckpointError`).

Plain values in, no file touched: the layout, the store, the manifest and the catalog all use it.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["MAX_STEP", "MAX_COUNT", "HASH_LENGTH", "DIGEST_ALGORITHM", "DTYPE_SIZES", "MAX_DIMS",
           "is_experiment_hash", "is_pack_id", "check_experiment", "check_step", "check_count", "check_pack",
           "check_digest", "check_fast_check", "check_dtype", "check_shape", "check_token", "shape_nbytes"]

#: The largest step a checkpoint may have: what the catalog's SQLite INTEGER (signed 64-bit) holds.
#: The one bound of steps, shared by the storage layer (a manifest with a larger step is damaged)
#: and the API (``checkpoint_on_step`` refuses larger ones).
MAX_STEP = 2**63 - 1
#: The largest size, offset or time (in ns) a file may record: also a signed 64-bit integer (what
#: ``pread`` offsets and SQLite hold).
MAX_COUNT = 2**63 - 1
HASH_LENGTH = 16
DIGEST_ALGORITHM = "sha256"
#: A tensor has at most this many dimensions (torch allows 64 too).
MAX_DIMS = 64

#: The safetensors dtype names a checkpoint may record, with their element sizes in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "C64": 8, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}

_HASH = re.compile(r"[0-9a-f]{16}")
_PACK = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(rf"{DIGEST_ALGORITHM}:[0-9a-f]{{64}}")
_FAST_CHECK = re.compile(r"xxh3-128:[0-9a-f]{32}")
_TOKEN = re.compile(r"[0-9a-f]{1,64}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_experiment_hash(text: object) -> bool:
    """16 lowercase hexadecimal digits: the name of an experiment's directory."""
    return isinstance(text, str) and _HASH.fullmatch(text) is not None


def is_pack_id(text: object) -> bool:
    """64 lowercase hexadecimal digits (the SHA-256 of the pack's header)."""
    return isinstance(text, str) and _PACK.fullmatch(text) is not None


def check_experiment(value: Any, what: str = "experiment") -> str:
    if not is_experiment_hash(value):
        raise ValueError(f"{what} {value!r} is not an experiment hash ({HASH_LENGTH} hexadecimal digits)")
    return value


def check_step(value: Any, what: str = "step") -> int:
    if not _is_int(value) or not 0 <= value <= MAX_STEP:
        raise ValueError(f"{what} {value!r} is not a step (an integer from 0 to 2**63 - 1)")
    return value


def check_count(value: Any, what: str) -> int:
    """A size, an offset or a time in ns: an integer from 0 to :data:`MAX_COUNT`."""
    if not _is_int(value) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{what} {value!r} is not an integer from 0 to 2**63 - 1")
    return value


def check_pack(value: Any) -> str:
    if not is_pack_id(value):
        raise ValueError(f"pack {value!r} is not a pack id (64 hexadecimal digits)")
    return value


def check_digest(value: Any, what: str = "digest") -> str:
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        raise ValueError(f"{what} {value!r} is not '{DIGEST_ALGORITHM}:<64 hexadecimal digits>'")
    return value


def check_fast_check(value: Any) -> str:
    if not isinstance(value, str) or _FAST_CHECK.fullmatch(value) is None:
        raise ValueError(f"check {value!r} is not 'xxh3-128:<32 hexadecimal digits>'")
    return value


def check_dtype(value: Any) -> str:
    if not isinstance(value, str) or value not in DTYPE_SIZES:
        raise ValueError(f"dtype {value!r} is not one of {', '.join(DTYPE_SIZES)}")
    return value


def check_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS or \
            not all(_is_int(n) and 0 <= n <= MAX_COUNT for n in value):
        raise ValueError(f"shape {value!r} is not a list of at most {MAX_DIMS} non-negative integers")
    return tuple(value)


def shape_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """The bytes a tensor of ``dtype`` (a checked name) and ``shape`` holds."""
    return math.prod(shape) * DTYPE_SIZES[dtype]


def check_token(value: Any) -> str:
    """The token that tells apart the sharded saves of one step (hexadecimal)."""
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise ValueError(f"token {value!r} is not 1 to 64 hexadecimal digits")
    return value
