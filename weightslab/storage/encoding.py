"""Lossless encodings of one tensor's raw bytes, so checkpoints take less space and restore bit-exact.

The store knows bytes, not torch: an encoding sees a blob of raw bytes and the size of one element
(``itemsize``), nothing else. Three encodings exist:

``"raw"``
    The bytes as they are. Free to write and read; the default.
``"zstd"``
    Byte-shuffle, then zstandard. Float weights barely compress as they are, because every element
    interleaves a slowly varying sign/exponent byte with near-random mantissa bytes. Grouping byte
    ``i`` of every element together (the shuffle) puts the exponents side by side, where zstd finds
    them: float32 weights shrink to about 0.84 of their size instead of 0.92.
``"xor-zstd"``
    XOR with the previous version of the same tensor, byte-shuffle, zstandard. Between two nearby
    checkpoints most weights move a little, so sign, exponent and high mantissa bits repeat and the
    XOR is mostly zero bits: a 1e-3 relative update compresses to about 0.54. XOR (not subtraction)
    because it is exact for every bit pattern, NaN payloads and -0.0 included.

Every zstd frame carries its content size and a checksum, and :func:`decode` checks both, so a
damaged blob raises instead of restoring wrong weights. Everything here is bytes in, bytes out: no
file I/O and no torch, and no Python loop runs per element.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Optional, Union

import numpy as np

__all__ = ["ENCODINGS", "encode", "decode", "check_frame", "zstandard_module"]

ENCODINGS = ("raw", "zstd", "xor-zstd")

BytesLike = Union[bytes, bytearray, memoryview, np.ndarray]

# The shuffle and the XOR run over the blob in blocks of this many bytes, so the scratch buffer
# stays in cache and a delta needs one extra block of memory, not a second copy of the tensor.
# A power of two, so blocks hold whole elements of every power-of-two itemsize.
_BLOCK = 1 << 20


def zstandard_module() -> ModuleType:
    """Import :mod:`zstandard` lazily: it is an optional dependency, needed only to compress."""
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError("compression='zstd' needs the zstandard package: pip install 'weightslab[zstd]'") from exc
    return zstandard


def encode(data: BytesLike, *, itemsize: int, encoding: str, base: Optional[BytesLike] = None,
           level: int = 1, threads: int = 0) -> Union[bytes, memoryview]:
    """Encode the raw bytes ``data`` (any C-contiguous bytes-like object) with ``encoding``.

    ``itemsize`` is the size of one element in bytes (4 for float32); the shuffle groups byte
    ``i`` of every element. A blob whose length is not a multiple of ``itemsize`` is accepted: its
    whole elements are shuffled and the trailing bytes are appended unchanged.

    ``base`` is the raw bytes of the previous version of the same tensor, required by
    ``"xor-zstd"`` (same length as ``data``) and refused by the others, so a caller that believes
    it is storing a delta cannot silently store something else. ``level`` is the zstd level
    (1 is fast and already gets most of the gain on weights); ``threads`` is passed to zstd
    (0: compress on the calling thread, -1: one worker per core).

    ``"raw"`` returns a memoryview of ``data`` without copying; the zstd encodings return bytes.
    """
    _check_encoding(encoding)
    _check_itemsize(itemsize)
    view = _bytes_view(data, "data")
    if encoding == "raw":
        _refuse_base(base, encoding)
        return view
    zstd = zstandard_module()
    src = np.frombuffer(view, dtype=np.uint8)
    base_arr = None
    if encoding == "xor-zstd":
        base_arr = _base_array(base, view.nbytes, damaged=False)
    else:
        _refuse_base(base, encoding)
    if itemsize > 1 and view.nbytes >= 2 * itemsize:
        payload: Any = _shuffle(src, itemsize, base_arr)  # XOR fused in: one pass, one copy
    elif base_arr is not None:
        payload = _xor(src, base_arr, np.empty_like(src))
    else:
        payload = view  # nothing to shuffle: compress the caller's buffer in place
    compressor = zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True,
                                     threads=threads)
    return compressor.compress(payload)


def decode(stored: BytesLike, *, itemsize: int, encoding: str, raw_nbytes: int,
           base: Optional[BytesLike] = None, out: Optional[BytesLike] = None) -> memoryview:
    """Invert :func:`encode`: return exactly ``raw_nbytes`` bytes, bit-identical to the original.

    ``itemsize``, ``encoding`` and ``base`` must be those given to :func:`encode`. With ``out``
    (a writable C-contiguous buffer of ``raw_nbytes`` bytes, for instance the tensor being
    restored) the bytes are written into it and a memoryview of ``out`` is returned. Without it,
    ``"raw"`` returns a view of ``stored`` itself (no copy) and the zstd encodings a new writable
    buffer. If decoding fails, ``out`` holds unspecified bytes.

    A damaged blob (corrupt or truncated zstd frame, checksum mismatch, wrong decompressed size,
    trailing bytes, a base of the wrong length) raises :class:`ValueError` saying so.
    """
    _check_encoding(encoding)
    _check_itemsize(itemsize)
    if not isinstance(raw_nbytes, int) or isinstance(raw_nbytes, bool) or raw_nbytes < 0:
        raise ValueError(f"raw_nbytes must be a non-negative int, got {raw_nbytes!r}")
    stored_view = _bytes_view(stored, "stored")
    if encoding == "raw":
        _refuse_base(base, encoding)
        if stored_view.nbytes != raw_nbytes:
            raise _damaged(f"it holds {stored_view.nbytes} bytes where {raw_nbytes} were expected")
        if out is None:
            return stored_view  # no copy: the stored bytes are already the answer
    if out is None:
        dest = np.empty(raw_nbytes, dtype=np.uint8)
        result = memoryview(dest)
    else:
        result = _bytes_view(out, "out")
        if result.readonly:
            raise ValueError("out must be a writable buffer (a bytearray, a numpy array, ...), got a read-only one")
        if result.nbytes != raw_nbytes:
            raise ValueError(f"out holds {result.nbytes} bytes but the blob decodes to raw_nbytes={raw_nbytes}; "
                             "pass a buffer of exactly raw_nbytes bytes")
        dest = np.frombuffer(result, dtype=np.uint8)
    if encoding == "raw":
        dest[:] = np.frombuffer(stored_view, dtype=np.uint8)
        return result

    base_arr = _base_array(base, raw_nbytes, damaged=True) if encoding == "xor-zstd" else None
    if encoding != "xor-zstd":
        _refuse_base(base, encoding)
    shuffled = itemsize > 1 and raw_nbytes >= 2 * itemsize
    # Shuffled bytes need a scratch buffer to unshuffle from; unshuffled ones go straight to dest,
    # unless dest is also the base (restoring a delta in place), which they would overwrite.
    direct = not shuffled and (base_arr is None or not np.may_share_memory(dest, base_arr))
    target = dest if direct else np.empty(raw_nbytes, dtype=np.uint8)
    _decompress_into(stored_view, target, raw_nbytes)
    if shuffled:
        _unshuffle(target, itemsize, dest, base_arr)
    elif base_arr is not None:
        _xor(target, base_arr, dest)
    return result


# --- helpers ---------------------------------------------------------------------------------
def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(map(repr, ENCODINGS))}")


def _check_itemsize(itemsize: int) -> None:
    if not isinstance(itemsize, int) or isinstance(itemsize, bool) or itemsize < 1:
        raise ValueError(f"itemsize must be the size of one element in bytes (a positive int such as 4 for "
                         f"float32), got {itemsize!r}")


def _refuse_base(base: Optional[BytesLike], encoding: str) -> None:
    if base is not None:
        raise ValueError(f"encoding {encoding!r} takes no base; only 'xor-zstd' stores a delta against one. "
                         "Pass base=None, or use encoding='xor-zstd'")


def _bytes_view(data: BytesLike, name: str) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; copy it first (numpy.ascontiguousarray)")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _base_array(base: Optional[BytesLike], nbytes: int, *, damaged: bool) -> np.ndarray:
    if base is None:
        raise ValueError("encoding 'xor-zstd' needs base: the raw bytes of the previous version of the tensor")
    view = _bytes_view(base, "base")
    if view.nbytes != nbytes:
        if damaged:
            raise _damaged(f"its base holds {view.nbytes} bytes but the blob holds {nbytes}; "
                           "the delta was taken against another version of the tensor")
        raise ValueError(f"base holds {view.nbytes} bytes but data holds {nbytes}; an xor-zstd delta needs the "
                         "previous version of the same tensor (same dtype and shape), or use encoding='zstd'")
    return np.frombuffer(view, dtype=np.uint8)


def _damaged(detail: str) -> ValueError:
    return ValueError(f"the stored blob is damaged: {detail}. It cannot be restored bit-exactly; restore an "
                      "earlier checkpoint or another copy of the blob")


def _xor(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = a ^ b`` on equal-length uint8 arrays, eight bytes at a time where possible."""
    wide = a.size - a.size % 8
    if wide:  # eight bytes per operation; numpy handles unaligned uint64 views correctly
        np.bitwise_xor(a[:wide].view(np.uint64), b[:wide].view(np.uint64), out=out[:wide].view(np.uint64))
    if wide != a.size:
        np.bitwise_xor(a[wide:], b[wide:], out=out[wide:])
    return out


def _shuffle(src: np.ndarray, itemsize: int, base: Optional[np.ndarray]) -> np.ndarray:
    """Byte ``i`` of element ``j`` goes to ``i * n + j`` (XOR-ed with ``base`` first, if given).

    Trailing bytes past the last whole element are appended unchanged.
    """
    n = src.size // itemsize
    whole = n * itemsize
    out = np.empty(src.size, dtype=np.uint8)
    rows = out[:whole].reshape(itemsize, n)
    step = max(1, _BLOCK // itemsize)  # elements per block
    scratch = np.empty(step * itemsize, dtype=np.uint8) if base is not None else None
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = src[start * itemsize:stop * itemsize]
        if scratch is not None:
            block = _xor(block, base[start * itemsize:stop * itemsize], scratch[:block.size])
        cols = block.reshape(stop - start, itemsize)
        # One strided copy per byte position: numpy copies a whole row at C speed, where a single
        # 2-D transpose copy of the (n, itemsize) view runs several times slower when unshuffling.
        for i in range(itemsize):
            rows[i, start:stop] = cols[:, i]
    if whole != src.size:
        tail = src[whole:]
        out[whole:] = tail if base is None else np.bitwise_xor(tail, base[whole:])
    return out


def _unshuffle(shuffled: np.ndarray, itemsize: int, dest: np.ndarray, base: Optional[np.ndarray]) -> None:
    """Inverse of :func:`_shuffle`: write the original bytes of ``shuffled`` into ``dest``.

    ``base`` may be ``dest`` itself (restoring a delta into the tensor that holds the previous
    version): each block is unshuffled into a scratch buffer and XOR-ed into ``dest`` while its
    base bytes are still unread.
    """
    n = shuffled.size // itemsize
    whole = n * itemsize
    rows = shuffled[:whole].reshape(itemsize, n)
    step = max(1, _BLOCK // itemsize)
    scratch = np.empty(step * itemsize, dtype=np.uint8) if base is not None else None
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = dest[start * itemsize:stop * itemsize]
        staging = block if scratch is None else scratch[:block.size]
        cols = staging.reshape(stop - start, itemsize)
        for i in range(itemsize):
            cols[:, i] = rows[i, start:stop]
        if base is not None:  # XOR the block while it is still in cache
            _xor(staging, base[start * itemsize:stop * itemsize], block)
    if whole != shuffled.size:
        tail = shuffled[whole:]
        dest[whole:] = tail if base is None else np.bitwise_xor(tail, base[whole:])


def _frame_header_size(head: bytes | memoryview, raw_nbytes: int) -> int:
    """The size of the zstd frame header at the start of ``head``, once it is known to record
    ``raw_nbytes`` as the frame's content size (weightslab always writes it); ValueError otherwise."""
    zstd = zstandard_module()
    try:
        content_size = zstd.get_frame_parameters(head).content_size
        header_size = zstd.frame_header_size(head)
    except zstd.ZstdError as exc:
        raise _damaged(f"its zstd frame header is unreadable ({exc})") from None
    if content_size == zstd.CONTENTSIZE_UNKNOWN:
        raise _damaged("its zstd frame header does not record the content size, which weightslab always writes")
    if content_size != raw_nbytes:
        raise _damaged(f"its zstd frame holds {content_size} bytes where {raw_nbytes} were expected")
    return header_size


def _decompress_into(stored: memoryview, target: np.ndarray, raw_nbytes: int) -> None:
    """Decompress the single zstd frame ``stored`` into ``target`` (``raw_nbytes`` bytes), checked."""
    zstd = zstandard_module()
    # Check the header before decompressing: a wrong size in it should be reported as such, not
    # as whatever the decompressor makes of it.
    header_size = _frame_header_size(stored, raw_nbytes)
    # The stream reader accepts a frame cut short before its checksum, and ignores bytes after the
    # frame: check the frame spans the blob exactly before trusting it.
    frame_size = _frame_size(stored, header_size)
    if frame_size != stored.nbytes:
        raise _damaged(f"it holds {stored.nbytes} bytes but its zstd frame spans "
                       f"{'at least ' if frame_size > stored.nbytes else ''}{frame_size}")
    view = memoryview(target)
    got = 0
    try:
        # Stream straight into the destination: no intermediate bytes object of the full size.
        reader = zstd.ZstdDecompressor().stream_reader(stored)
        while got < raw_nbytes:
            count = reader.readinto(view[got:])
            if not count:
                break
            got += count
        # Reading past the end consumes the frame's checksum, which is verified here if the data
        # filled the buffer exactly.
        extra = reader.read(1)
    except zstd.ZstdError as exc:
        raise _damaged(f"zstd could not decompress it ({exc})") from None
    if got != raw_nbytes:
        raise _damaged(f"it decompressed to {got} bytes where {raw_nbytes} were expected")
    if extra:
        raise _damaged(f"its zstd frame decompresses to more than the {raw_nbytes} bytes its header records")


#: The most bytes one zstd block regenerates (RFC 8878, Block_Maximum_Size).
_BLOCK_MAX = 128 << 10
_FRAME_HEADER_MAX = 18


def check_frame(read: Callable[[int, int], bytes], nbytes: int, raw_nbytes: int) -> None:
    """Check, before a buffer of ``raw_nbytes`` is allocated to decode it into, that the zstd frame
    of ``nbytes`` stored bytes records ``raw_nbytes`` as its content size and that its blocks can
    regenerate that many bytes. Only headers are read (``read(offset, count)`` returns the stored
    bytes there): the frame header, then one 3-byte header per block until the blocks could hold
    ``raw_nbytes``. A record or a frame header that lies about the size raises ValueError (damaged).
    """
    header_size = _frame_header_size(read(0, min(nbytes, _FRAME_HEADER_MAX)), raw_nbytes)
    position, capacity = header_size, 0
    while capacity < raw_nbytes:
        if position + 3 > nbytes:
            raise _damaged(f"its zstd frame ends after {capacity} of the {raw_nbytes} bytes its header records")
        block_header = int.from_bytes(read(position, 3), "little")
        block_type, block_size = (block_header >> 1) & 0x3, block_header >> 3
        if block_type == 3:
            raise _damaged("its zstd frame contains a block of the reserved type 3")
        # raw and RLE blocks say what they regenerate; a compressed one regenerates at most _BLOCK_MAX
        capacity += _BLOCK_MAX if block_type == 2 else block_size
        position += 3 + (1 if block_type == 1 else block_size)
        if block_header & 0x1:  # Last_Block
            break
    if capacity < raw_nbytes:
        raise _damaged(f"its zstd frame's blocks regenerate at most {capacity} bytes, not the {raw_nbytes} its "
                       "header records")


def _frame_size(stored: memoryview, header_size: int) -> int:
    """The size in bytes of the zstd frame starting ``stored``, read from its block headers.

    Returns a size larger than ``stored`` if the frame is cut short. One Python step per block
    (128 KiB of data at most), so a 64 MiB tensor costs a few hundred steps.
    """
    # Frame format, RFC 8878 section 3.1.1: magic, frame header, blocks, optional 4-byte checksum.
    has_checksum = bool(stored[4] & 0x04)  # Content_Checksum_flag of the Frame_Header_Descriptor
    position = header_size
    while True:
        if position + 3 > stored.nbytes:
            return position + 3
        block_header = int.from_bytes(stored[position:position + 3], "little")
        block_type = (block_header >> 1) & 0x3
        if block_type == 3:
            raise _damaged("its zstd frame contains a block of the reserved type 3")
        # An RLE block (type 1) stores one byte, repeated Block_Size times.
        position += 3 + (1 if block_type == 1 else block_header >> 3)
        if block_header & 0x1:  # Last_Block
            return position + (4 if has_checksum else 0)
