"""The job a process trains in, and every collective the checkpoint system runs between its ranks.

A single process is a job of one: every question below has its obvious answer and nothing is sent.
In a torch.distributed job of several ranks, the ranks must take every checkpoint decision together,
or one rank waits forever at a save the others skip. The protocol, all on the training thread at step
boundaries that every rank reaches in the same order (on :class:`~weightslab.distributed.world.World`'s own gloo
group):

- at every boundary, one all-reduce (:meth:`Job.agree`): a flag per save reason, the pending
  preemption signal, and whether rank 0 holds an edit of a watched config file: every rank saves
  for the union of reasons, stops with any rank's signal, and applies rank 0's edits next boundary;
- before a save, an all_gather of a small header (:meth:`Job.exchange_own`): every rank captured
  its state for the same step of the same experiment, or no rank goes on; then each rank's own state
  (random generators, loader positions, custom state) travels to rank 0, which writes the one manifest;
- rank 0's config edits, and a fork's branch name, are broadcast (:meth:`Job.share`);
- a resume checks that every rank found the same checkpoint (:meth:`Job.agree_on_checkpoint`);
- before a preempted job stops, a barrier (:meth:`Job.barrier_before_stop`): no rank exits (and
  makes the launcher kill the others) before rank 0's final commit is durable.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointNotFoundError, CheckpointSaveError
from ..triggers import REASONS
from .world import World, digest64

__all__ = ["Job", "Agreement", "Exchange"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Agreement:
    """What every rank decided together at one step boundary."""

    reasons: tuple[str, ...]  # save for these (none: no save)
    signal: int | None  # a preemption signal some rank received
    edits: bool  # rank 0's config edits are applied by every rank at the next boundary


@dataclass(frozen=True)
class Exchange:
    """What a save's exchange gave this rank: the other ranks' own state (on rank 0; empty on the
    others, and in a single process), rank 0's token naming the directory of sharded tensors, and
    whether rank 0 skips the save (its writer is behind, with ``backpressure="skip"``)."""

    others: tuple[bytes, ...]
    token: int
    skip: bool


class Job:
    """This process's job: a single process until a torch.distributed group of several ranks exists."""

    def __init__(self) -> None:
        self._world: World | None = None

    @property
    def world(self) -> World | None:
        """The torch.distributed job this process is a rank of; None for a single process. Looked
        up until a group exists (a script may initialize it after the system started)."""
        if self._world is None:
            self._world = World.current()
            if self._world is not None:
                log.info("torch.distributed job of %d ranks (this is rank %d): rank 0 writes the replicated state "
                         "once; every rank's random generators, loader positions and custom state go into the same "
                         "checkpoint", self._world.size, self._world.rank)
        return self._world

    @property
    def rank(self) -> int:
        world = self.world
        return world.rank if world is not None else 0

    @property
    def size(self) -> int:
        world = self.world
        return world.size if world is not None else 1

    @property
    def writes(self) -> bool:
        """Whether this process writes checkpoints: in a torch.distributed job, rank 0 only (it
        gathers the others' own state into one manifest: one writer, one commit)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world is not None

    @property
    def gone(self) -> bool:
        """The job's process group was destroyed (a script may do that before it exits)."""
        return self._world is not None and not self._world.alive

    @property
    def group(self) -> Any:
        """The process group weightslab's collectives (and sharded saves) run on; None alone."""
        world = self.world
        return world.group if world is not None else None

    # --- at every step boundary -----------------------------------------------------------
    def agree(self, reasons: tuple[str, ...], *, signal: int | None, edits: bool) -> Agreement:
        """Make every rank's decision at this boundary the same, with one all-reduce of a few
        integers (the element-wise maximum: a flag set on any rank is set on all)."""
        world = self.world
        if world is None:
            return Agreement(reasons, signal, edits)
        flags = [int(r in reasons) for r in REASONS] + [signal or 0, int(edits)]
        *bits, signum, shared = world.agree(flags)
        return Agreement(tuple(r for r, bit in zip(REASONS, bits) if bit), signum or None, bool(shared))

    def share(self, payload: bytes | None) -> bytes:
        """Rank 0's ``payload`` on every rank (the others pass None; alone: the payload itself)."""
        world = self.world
        if world is None:
            return payload or b""
        return world.broadcast_bytes(payload if world.rank == 0 else None)

    # --- at a save ------------------------------------------------------------------------
    def exchange_own(self, *, experiment: str, step: int, payload: bytes, error: BaseException | None,
                     sharded: int, skip: bool) -> Exchange:
        """Every rank's own state (``payload``: a rank's random generators, loader positions and
        custom state), on rank 0.

        All ranks first exchange (captured?, step, experiment, size, number of sharded tensors,
        rank 0's token and ``skip``): unless every rank captured its state for the same step of the
        same experiment, every rank raises, saying why; otherwise the payloads move to rank 0.
        Alone: raises ``error`` if there is one, else nothing moves.
        """
        token = uuid.uuid4().int >> 65  # 63 bits: fits an int64
        world = self.world
        if world is None:
            if error is not None:
                raise error
            return Exchange((), token, skip)
        headers = world.all_gather([int(error is None), step, digest64(experiment), len(payload), sharded, token,
                                    int(skip)])
        problems = [f"rank {r} could not capture its state" for r, h in enumerate(headers) if not h[0]]
        if not problems and len({(h[1], h[2], h[4]) for h in headers}) > 1:
            problems.append("the ranks are at different steps or experiments, or hold different sharded tensors ("
                            + ", ".join(f"rank {r}: step {h[1]}, {h[4]} sharded tensors" for r, h in enumerate(headers))
                            + "); every rank must run the same loop and register the same objects")
        if problems:
            raise error or CheckpointSaveError("; ".join(problems))
        if headers[0][6]:
            return Exchange((), headers[0][5], True)
        payloads = world.gather_bytes(payload, [h[3] for h in headers])
        return Exchange(tuple(payloads[1:]) if payloads is not None else (), headers[0][5], False)

    # --- at a resume ----------------------------------------------------------------------
    def agree_on_checkpoint(self, what: str, found: str | None, error: BaseException | None) -> None:
        """Every rank found the same checkpoint (``found``: its ref, None for nothing) for the ref
        ``what``, or every rank raises: a rank's own ``error`` on that rank, a
        :class:`CheckpointNotFoundError` naming the failed or disagreeing ranks on the others."""
        world = self.world
        if world is None:
            if error is not None:
                raise error
            return
        mine = found if found is not None else ("<error>" if error is not None else "<nothing>")
        views = world.all_gather([digest64(mine), int(error is not None)])
        if error is not None:
            raise error
        failed = [r for r, v in enumerate(views) if v[1]]
        if failed:
            raise CheckpointNotFoundError(f"resume of {what!r}: rank(s) {failed} could not read the checkpoint "
                                          "(their error is in their log); no rank restored anything")
        if len({v[0] for v in views}) > 1:
            raise CheckpointNotFoundError(
                f"resume of {what!r}: the ranks found different checkpoints (this is rank {world.rank}, which "
                f"found {mine}); every rank must see the same root, such as a shared filesystem or a remote URL")

    # --- before stopping ------------------------------------------------------------------
    def barrier_before_stop(self) -> None:
        """No rank stops (and makes a launcher kill the others) before rank 0's commit is durable."""
        world = self._world
        if world is not None and world.alive:
            try:
                world.barrier()
            except Exception as exc:  # noqa: BLE001 - stopping anyway; say why the others may not wait
                log.warning("could not wait for the other ranks before stopping: %s: %s", type(exc).__name__, exc)

