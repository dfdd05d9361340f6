"""A consistent copy of the tensors of a checkpoint, taken on the training thread, of what changed.

Training goes on mutating its tensors the moment a save returns, so the background writer must
work on a copy. Copying (and later hashing) every tensor at every save is the cost that makes
checkpoints expensive, and most of it is wasted on tensors that did not change: frozen layers,
buffers, the optimizer state of frozen parameters. The :class:`Snapshotter` remembers, for each
tensor it stored, a cheap signal of its identity and content -- the same live tensor object, its
version counter (which every in-place operation bumps), its data pointer and layout -- and the blob
the writer stored it in. When the signal still holds, the new checkpoint reuses that blob and
nothing is copied, hashed or written.

The signal is never trusted blindly. Writes through ``tensor.data`` or a numpy view do not bump
the version counter, so every reused tensor is also checked against a sample of its bytes taken
when it was stored, and every ``full_check_every``-th save copies and hashes everything: a tensor
that changed behind its version counter is then caught, reported once, and copied at every save
from then on.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from .tensors import blob_of, dtype_tag

if TYPE_CHECKING:
    from .storage.store import Blob, BlobRef

__all__ = ["take", "copies_done", "BufferPool", "Snapshot", "Snapshotter", "Signal", "Slot"]

log = logging.getLogger(__name__)

class BufferPool:
    """Host buffers reused from one snapshot to the next.

    A copy into memory the process touched before runs at memory speed (about 18 GB/s here); a
    copy into freshly allocated memory pays a page fault per 4 KiB page on the way (about 0.6 GB/s
    here, 30 times slower), so fresh buffers at every save were most of what a save cost the
    training loop. Buffers are leased to a snapshot and given back when the writer has stored it;
    they are pinned when the source is on a GPU, so the copy is asynchronous.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[tuple[int, ...], torch.dtype, bool], list[torch.Tensor]] = {}

    def lease(self, like: torch.Tensor) -> torch.Tensor:
        pinned = like.device.type == "cuda" and torch.cuda.is_available()
        key = (tuple(like.shape), like.dtype, pinned)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pinned)

    def give_back(self, buffers: Iterable[torch.Tensor]) -> None:
        with self._lock:
            for buffer in buffers:
                key = (tuple(buffer.shape), buffer.dtype, buffer.is_pinned())
                self._free.setdefault(key, []).append(buffer)

    @property
    def nbytes(self) -> int:
        """Bytes held by free buffers."""
        with self._lock:
            return sum(t.nbytes for free in self._free.values() for t in free)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def take(tensors: Mapping[str, torch.Tensor], pool: BufferPool | None = None) -> dict[str, torch.Tensor]:
    """Copy every tensor into a contiguous CPU tensor (leased from ``pool`` when given); aliases
    share one copy. Copies from a GPU are asynchronous: wait for :func:`copies_done` before
    reading them."""
    copies: dict[str, torch.Tensor] = {}
    by_identity: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], torch.Tensor] = {}
    for key, tensor in tensors.items():
        dtype_tag(tensor.dtype, key=key)  # fail before copying anything
        t = tensor.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.device.type != "meta" else None
        copy = by_identity.get(ident) if ident is not None else None
        if copy is None:
            copy = pool.lease(t) if pool is not None else torch.empty(t.shape, dtype=t.dtype, device="cpu")
            copy.copy_(t, non_blocking=copy.is_pinned())
            if ident is not None:
                by_identity[ident] = copy
        copies[key] = copy
    return copies


def copies_done(tensors: Mapping[str, torch.Tensor]) -> Any:
    """An event the writer waits on before reading copies made from a GPU (None if none were)."""
    if torch.cuda.is_available() and any(t.is_cuda for t in tensors.values()):
        event = torch.cuda.Event()
        event.record()  # after the non-blocking copies queued on the current stream
        return event
    return None


_SAMPLE = 16  # elements compared per reused tensor


def _layout(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A few elements spread over the tensor, as CPU bytes (compared bitwise, so NaN == NaN)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > _SAMPLE:  # a strided view: no gather kernel needed, works for every dtype
        flat = flat[:: n // _SAMPLE][:_SAMPLE]
    return flat.to("cpu", copy=True).contiguous().view(torch.uint8)


@dataclass
class Signal:
    """What was known about one tensor when it was copied."""

    tensor: weakref.ref
    version: int
    layout: tuple
    sample: torch.Tensor | None  # None until the copy is complete (asynchronous GPU copies)

    @classmethod
    def of(cls, live: torch.Tensor, copy: torch.Tensor | None) -> "Signal":
        return cls(weakref.ref(live), live._version, _layout(live), _sample(copy) if copy is not None else None)

    def holds_for(self, live: torch.Tensor) -> bool:
        return (self.sample is not None and self.tensor() is live and live._version == self.version
                and _layout(live) == self.layout and torch.equal(_sample(live), self.sample))


class Slot:
    """Where a copied tensor will be stored: filled by the writer when its save commits.

    The writer commits saves in order, so a later save that reuses this slot finds it filled
    (or failed) by the time the writer gets to it, even if it was taken before the commit.
    """

    __slots__ = ("ref", "failed")

    def __init__(self) -> None:
        self.ref: "BlobRef | None" = None
        self.failed = False


@dataclass
class Snapshot:
    """One checkpoint's tensors: fresh copies of what changed, stored blobs of what did not."""

    copies: dict[str, torch.Tensor] = field(default_factory=dict)
    slots: dict[str, Slot] = field(default_factory=dict)  # for the copies: filled at commit
    reused: dict[str, Slot] = field(default_factory=dict)  # unchanged tensors: the slot of their last copy
    expected: dict[str, Slot] = field(default_factory=dict)  # full check: what the signal vouched for
    meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)  # every key
    signals: dict[str, "Signal"] = field(default_factory=dict)  # for the copies
    ready: Any = None  # a CUDA event to wait for before reading copies made from a GPU

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def blobs(self) -> dict[str, "Blob"]:
        """The copies as the store takes them (their bytes, not copied again); GPU copies are
        waited for first. Called by the writer, off the training thread."""
        self.wait_ready()
        return {key: blob_of(key, tensor) for key, tensor in self.copies.items()}

    def entries(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every key of the checkpoint: its dtype name and shape."""
        return {key: (dtype_tag(dtype, key=key), shape) for key, (dtype, shape) in self.meta.items()}

    @property
    def copied_bytes(self) -> int:
        return sum(t.nbytes for t in self.copies.values())

    def reused_refs(self) -> dict[str, "BlobRef"]:
        """The stored blobs of the unchanged tensors (their saves must have committed)."""
        out = {}
        for key, slot in self.reused.items():
            if slot.ref is None:
                raise RuntimeError(f"tensor {key!r} was unchanged since a save that failed, so its bytes were "
                                   "never stored; the next checkpoint copies it again")
            out[key] = slot.ref
        return out


class Snapshotter:
    """Takes snapshots on the training thread; learns from the writer which blob holds what."""

    def __init__(self, *, full_check_every: int = 10):
        if full_check_every < 0:
            raise ValueError(f"full_check_every must be >= 0 (0: never), got {full_check_every}")
        self.full_check_every = full_check_every
        self.pool = BufferPool()
        self._lock = threading.Lock()
        self._known: dict[str, tuple[Signal, Slot]] = {}
        self._distrusted: set[str] = set()
        self._count = 0

    def take(self, tensors: Mapping[str, torch.Tensor]) -> Snapshot:
        """Copy what changed since it was last copied; reuse the stored blob of the rest."""
        self._count += 1
        full = self.full_check_every > 0 and self._count % self.full_check_every == 0
        snap = Snapshot()
        to_copy: dict[str, torch.Tensor] = {}
        with self._lock:
            known = dict(self._known)
            distrusted = set(self._distrusted)
        for key, tensor in tensors.items():
            snap.meta[key] = (tensor.dtype, tuple(tensor.shape))
            entry = known.get(key) if key not in distrusted else None
            if entry is not None and not entry[1].failed and entry[0].holds_for(tensor):
                if not full:
                    snap.reused[key] = entry[1]
                    continue
                snap.expected[key] = entry[1]  # a full check: copy anyway, compare digests at commit
            to_copy[key] = tensor
        snap.copies = take(to_copy, self.pool)
        snap.ready = copies_done(to_copy)
        snap.slots = {k: Slot() for k in to_copy}
        sync = snap.ready is None  # CPU copies are complete: sample them now; GPU ones at commit
        snap.signals = {k: Signal.of(to_copy[k], snap.copies[k] if sync else None) for k in to_copy}
        with self._lock:
            for key in to_copy:
                self._known[key] = (snap.signals[key], snap.slots[key])
        return snap

    def committed(self, snap: Snapshot, refs: Mapping[str, "BlobRef"]) -> None:
        """The writer stored ``snap``: fill the slots of its copies with where they went."""
        for key, signal in snap.signals.items():
            if signal.sample is None:  # copied from a GPU: the copy is complete now
                signal.sample = _sample(snap.copies[key])
        for key, slot in snap.slots.items():
            slot.ref = refs[key]
        for key, ref in refs.items():  # reused blobs the store found moved (gc rewrote their pack)
            if key in snap.reused and snap.reused[key].ref != ref:
                snap.reused[key].ref = ref
        with self._lock:
            for key, vouched in snap.expected.items():
                if vouched.ref is not None and vouched.ref.digest != refs[key].digest and key not in self._distrusted:
                    self._distrusted.add(key)
                    log.warning("tensor %r changed without its version counter moving (written through .data or "
                                "a numpy view?); weightslab copies it at every save from now on", key)

    def failed(self, snap: Snapshot) -> None:
        """``snap`` was not stored: saves that would reuse its copies must copy again."""
        with self._lock:
            for key, slot in snap.slots.items():
                slot.failed = True
                if key in self._known and self._known[key][1] is slot:
                    del self._known[key]

    def seed(self, tensors: Mapping[str, torch.Tensor], refs: Mapping[str, "BlobRef"]) -> None:
        """After a resume: the live tensors now hold exactly these stored blobs."""
        with self._lock:
            for key, ref in refs.items():
                live = tensors.get(key)
                if live is not None:
                    slot = Slot()
                    slot.ref = ref
                    self._known[key] = (Signal.of(live, live.detach()), slot)

    def release(self, snap: Snapshot) -> None:
        """The writer is done with ``snap``: its buffers serve the next snapshots."""
        self.pool.give_back({id(t): t for t in snap.copies.values()}.values())  # aliases once
        snap.copies = {}

    def forget(self) -> None:
        """Forget every stored blob (copy everything at the next save)."""
        with self._lock:
            self._known.clear()
