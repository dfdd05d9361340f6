"""Content-addressed blob storage: bytes in, verified bytes out.

The store knows bytes, not torch. A save hands it the raw bytes of the tensors that changed; the
store names each blob by the SHA-256 of its raw bytes, skips the ones it already holds (anywhere
in the root, written by any experiment or process), encodes the rest as asked (raw, zstd, or an
XOR delta against the previous version of the same tensor), and packs them into a single file:
one file and one fsync round per checkpoint, however many tensors. Reading checks every byte
against the raw digest, after decoding, so a damaged pack, a wrong delta base or a stale location
can never return wrong data.

A pack is a valid safetensors file whose tensor names are the blobs' raw digests, so any
safetensors tool can open it (raw blobs as their real dtype and shape, encoded ones as bytes)::

    <u64 little-endian header length> <JSON header, space padded to 8 bytes> <blob bytes ...>

The pack's name is the digest of its header. Locations recorded in manifests are hints: garbage
collection may move live blobs into a new pack, and a reader whose hint fails finds the blob
again by digest in the :class:`BlobIndex`, built from the pack headers.

SHA-256 (about 1.7 GB/s on one core here) is the content address. When the optional ``xxhash``
package is installed (``pip install 'weightslab[fast]'``), each blob also records an XXH3-128
checksum of its raw bytes (about 20 GB/s), and restores check that instead, so verification no
longer dominates a restore from the page cache; ``verify(strong=True)`` still checks SHA-256.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

from . import encoding as _encoding
from ..errors import CorruptCheckpointError, WeightslabError
from .atomic import atomic_write, fsync_dir, make_dirs, remove
from .identifiers import DIGEST_ALGORITHM, check_count, check_digest, check_fast_check, check_pack
from .layout import Layout

try:  # POSIX advisory locks; elsewhere garbage collection relies on its grace period alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Blob", "BlobRef", "BlobStore", "BlobIndex", "DIGEST_ALGORITHM", "PackInfo"]

log = logging.getLogger(__name__)

_HASHERS: Mapping[str, Callable[[], Any]] = {"sha256": hashlib.sha256}
PACK_FORMAT = "weightslab.pack"
PACK_FORMAT_VERSION = "2"
#: Compressed blobs that do not get at least this much smaller are stored raw (cheaper to read).
_MIN_SAVING = 0.95
#: Reads of at least this many bytes are verified on several threads.
_PARALLEL_READ_BYTES = 32 * 2**20
_READ_THREADS = max(2, min(4, os.cpu_count() or 2))
#: Verification reads a raw blob this many bytes at a time: what it costs in memory, whatever a
#: manifest says the blob holds.
VERIFY_CHUNK = 8 << 20
#: A delta's base may itself be a delta this many times at most (weightslab writes one level: deltas
#: never chain); a deeper record is damaged, not recursed into.
_MAX_DEPTH = 16
#: The largest element size an encoded blob may record (the byte shuffle's stride).
_MAX_ITEMSIZE = 64
#: An encoded blob whose raw size is at most this many times its stored size (plus 1 MiB) is
#: allocated without reading its zstd frame first: the pack's real size already bounds it. Beyond,
#: the frame's headers must show its blocks can regenerate that much (a tensor of zeros legitimately
#: compresses about 30,000 times; a crafted record could claim anything).
_PLAIN_EXPANSION = 16

BytesLike = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Blob:
    """The raw bytes of one tensor to store, with what the pack header and the encoder need."""

    data: BytesLike
    dtype: str  # a safetensors dtype name ("F32", "BF16", ...); opaque to the store
    shape: tuple[int, ...]
    itemsize: int = 1
    base: "tuple[BlobRef, BytesLike] | None" = None  # previous version (ref, raw bytes) for a delta


@dataclass(frozen=True)
class BlobRef:
    """Where one blob lives, how it is encoded, and the digest of its raw bytes."""

    digest: str  # "<algorithm>:<hex>" of the RAW bytes
    pack: str  # pack id (a hint: the blob may have moved; the digest finds it again)
    offset: int  # absolute offset of the stored bytes in the pack file
    nbytes: int  # stored bytes
    encoding: str = "raw"
    raw_nbytes: int | None = None  # decoded size, when encoded
    itemsize: int = 1  # element size, for the byte shuffle of encoded blobs
    base: "BlobRef | None" = None  # the blob an XOR delta applies to
    check: str | None = None  # "xxh3-128:<hex>" of the raw bytes: a fast integrity check

    @property
    def size(self) -> int:
        """Raw (decoded) size in bytes."""
        return self.nbytes if self.raw_nbytes is None else self.raw_nbytes

    @property
    def depth(self) -> int:
        """Number of deltas between this blob and a self-contained one."""
        return 0 if self.base is None else 1 + self.base.depth

    def chain(self) -> Iterator["BlobRef"]:
        """This blob and every base it needs, nearest first."""
        ref: BlobRef | None = self
        while ref is not None:
            yield ref
            ref = ref.base

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"digest": self.digest, "pack": self.pack, "offset": self.offset, "nbytes": self.nbytes}
        if self.encoding != "raw":
            data.update(encoding=self.encoding, raw_nbytes=self.size, itemsize=self.itemsize)
        if self.base is not None:
            data["base"] = self.base.to_json()
        if self.check is not None:
            data["check"] = self.check
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, _depth: int = 0) -> "BlobRef":
        """Read what :meth:`to_json` wrote, every field checked against its grammar (ValueError
        saying which is not): a manifest may have been crafted, and these fields name files and
        size buffers."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a blob record is {type(data).__name__}, not a mapping")
        if _depth > _MAX_DEPTH:
            raise ValueError(f"a blob's chain of delta bases is deeper than {_MAX_DEPTH}")
        missing = [k for k in ("digest", "pack", "offset", "nbytes") if k not in data]
        if missing:
            raise ValueError(f"a blob record lacks {', '.join(missing)}")
        encoding = data.get("encoding", "raw")
        if encoding not in _encoding.ENCODINGS:
            raise ValueError(f"unknown blob encoding {encoding!r}")
        nbytes = check_count(data["nbytes"], "nbytes")
        raw_nbytes = check_count(data["raw_nbytes"], "raw_nbytes") if "raw_nbytes" in data else None
        if encoding == "raw" and raw_nbytes not in (None, nbytes):
            raise ValueError(f"a raw blob of {nbytes} bytes records raw_nbytes {raw_nbytes}")
        itemsize = _check_itemsize(data.get("itemsize", 1))
        base_data = data.get("base")
        base = cls.from_json(base_data, _depth=_depth + 1) if base_data is not None else None
        if (base is not None) != (encoding == "xor-zstd"):
            raise ValueError("only an xor-zstd blob has a base, and it must have one")
        ref = cls(digest=check_digest(data["digest"]), pack=check_pack(data["pack"]),
                  offset=check_count(data["offset"], "offset"), nbytes=nbytes, encoding=encoding,
                  raw_nbytes=raw_nbytes if encoding != "raw" else None, itemsize=itemsize, base=base,
                  check=check_fast_check(data["check"]) if data.get("check") is not None else None)
        if base is not None and base.size != ref.size:
            raise ValueError(f"a delta of {ref.size} bytes against a base of {base.size} bytes")
        return ref


@dataclass(frozen=True)
class PackInfo:
    pack: str
    path: Path
    size: int
    mtime: float
    blobs: tuple[BlobRef, ...]  # base refs hold only the base digest (resolve through the index)


@dataclass(frozen=True)
class _Stored:
    """One blob as it goes into a pack: its stored (maybe encoded) bytes and what decodes them."""

    digest: str
    dtype: str
    shape: tuple[int, ...]
    data: BytesLike
    encoding: str
    raw_nbytes: int
    itemsize: int
    base: "BlobRef | None"
    check: str | None


def _fast_checksum() -> Callable[[BytesLike], str] | None:
    """XXH3-128 of raw bytes, if the optional xxhash package is installed."""
    try:
        import xxhash
    except ImportError:
        return None
    return lambda data: "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()


def _digest(data: BytesLike, algorithm: str = DIGEST_ALGORITHM) -> str:
    # hashlib releases the GIL on large buffers, so this runs beside the training thread.
    return f"{algorithm}:{_HASHERS[algorithm](data).hexdigest()}"


def _as_bytes_view(data: BytesLike) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("blob data must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_itemsize(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_ITEMSIZE:
        raise ValueError(f"itemsize {value!r} is not an integer from 1 to {_MAX_ITEMSIZE}")
    return value


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def read_pack_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a pack and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CorruptCheckpointError(f"pack {path} is truncated (no header)", path=path)
            (length,) = struct.unpack("<Q", head)
            if length > 100 * 2**20:
                raise CorruptCheckpointError(f"pack {path} has an implausible header length {length}", path=path)
            raw = f.read(length)
    except (FileNotFoundError, CorruptCheckpointError):
        raise
    except OSError as exc:  # a directory where a pack should be, no permission: unreadable, as damage is
        raise CorruptCheckpointError(f"pack {path} cannot be read ({exc})", path=path) from None
    if len(raw) != length:
        raise CorruptCheckpointError(f"pack {path} is truncated inside its header", path=path)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise CorruptCheckpointError(f"pack {path} has a damaged header", path=path) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"pack {path} has a damaged header (not a JSON object)", path=path)
    return header, 8 + length


def _pack_blobs(pack_id: str, header: Mapping[str, Any], data_start: int, size: int) -> list[BlobRef]:
    """The blobs a pack's header lists, each field checked (ValueError: the header is damaged or
    crafted) and each blob inside the pack's ``size`` bytes."""
    meta = header.get("__metadata__", {}) or {}
    algorithm = meta.get("digest", DIGEST_ALGORITHM)
    if algorithm != DIGEST_ALGORITHM:
        raise ValueError(f"digest algorithm {algorithm!r}; this weightslab reads {DIGEST_ALGORITHM!r}")
    encoded = json.loads(meta.get("encodings", "{}"))
    checks = json.loads(meta.get("checks", "{}"))
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        check_count(begin, "a data offset")
        check_count(end, "a data offset")
        if not begin <= end <= size - data_start:
            raise ValueError(f"blob {name} at data offsets {begin}-{end} is not inside the pack's {size} bytes")
        extra = encoded.get(name) or {}
        encoding = extra.get("encoding", "raw")
        if encoding not in _encoding.ENCODINGS:
            raise ValueError(f"unknown blob encoding {encoding!r}")
        base = None
        if extra.get("base"):
            base = BlobRef(digest=check_digest(extra["base"]), pack="", offset=-1, nbytes=-1)  # via the index
        if (base is not None) != (encoding == "xor-zstd"):
            raise ValueError("only an xor-zstd blob has a base, and it must have one")
        check = checks.get(name)
        out.append(BlobRef(digest=check_digest(f"{algorithm}:{name}"), pack=pack_id, offset=data_start + begin,
                           nbytes=end - begin, encoding=encoding,
                           raw_nbytes=check_count(extra["raw_nbytes"], "raw_nbytes") if extra else None,
                           itemsize=_check_itemsize(extra.get("itemsize", 1)), base=base,
                           check=check_fast_check(check) if check is not None else None))
    return out


class BlobIndex:
    """Digest -> a location of that blob, built lazily from the pack headers of a root.

    Other processes may add packs at any time and garbage collection may move blobs, so a miss
    or a stale entry is answered by rescanning; the index only has to be right about what it
    returns, and every read verifies that anyway.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self._lock = threading.Lock()
        self._by_digest: dict[str, BlobRef] = {}
        self._scanned: set[str] = set()  # pack ids whose headers are in the index
        self._loaded = False

    def _scan(self) -> None:
        seen = set()
        for info in self.packs():
            seen.add(info.pack)
            if info.pack in self._scanned:
                continue
            for ref in info.blobs:
                self._by_digest.setdefault(ref.digest, ref)
            self._scanned.add(info.pack)
        gone = self._scanned - seen
        if gone:
            self._by_digest = {d: r for d, r in self._by_digest.items() if r.pack not in gone}
            self._scanned -= gone
        self._loaded = True

    def packs(self) -> list[PackInfo]:
        """Every pack of the root, headers read; damaged packs are skipped with a warning. Only
        regular files named like packs in fan-out directories count: a symbolic link (to a
        directory of someone's models, say) is neither listed nor followed (see
        :meth:`~weightslab.storage.layout.Layout.objects_links`)."""
        found = []
        try:
            fanouts = [e for e in os.scandir(self.layout.objects_dir) if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        for fan in fanouts:
            with os.scandir(fan.path) as entries:
                listed = [e for e in entries if e.is_file(follow_symlinks=False)]
            for entry in listed:
                pack_id = Layout.parse_pack_path(fan.name, entry.name)
                if pack_id is None:
                    continue  # not a pack (a temporary file, something someone put there)
                path = Path(entry.path)
                try:
                    st = entry.stat(follow_symlinks=False)
                    header, start = read_pack_header(path)
                    blobs = tuple(_pack_blobs(pack_id, header, start, st.st_size))
                except FileNotFoundError:
                    continue
                except (CorruptCheckpointError, KeyError, TypeError, ValueError, AttributeError,
                        RecursionError) as exc:
                    log.warning("skipping unreadable pack %s: %s", path, exc)
                    continue
                found.append(PackInfo(pack_id, path, st.st_size, st.st_mtime, blobs))
        return found

    def lookup(self, digest: str, *, rescan: bool = True) -> BlobRef | None:
        """A location of the blob, with the locations of its delta bases filled in; None if the
        root does not hold it (or holds it without one of its bases)."""
        with self._lock:
            return self._lookup(digest, rescan, depth=0)

    def _lookup(self, digest: str, rescan: bool, depth: int) -> BlobRef | None:
        if not self._loaded:
            self._scan()
        ref = self._by_digest.get(digest)
        if ref is not None and not self.layout.pack(ref.pack).exists():
            ref = None
        if ref is None and rescan:
            self._scan()
            ref = self._by_digest.get(digest)
        if ref is None or ref.base is None or ref.base.offset >= 0:
            return ref
        if depth > 1000:  # a cycle of bases cannot be written, but never loop on a damaged root
            return None
        base = self._lookup(ref.base.digest, rescan, depth + 1)
        return replace(ref, base=base) if base is not None else None

    def add(self, refs: Iterable[BlobRef]) -> None:
        """Record a pack just written; its locations win (a rewritten pack replaces an old one)."""
        with self._lock:
            for ref in refs:
                self._by_digest[ref.digest] = ref
                self._scanned.add(ref.pack)

    def forget_pack(self, pack_id: str) -> None:
        with self._lock:
            self._by_digest = {d: r for d, r in self._by_digest.items() if r.pack != pack_id}
            self._scanned.discard(pack_id)


class BlobStore:
    """The ``objects/`` directory of one root.

    ``compression`` is ``"off"`` or ``"zstd"`` (byte shuffle + zstandard, an optional extra); blobs
    given a ``base`` are stored as XOR deltas against it when compression is on.
    """

    def __init__(self, layout: Layout, *, compression: str = "off", level: int = 1, direct: bool = True):
        if compression not in ("off", "zstd"):
            raise ValueError(f"compression must be 'off' or 'zstd', got {compression!r}")
        if compression == "zstd":
            _encoding.zstandard_module()  # fail now, with the extra to install, not at the first save
        self.layout = layout
        self.compression = compression
        self.level = level
        self.direct = direct  # write packs with O_DIRECT where the filesystem allows it
        self.index = BlobIndex(layout)
        # XXH3 checks of what is stored, verified by normal reads; SHA-256 only without xxhash
        self._fast = _fast_checksum()

    # --- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """Writers hold the lock shared while they commit; garbage collection holds it exclusively,
        so it never deletes a blob a commit in progress is about to reference."""
        if fcntl is None:
            yield
            return
        make_dirs(self.layout.objects_dir)
        fd = os.open(self.layout.objects_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # --- writing ----------------------------------------------------------------------------
    def put(self, blobs: Sequence[Blob], *, dedupe: bool = True) -> list[BlobRef]:
        """Store ``blobs`` (durably) and return a ref per blob, in order.

        Blobs whose raw digest the root already holds cost nothing; the others go into one new
        pack. Identical blobs within the call are stored once.
        """
        return self.put_counting(blobs, dedupe=dedupe)[0]

    def put_counting(self, blobs: Sequence[Blob], *, dedupe: bool = True) -> tuple[list[BlobRef], int]:
        """:meth:`put`, and the bytes of blob data it stored (0 when the root held every blob)."""
        views = [_as_bytes_view(b.data) for b in blobs]
        digests = [_digest(v) for v in views]
        refs: dict[str, BlobRef] = {}
        new: dict[str, _Stored] = {}
        for blob, view, digest in zip(blobs, views, digests):
            if digest in refs or digest in new:
                continue
            # (a pack that garbage collection deleted since the index saw it is not found: the
            # index checks that the pack still exists, and the bytes are stored again)
            existing = self.index.lookup(digest, rescan=False) if dedupe else None
            if existing is not None:
                refs[digest] = existing
            else:
                new[digest] = self._encode(digest, blob, view)
        if new:
            refs.update(self._write_pack(list(new.values())))
        return [refs[d] for d in digests], sum(memoryview(item.data).nbytes for item in new.values())

    def _encode(self, digest: str, blob: Blob, view: memoryview) -> _Stored:
        fast = self._fast
        check = fast(view) if fast is not None else None

        def stored(data: BytesLike, encoding: str, base: BlobRef | None = None) -> _Stored:
            return _Stored(digest, blob.dtype, blob.shape, data, encoding, view.nbytes, blob.itemsize, base, check)

        if self.compression == "off" or view.nbytes == 0:
            return stored(view, "raw")
        if blob.base is not None:
            base_ref, base_bytes = blob.base
            data = _encoding.encode(view, itemsize=blob.itemsize, encoding="xor-zstd", base=base_bytes,
                                    level=self.level)
            if len(data) < view.nbytes * _MIN_SAVING:
                return stored(data, "xor-zstd", base_ref)
        data = _encoding.encode(view, itemsize=blob.itemsize, encoding="zstd", level=self.level)
        if len(data) < view.nbytes * _MIN_SAVING:
            return stored(data, "zstd")
        return stored(view, "raw")

    def _write_pack(self, new: list[_Stored]) -> dict[str, BlobRef]:
        header: dict[str, Any] = {}
        encodings: dict[str, Any] = {}
        checks = {_hex(item.digest): item.check for item in new if item.check}
        position = 0
        for item in new:
            n = memoryview(item.data).nbytes
            name = _hex(item.digest)
            if item.encoding == "raw":
                header[name] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [position, position + n]}
            else:  # encoded bytes open as a uint8 vector; their meaning is in the metadata
                header[name] = {"dtype": "U8", "shape": [n], "data_offsets": [position, position + n]}
                encodings[name] = {"encoding": item.encoding, "raw_nbytes": item.raw_nbytes, "itemsize": item.itemsize,
                                   "base": item.base.digest if item.base else None, "dtype": item.dtype,
                                   "shape": list(item.shape)}
            position += n
        metadata = {"format": PACK_FORMAT, "format_version": PACK_FORMAT_VERSION, "digest": DIGEST_ALGORITHM}
        if encodings:
            metadata["encodings"] = json.dumps(encodings, sort_keys=True, separators=(",", ":"))
        if checks:
            metadata["checks"] = json.dumps(checks, sort_keys=True, separators=(",", ":"))
        header["__metadata__"] = metadata
        header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns data to 8 bytes
        pack_id = hashlib.sha256(header_bytes).hexdigest()
        data_start = 8 + len(header_bytes)
        path = self.layout.pack(pack_id)
        if not path.exists():
            make_dirs(path.parent)
            chunks: list[BytesLike] = [struct.pack("<Q", len(header_bytes)), header_bytes]
            chunks.extend(item.data for item in new)
            atomic_write(path, chunks, direct=self.direct)
        refs = {}
        for item in new:
            refs[item.digest] = BlobRef(
                digest=item.digest, pack=pack_id, offset=data_start + header[_hex(item.digest)]["data_offsets"][0],
                nbytes=memoryview(item.data).nbytes, encoding=item.encoding,
                raw_nbytes=item.raw_nbytes if item.encoding != "raw" else None,
                itemsize=item.itemsize if item.encoding != "raw" else 1, base=item.base, check=item.check)
        self.index.add(refs.values())
        return refs

    # --- reading ----------------------------------------------------------------------------
    def pack_path(self, ref: BlobRef) -> Path:
        return self.layout.pack(ref.pack)

    def exists(self, ref: BlobRef) -> bool:
        return self.layout.pack(ref.pack).exists()

    def read_into(self, items: Iterable[tuple[BlobRef, BytesLike]], *, checkpoint: str | None = None,
                  strong: bool = False) -> None:
        """Fill each writable buffer with its blob's raw bytes, verified against the raw digest.

        A location that fails (pack missing, bytes not matching) is looked up again by digest;
        if no location yields the right bytes, :class:`CorruptCheckpointError` names the pack
        file of the recorded location (and ``checkpoint``, when given). Large reads are spread
        over a few threads: reading and SHA-256 both release the GIL, so verification overlaps.
        The check is the blob's fast checksum when it has one and xxhash is installed, SHA-256
        otherwise or with ``strong=True``.
        """
        work = []
        for ref, out in items:
            view = _as_bytes_view(out)
            if view.nbytes != ref.size:
                raise ValueError(f"buffer of {view.nbytes} bytes for a blob of {ref.size} bytes")
            work.append((ref, view))
        with _PackFiles(self.layout) as files:
            total = sum(ref.size for ref, _ in work)
            workers = min(_READ_THREADS, len(work))
            if workers < 2 or total < _PARALLEL_READ_BYTES:
                for ref, view in work:
                    self._read_verified(ref, view, files, checkpoint, strong)
                return
            # largest first, so one big tensor does not end up alone at the tail
            work.sort(key=lambda item: -item[0].size)
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="weightslab-read") as pool:
                futures = [pool.submit(self._read_verified, ref, view, files, checkpoint, strong)
                           for ref, view in work]
                for future in futures:
                    future.result()

    def read(self, ref: BlobRef, *, checkpoint: str | None = None, strong: bool = False) -> bytearray:
        self.check_stored([ref], checkpoint=checkpoint)  # before allocating what the record says
        out = bytearray(ref.size)
        self.read_into([(ref, out)], checkpoint=checkpoint, strong=strong)
        return out

    def _read_verified(self, ref: BlobRef, out: memoryview, files: "_PackFiles", checkpoint: str | None,
                       strong: bool = False) -> None:
        try:
            self._read_at(ref, out, files, strong=strong)
            return
        except CorruptCheckpointError as first:
            found = self.index.lookup(ref.digest)
            if found is None or (found.pack, found.offset) == (ref.pack, ref.offset):
                raise _named(first, checkpoint) from None
            try:
                self._read_at(found, out, files, strong=strong)
            except CorruptCheckpointError:
                raise _named(first, checkpoint) from None

    def _read_at(self, ref: BlobRef, out: memoryview, files: "_PackFiles", *, check: bool = True,
                 strong: bool = False) -> None:
        path = self.layout.pack(ref.pack)
        _within(ref, path, files.size(path))  # before allocating what the record says
        base_ref = None
        if ref.encoding == "raw":
            files.read(path, ref.offset, out)
        else:
            stored = bytearray(ref.nbytes)
            files.read(path, ref.offset, memoryview(stored))
            base = None
            if ref.base is not None:
                base_ref = ref.base if ref.base.offset >= 0 else self.index.lookup(ref.base.digest)
                if base_ref is None:
                    raise CorruptCheckpointError(f"the delta base {ref.base.digest} of a blob in {path} is missing "
                                                 "from the store", path=path)
                if base_ref.size != ref.size:
                    raise CorruptCheckpointError(f"the delta base of a blob in {path} holds {base_ref.size} bytes, "
                                                 f"the delta {ref.size}", path=path)
                base = bytearray(base_ref.size)
                # Decoded without its own check: the final digest covers the base too, and only a
                # failure pays for finding out which of the two files is damaged.
                try:
                    self._read_at(base_ref, memoryview(base), files, check=False)
                except CorruptCheckpointError as exc:
                    raise CorruptCheckpointError(f"the delta base of a blob in {path} is damaged: {exc}",
                                                 path=exc.path) from None
            try:
                _encoding.decode(stored, itemsize=ref.itemsize, encoding=ref.encoding, raw_nbytes=ref.size,
                                 base=base, out=out)
            except ValueError as exc:
                raise CorruptCheckpointError(f"pack {path} holds a damaged {ref.encoding} blob at offset "
                                             f"{ref.offset} ({exc})", path=path) from None
        if check:
            self._check(ref, out, path, base_ref, files, strong)

    def _check(self, ref: BlobRef, out: memoryview, path: Path, base_ref: "BlobRef | None",
               files: "_PackFiles", strong: bool) -> None:
        fast = self._fast if ref.check and not strong else None
        if fast is not None and ref.check.startswith("xxh3-128:"):
            if fast(out) == ref.check:
                return
        else:
            algorithm = ref.digest.split(":", 1)[0]
            if algorithm not in _HASHERS:
                raise CorruptCheckpointError(f"unknown digest algorithm {algorithm!r} for a blob in {path}; "
                                             "upgrade weightslab", path=path)
            if _digest(out, algorithm) == ref.digest:
                return
        if base_ref is not None:  # name the damaged file: the delta's base, or the delta itself
            try:
                self._read_verified(base_ref, memoryview(bytearray(base_ref.size)), files, None, strong)
            except CorruptCheckpointError as exc:
                raise CorruptCheckpointError(f"the delta base of a blob in {path} is damaged: {exc}",
                                             path=exc.path) from None
        raise CorruptCheckpointError(f"pack {path} is corrupt: the blob at offset {ref.offset} does not "
                                     f"match its digest {ref.digest}", path=path)

    # --- checking sizes and verifying, in bounded memory ---------------------------------------
    def check_stored(self, refs: Iterable[BlobRef], *, checkpoint: str | None = None, frames: bool = True,
                     missing_ok: bool = False) -> None:
        """Check, before a buffer is allocated for them, that each blob (and each delta base it
        needs) has a stored copy that holds what its record says: the recorded location when its
        pack is there (the pack's real size must cover ``offset + nbytes``), else the copy the index
        knows of its digest, of the same size and encoding. With ``frames``, an encoded blob's
        zstd frame must record its raw size and have blocks that can hold it (only its headers are
        read). So a manifest cannot make a reader allocate more than the packs can give back.

        A blob found nowhere raises too, unless ``missing_ok`` (the read reports it missing; a
        remote root's packs may not be fetched yet). Raises :class:`CorruptCheckpointError`
        naming the pack (and ``checkpoint``).
        """
        with _PackFiles(self.layout) as files:
            for ref in refs:
                for link in ref.chain():
                    self._check_copy(link, files, frames=frames, missing_ok=missing_ok, checkpoint=checkpoint)

    def _check_copy(self, ref: BlobRef, files: "_PackFiles", *, frames: bool, missing_ok: bool,
                    checkpoint: str | None) -> None:
        try:
            self._check_at(ref, files, frames)
            return
        except CorruptCheckpointError as exc:
            first = exc
        missing = files.size(self.layout.pack(ref.pack)) is None
        found = self.index.lookup(ref.digest, rescan=not missing_ok)
        if found is None:
            if missing and missing_ok:
                return
            raise _named(first, checkpoint) from None
        if (found.nbytes, found.size, found.encoding) != (ref.nbytes, ref.size, ref.encoding):
            raise _named(CorruptCheckpointError(
                f"{first}; the store's copy of blob {ref.digest} ({found.nbytes:,} bytes stored, {found.size:,} raw, "
                f"{found.encoding}) is not what the record says ({ref.nbytes:,} stored, {ref.size:,} raw, "
                f"{ref.encoding})", path=first.path), checkpoint) from None
        try:
            self._check_at(found, files, frames)
        except CorruptCheckpointError:
            raise _named(first, checkpoint) from None

    def _check_at(self, ref: BlobRef, files: "_PackFiles", frames: bool) -> None:
        path = self.layout.pack(ref.pack)
        _within(ref, path, files.size(path))
        if frames and ref.encoding != "raw" and ref.size > _PLAIN_EXPANSION * ref.nbytes + (1 << 20):
            try:
                _encoding.check_frame(lambda at, count: files.pread(path, ref.offset + at, count), ref.nbytes,
                                      ref.size)
            except ValueError as exc:
                raise CorruptCheckpointError(f"pack {path} holds a damaged {ref.encoding} blob at offset "
                                             f"{ref.offset} ({exc})", path=path) from None

    def verify_blob(self, ref: BlobRef, *, checkpoint: str | None = None) -> None:
        """Check one blob against its SHA-256 digest (never the fast checksum), in bounded memory
        whatever its record says: a raw blob is hashed :data:`VERIFY_CHUNK` bytes at a time; an
        encoded one is decoded whole, once its stored size was checked against its pack and its
        raw size against its zstd frame. As a read, a failing location is looked up again by
        digest. Raises :class:`CorruptCheckpointError` naming the pack (and ``checkpoint``)."""
        self.check_stored([ref], checkpoint=checkpoint)
        if ref.encoding != "raw" or ref.size <= VERIFY_CHUNK:
            self.read_into([(ref, bytearray(ref.size))], checkpoint=checkpoint, strong=True)
            return
        with _PackFiles(self.layout) as files:
            try:
                self._hash_at(ref, files)
                return
            except CorruptCheckpointError as exc:
                first = exc
            found = self.index.lookup(ref.digest)
            if found is None or (found.pack, found.offset) == (ref.pack, ref.offset) or found.encoding != "raw":
                raise _named(first, checkpoint) from None
            try:
                self._hash_at(found, files)
            except CorruptCheckpointError:
                raise _named(first, checkpoint) from None

    def _hash_at(self, ref: BlobRef, files: "_PackFiles") -> None:
        path = self.layout.pack(ref.pack)
        _within(ref, path, files.size(path))
        hasher = _HASHERS[DIGEST_ALGORITHM]()
        buffer = memoryview(bytearray(min(VERIFY_CHUNK, ref.nbytes)))
        done = 0
        while done < ref.nbytes:
            chunk = buffer[:min(buffer.nbytes, ref.nbytes - done)]
            files.read(path, ref.offset + done, chunk)
            hasher.update(chunk)  # (releases the GIL on large buffers)
            done += chunk.nbytes
        if f"{DIGEST_ALGORITHM}:{hasher.hexdigest()}" != ref.digest:
            raise CorruptCheckpointError(f"pack {path} is corrupt: the blob at offset {ref.offset} does not "
                                         f"match its digest {ref.digest}", path=path)

    # --- maintenance ------------------------------------------------------------------------
    def packs(self) -> list[PackInfo]:
        return self.index.packs()

    def delete_pack(self, info: PackInfo) -> None:
        if not self.layout.contains(info.path):  # (garbage collection checks first; never through a link)
            raise WeightslabError(f"not deleting {info.path}: it is reached through a symbolic link out of the "
                                  f"root {self.layout.root}")
        remove(info.path)
        fsync_dir(info.path.parent)
        self.index.forget_pack(info.pack)

    def repack(self, info: PackInfo, keep: set[str]) -> str | None:
        """Copy the blobs of ``info`` whose digest is in ``keep`` (as stored, no re-encoding) into a
        new pack, then delete the old one. Returns the new pack id (None if nothing was kept)."""
        kept = [b for b in info.blobs if b.digest in keep]
        if not kept:
            self.delete_pack(info)
            return None
        header, _ = read_pack_header(info.path)
        meta = json.loads((header.get("__metadata__") or {}).get("encodings", "{}"))
        new = []
        with _PackFiles(self.layout) as files:
            for ref in kept:
                data = bytearray(ref.nbytes)
                files.read(info.path, ref.offset, memoryview(data))
                name = _hex(ref.digest)
                extra = meta.get(name) or {}
                if ref.encoding == "raw" and _digest(data) != ref.digest:
                    raise CorruptCheckpointError(f"pack {info.path} is corrupt; not repacking it", path=info.path)
                new.append(_Stored(ref.digest, extra.get("dtype", header[name]["dtype"]),
                                   tuple(extra.get("shape", header[name]["shape"])), data, ref.encoding, ref.size,
                                   ref.itemsize, ref.base, ref.check))
        refs = self._write_pack(new)
        new_pack = next(iter(refs.values())).pack
        if new_pack != info.pack:
            self.delete_pack(info)
        return new_pack


def _within(ref: BlobRef, path: Path, size: int | None) -> None:
    """CorruptCheckpointError unless the pack at ``path`` (``size`` bytes; None: missing) holds
    the stored bytes ``ref`` records."""
    if size is None:
        raise CorruptCheckpointError(f"pack {path} is missing", path=path)
    if ref.offset + ref.nbytes > size:
        raise CorruptCheckpointError(f"pack {path} is truncated: expected {ref.nbytes} bytes at offset {ref.offset}, "
                                     f"found {max(0, size - ref.offset)} (the pack holds {size:,} bytes), or the "
                                     f"record of blob {ref.digest} is wrong", path=path)


def _named(exc: CorruptCheckpointError, checkpoint: str | None) -> CorruptCheckpointError:
    if not checkpoint:
        return exc
    return CorruptCheckpointError(f"{exc} (checkpoint {checkpoint}). Resume an earlier checkpoint, or run "
                                  "wl.verify() to list every damaged one.", path=exc.path, checkpoint=checkpoint)


class _PackFiles:
    """Open pack files for one batch of reads (a checkpoint reads many blobs from few packs).

    Reads are positional (``os.preadv``), so several threads can share one descriptor.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self._fds: dict[Path, int] = {}
        self._sizes: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "_PackFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                except FileNotFoundError:
                    raise CorruptCheckpointError(f"pack {path} is missing", path=path) from None
                except OSError as exc:
                    raise CorruptCheckpointError(f"pack {path} cannot be read ({exc})", path=path) from None
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    raise CorruptCheckpointError(f"pack {path} is not a regular file", path=path)
                self._fds[path] = fd
                self._sizes[path] = st.st_size
            return fd

    def size(self, path: Path) -> int | None:
        """The real size of the pack file at ``path`` (None if there is none), as opened."""
        try:
            self._fd(path)
        except CorruptCheckpointError:
            if os.path.lexists(path):
                raise
            return None
        return self._sizes[path]

    def pread(self, path: Path, offset: int, count: int) -> bytes:
        out = memoryview(bytearray(count))
        self.read(path, offset, out)
        return bytes(out)

    def read(self, path: Path, offset: int, out: memoryview) -> None:
        fd = self._fd(path)
        got = 0
        while got < out.nbytes:
            try:
                if hasattr(os, "preadv"):
                    n = os.preadv(fd, [out[got:]], offset + got)
                else:  # pragma: no cover - platforms without preadv
                    data = os.pread(fd, out.nbytes - got, offset + got)
                    n = len(data)
                    out[got:got + n] = data
            except (OSError, OverflowError) as exc:  # an I/O error, an offset no file has
                raise CorruptCheckpointError(f"pack {path} cannot be read at offset {offset + got} ({exc})",
                                             path=path) from None
            if not n:
                break
            got += n
        if got != out.nbytes:
            raise CorruptCheckpointError(f"pack {path} is truncated: expected {out.nbytes} bytes at offset "
                                         f"{offset}, found {got}", path=path)
