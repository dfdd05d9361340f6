"""Where the data is: resuming a data loader mid-epoch, exactly, without replaying batches.

A resumed run is only exact if it sees the same batches in the same order as the uninterrupted
one. Three things decide that: the order of the indices (the sampler's permutation of this epoch),
how far into the epoch the training loop got, and the random seed the loader's workers were given.
Replaying the skipped batches to get back there costs hours on a large dataset; this module makes
all three part of the checkpoint and restores them in O(1):

* :class:`ResumableSampler` draws each epoch's permutation from ``(seed, epoch)`` alone, and can
  start an epoch at any position (it is rank-aware for distributed training);
* :func:`make_resumable` (called by ``wl.register_dataloader``) gives a plain ``DataLoader`` such a
  sampler in place of its ``RandomSampler`` / ``SequentialSampler``, gives it its own random
  generator (so starting an epoch never draws from the global generator, which would shift every
  random draw after a resume), and counts the batches the training loop actually received (with
  ``num_workers > 0`` the loader fetches ahead: the sampler's own position is not the loop's).

Loaders and samplers with their own ``state_dict()`` / ``load_state_dict()`` (torchdata's
``StatefulDataLoader``, for instance) are used as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sized

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from .distributed.world import World

__all__ = ["ResumableSampler", "DataProgress", "make_resumable", "undo_resumable", "progress", "loader_state",
           "restore_loader", "sampler_seed", "set_sampler_seed"]

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """A seeded, epoch-aware, distributed-aware sampler whose position is saved and restored in O(1).

    Each epoch's order is a permutation drawn from ``seed + epoch`` (or the identity without
    ``shuffle``); with ``world_size > 1`` the order is padded to a multiple of the world size (or
    truncated with ``drop_last``) and rank ``r`` takes every ``world_size``-th index from ``r``,
    as ``DistributedSampler`` does. ``set_epoch(e)`` selects the epoch; ``state_dict()`` records the
    epoch and how many indices of it were yielded; after ``load_state_dict()`` the next iteration
    continues from there.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False):
        self.size = data_source if isinstance(data_source, int) else len(data_source)
        if rank is None or world_size is None:
            world = World.current()  # (None alone, or in a job of one rank)
            world_size = world_size if world_size is not None else (world.size if world is not None else 1)
            rank = rank if rank is not None else (world.rank if world is not None else 0)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.shuffle, self.seed, self.rank, self.world_size, self.drop_last = shuffle, int(seed), rank, world_size, drop_last
        self.epoch = 0
        self.start = 0  # indices of this epoch to skip at the next iteration
        self.yielded = 0  # indices of the current epoch yielded so far

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.world_size
        return -(-self.size // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.size, generator=g).tolist()
        else:
            indices = list(range(self.size))
        total = len(self) * self.world_size
        if total > len(indices):  # pad by repeating from the start, as DistributedSampler does
            indices += (indices * (total // max(len(indices), 1) + 1))[: total - len(indices)]
        return indices[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.order()
        start, self.start = self.start, 0
        self.yielded = start
        for index in indices[start:]:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.yielded, "seed": self.seed, "shuffle": self.shuffle,
                "size": self.size, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"the saved sampler covered {state['size']} samples, this dataset has {self.size}; "
                             "a resume needs the same dataset")
        position = reshard(int(state["position"]), int(state.get("world_size", self.world_size)), self.world_size,
                           what="the sampler position")
        self.epoch, self.start, self.seed = int(state["epoch"]), position, int(state["seed"])
        self.yielded = self.start


def reshard(position: int, saved_world: int, world: int, *, what: str, unit: int = 1) -> int:
    """A per-rank position in an epoch saved by ``saved_world`` ranks, for ``world`` ranks.

    Ranks of a data-parallel job consume the epoch's order in step, rank r taking every
    ``world``-th index, so ``position * saved_world`` indices of the order were consumed; each new
    rank continues at that point of the order, ``unit`` (samples per batch) at a time. When the
    point does not fall on a boundary of the new world size it is moved back to one, and the samples
    in between are seen twice, with a warning: every rank must start at the same position, or the
    ranks would run different numbers of steps.
    """
    if saved_world == world:
        return position
    consumed = position * saved_world * unit
    new = consumed // (world * unit)
    repeated = consumed - new * world * unit
    log.warning("%s was saved by %d ranks and is resumed by %d: each rank continues at position %d of its shard "
                "(was %d)%s", what, saved_world, world, new, position,
                f"; {repeated} samples of this epoch are seen twice" if repeated else "")
    return new


@dataclass
class DataProgress:
    """How far the training loop is through a registered loader."""

    epoch: int  # epochs started (0 for the first), as counted by iterations over the loader
    batches: int  # batches of that epoch the loop received


class _Tracker:
    """What :func:`make_resumable` adds to a loader: its progress and the state to resume it."""

    def __init__(self, loader: DataLoader, sampler: ResumableSampler | None, original_class: type,
                 original: Mapping[str, Any]):
        self.sampler = sampler
        self.original_class = original_class
        self.original = dict(original)  # attributes to put back at undo
        self.epoch = -1  # no iteration yet
        self.batches = 0
        self.generator_at_epoch_start: torch.Tensor | None = None
        self.resume: tuple[int, int, torch.Tensor | None] | None = None  # (epoch, batches, generator)

    def begin(self, loader: DataLoader) -> None:
        """A new iteration over the loader: the next epoch, or the rest of a resumed one."""
        if self.resume is not None:
            epoch, batches, generator = self.resume
            self.resume = None
            if generator is not None:
                loader.generator.set_state(generator)
        else:
            epoch, batches = self.epoch + 1, 0
        self.epoch, self.batches = epoch, batches
        self.generator_at_epoch_start = loader.generator.get_state() if loader.generator is not None else None
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.start = batches * _samples_per_batch(loader)

    def state(self, loader: DataLoader) -> dict[str, Any]:
        if self.resume is not None:  # restored, not iterated yet: still where the checkpoint was
            epoch, batches, generator = self.resume
        else:
            epoch, batches, generator = self.epoch, self.batches, self.generator_at_epoch_start
        return {"kind": "weightslab.loader", "epoch": epoch, "batches": batches,
                "generator": generator,  # to start this epoch again, mid-way
                "generator_now": loader.generator.get_state() if loader.generator is not None else None,
                "seed": self.sampler.seed if self.sampler is not None else None,
                "world_size": self.sampler.world_size if self.sampler is not None else None}


def _samples_per_batch(loader: DataLoader) -> int:
    if loader.batch_size is not None:
        return loader.batch_size
    batch_sampler = loader.batch_sampler
    return int(getattr(batch_sampler, "batch_size", 1) or 1)  # DataLoader(batch_sampler=...): batch_size is None


def _resumable_class(cls: type) -> type:
    """A subclass of the loader's own class whose iteration is counted."""

    def __iter__(self: DataLoader) -> Iterator[Any]:
        tracker: _Tracker = self.__dict__["_weightslab_tracker"]
        tracker.begin(self)
        for batch in cls.__iter__(self):
            tracker.batches += 1
            yield batch

    return type(f"Resumable{cls.__name__}", (cls,), {"__iter__": __iter__, "__module__": cls.__module__})


def make_resumable(loader: Any, *, name: str = "main") -> str | None:
    """Make a registered loader's position part of the checkpoint, if it is not already.

    Returns None when the loader is (now) resumable, else the reason it is not, for a warning.
    """
    if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
        return None  # a stateful loader: its own state_dict is used
    if not isinstance(loader, DataLoader):
        return (f"dataloader {name!r} is a {type(loader).__name__}, neither a torch DataLoader nor an object with "
                "state_dict()/load_state_dict(); its position is not saved")
    if "_weightslab_tracker" in loader.__dict__:
        return None
    if isinstance(loader.dataset, IterableDataset):
        return (f"dataloader {name!r} reads an IterableDataset, whose position only the dataset itself can know; "
                "give the dataset state_dict()/load_state_dict() and register it with wl.register_state, or use "
                "a map-style dataset")
    index_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    inner = index_sampler.sampler if isinstance(index_sampler, BatchSampler) else index_sampler
    sampler: ResumableSampler | None = None
    original: dict[str, Any] = {"generator": loader.generator}
    if isinstance(inner, ResumableSampler):
        sampler = inner
    elif type(inner) in (RandomSampler, SequentialSampler) and not (
            isinstance(inner, RandomSampler) and (inner.replacement or inner._num_samples is not None)):
        # The user's generator, if they gave one, decides the order, as it did before registration.
        seed = loader.generator.initial_seed() if loader.generator is not None else torch.initial_seed()
        sampler = ResumableSampler(len(loader.dataset), shuffle=isinstance(inner, RandomSampler), seed=seed)
        original["sampler"] = loader.sampler
        if isinstance(index_sampler, BatchSampler):
            original["batch_sampler_sampler"] = index_sampler.sampler
            index_sampler.sampler = sampler
        # DataLoader refuses to have its sampler set after construction; the batch sampler above
        # is what it iterates, and this keeps loader.sampler truthful.
        object.__setattr__(loader, "sampler", sampler)
    elif callable(getattr(inner, "state_dict", None)):
        sampler = None  # a stateful custom sampler: saved through its own state_dict
    else:
        return (f"dataloader {name!r} uses a {type(inner).__name__} sampler, which has no state_dict(); its "
                "position is not saved, so a resumed run restarts the epoch. Use weightslab.data.ResumableSampler "
                "(or give the sampler state_dict()/load_state_dict())")
    if loader.generator is None:
        # Starting an epoch draws the workers' base seed from this generator, not the global one.
        loader.generator = torch.Generator()
        loader.generator.manual_seed(torch.initial_seed())
    tracker = _Tracker(loader, sampler, type(loader), original)
    loader.__dict__["_weightslab_tracker"] = tracker
    loader.__class__ = _resumable_class(type(loader))
    return None


def undo_resumable(loader: Any) -> None:
    """Give a loader back its original class, sampler and generator (at unregister)."""
    tracker = getattr(loader, "__dict__", {}).pop("_weightslab_tracker", None)
    if tracker is None:
        return
    loader.__class__ = tracker.original_class
    if "sampler" in tracker.original:
        object.__setattr__(loader, "sampler", tracker.original["sampler"])
    if "batch_sampler_sampler" in tracker.original:
        loader.batch_sampler.sampler = tracker.original["batch_sampler_sampler"]
    loader.generator = tracker.original["generator"]


def progress(loader: Any) -> DataProgress:
    """How far the loop is through a loader registered with ``wl.register_dataloader``.

    After a resume, before the first iteration, this is where the next iteration continues.
    """
    tracker = getattr(loader, "__dict__", {}).get("_weightslab_tracker")
    if tracker is None:
        raise ValueError("this loader is not tracked by weightslab; register it with wl.register_dataloader")
    if tracker.resume is not None:
        return DataProgress(epoch=tracker.resume[0], batches=tracker.resume[1])
    return DataProgress(epoch=max(tracker.epoch, 0), batches=tracker.batches)


def loader_state(loader: Any) -> Any:
    """The state to save for a registered loader (None if it cannot be saved)."""
    tracker = getattr(loader, "__dict__", {}).get("_weightslab_tracker")
    if tracker is not None:
        state = tracker.state(loader)
        if tracker.sampler is None:  # a custom stateful sampler
            inner = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.sampler
            state["sampler"] = inner.state_dict()
        return state
    state_dict = getattr(loader, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def restore_loader(loader: Any, state: Any) -> bool:
    """Put a saved position back; the next iteration over the loader continues from it."""
    tracker = getattr(loader, "__dict__", {}).get("_weightslab_tracker")
    if tracker is not None and isinstance(state, Mapping) and state.get("kind") == "weightslab.loader":
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if tracker.sampler is not None and state.get("world_size") is not None:
            batches = reshard(batches, int(state["world_size"]), tracker.sampler.world_size,
                              what="the position of a registered data loader", unit=_samples_per_batch(loader))
        if tracker.sampler is not None and state.get("seed") is not None:
            tracker.sampler.seed = int(state["seed"])  # the saved run's permutations, whatever seeds this one
        if tracker.sampler is None and "sampler" in state:  # a custom stateful sampler
            inner = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.sampler
            inner.load_state_dict(state["sampler"])
        if epoch < 0:  # saved before the first iteration
            tracker.epoch, tracker.batches, tracker.resume = -1, 0, None
            return True
        if batches >= len(loader):  # the epoch was complete: the next iteration starts the next one
            tracker.epoch, tracker.batches, tracker.resume = epoch, batches, None
            if state.get("generator_now") is not None and loader.generator is not None:
                loader.generator.set_state(state["generator_now"])
            return True
        tracker.resume = (epoch, batches, state.get("generator"))
        return True
    load = getattr(loader, "load_state_dict", None)
    if callable(load) and state is not None:
        load(state)
        return True
    return False


def sampler_seed(sampler: Any) -> int | None:
    """The seed a sampler draws every epoch's order from (``ResumableSampler.seed``,
    ``DistributedSampler.seed``, Accelerate's ``SeedableRandomSampler.initial_seed``), or None."""
    for attr in ("initial_seed", "seed"):
        value = getattr(sampler, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def set_sampler_seed(sampler: Any, seed: int) -> None:
    """Give a sampler the seed of a saved run, so that every epoch draws the saved run's order."""
    for attr in ("initial_seed", "seed"):
        if isinstance(getattr(sampler, attr, None), int):
            setattr(sampler, attr, seed)
            return
