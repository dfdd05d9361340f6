"""The ranks of a torch.distributed job, and the few collectives weightslab runs between them.

A coordinated checkpoint needs every rank to take part at the same step boundary: they agree on
whether (and why) to save, then each rank's own state (random generators, loader position, custom
state) travels to rank 0, which writes the one manifest. Everything here runs on the training
thread, at step boundaries every rank reaches in the same order, on a gloo group of weightslab's
own: its tensors live on the CPU whatever backend trains the model (NCCL moves only GPU tensors),
and its collectives never interleave with the user's on the default group.

Nothing is pickled: values travel as int64 vectors and byte strings (``torch.uint8`` tensors).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

__all__ = ["World", "digest64"]


def digest64(text: str) -> int:
    """A signed 64-bit digest of ``text``: lets ranks compare strings (an experiment hash) in an
    int64 vector."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


class World:
    """This process's place in a torch.distributed job of more than one rank."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self._group: Any = None

    @staticmethod
    def current() -> "World | None":
        """The running job's world, or None without one (or with a single rank)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return World(dist.get_rank(), dist.get_world_size())
        return None

    @property
    def alive(self) -> bool:
        """Whether the process group still exists (a script may destroy it before exiting)."""
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized()

    @property
    def group(self) -> Any:
        # Created by every rank at its first collective: that is the same step boundary on all
        # ranks, as new_group itself requires.
        if self._group is None:
            dist = torch.distributed
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._group

    def agree(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of ``values`` over every rank (a flag set anywhere is set everywhere)."""
        vector = torch.tensor(list(values), dtype=torch.int64)
        torch.distributed.all_reduce(vector, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return vector.tolist()

    def all_gather(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (vectors of one length), in rank order, on every rank."""
        vector = torch.tensor(list(values), dtype=torch.int64)
        out = [torch.empty_like(vector) for _ in range(self.size)]
        torch.distributed.all_gather(out, vector, group=self.group)
        return [v.tolist() for v in out]

    def gather_bytes(self, payload: bytes, sizes: Sequence[int]) -> list[bytes] | None:
        """Every rank's ``payload`` on rank 0, in rank order (None on the other ranks); ``sizes``
        holds every rank's payload length, exchanged beforehand (see :meth:`all_gather`)."""
        buffer = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
        if payload:
            buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        dist = torch.distributed
        if self.rank == 0:
            out = [torch.empty_like(buffer) for _ in range(self.size)]
            dist.gather(buffer, out, dst=0, group=self.group)
            return [bytes(t[:n].numpy()) for t, n in zip(out, sizes)]
        dist.gather(buffer, None, dst=0, group=self.group)
        return None

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's ``payload`` on every rank (the others pass None)."""
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        dist = torch.distributed
        dist.broadcast(size, src=0, group=self.group)
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == 0 and payload:
            buffer[:] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if buffer.numel():
            dist.broadcast(buffer, src=0, group=self.group)
        return bytes(buffer.numpy())

    def barrier(self) -> None:
        self.agree([0])  # a tiny all-reduce: needs no device, unlike barrier() under NCCL
