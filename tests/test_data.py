"""weightslab.data: resuming data loaders mid-epoch, exactly (ResumableSampler, make_resumable & co).

Real DataLoaders throughout, with real worker processes where a test says so. An "uninterrupted"
reference is always a loader built identically (after the same ``torch.manual_seed``) and iterated
without a break.
"""

from __future__ import annotations

import collections
import itertools
import logging
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              Sampler)

import weightslab as wl
from weightslab import data
from weightslab.data import DataProgress, ResumableSampler

N = 22  # samples: with BATCH 4, six batches an epoch, the last one of 2
BATCH = 4
BATCHES = -(-N // BATCH)


# --- datasets, samplers and loaders used by the tests (module level: worker processes pickle them) -------

class IndexDataset(Dataset):
    """Sample i is (i, noise): noise is drawn from the torch generator of the process that loads it
    (in a worker, the one seeded from the loader's base seed)."""

    def __init__(self, n: int = N, noise: bool = True):
        self.n, self.noise = n, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(i), torch.rand(()) if self.noise else torch.zeros(())


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        return iter(range(8))


class PlainSampler(Sampler[int]):
    """A custom sampler without state_dict()."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(reversed(range(self.n)))

    def __len__(self) -> int:
        return self.n


class StatefulReverseSampler(Sampler[int]):
    """A custom sampler with its own state: the position in a fixed (reversed) order."""

    def __init__(self, n: int):
        self.n = n
        self.pos = 0
        self.loaded: list[dict[str, int]] = []

    def __iter__(self) -> Iterator[int]:
        order = list(reversed(range(self.n)))
        while self.pos < self.n:
            index = order[self.pos]
            self.pos += 1
            yield index
        self.pos = 0

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loaded.append(dict(state))
        self.pos = int(state["pos"])


class TinyStatefulLoader:
    """A loader that knows its own position (as torchdata's StatefulDataLoader does)."""

    def __init__(self, n: int = 6):
        self.n = n
        self.pos = 0
        self.loaded: list[dict[str, int]] = []

    def __iter__(self) -> Iterator[int]:
        while self.pos < self.n:
            self.pos += 1
            yield self.pos - 1
        self.pos = 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loaded.append(dict(state))
        self.pos = state["pos"]


class StatefulDataLoaderSubclass(DataLoader):
    def state_dict(self) -> dict[str, str]:
        return {"mine": "yes"}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.got = state


def build(*, seed: int = 0, shuffle: bool = True, resumable: bool = True, n: int = N, noise: bool = True,
          **kwargs: Any) -> DataLoader:
    """The loader every run of a test builds: seeded the same way, then made resumable."""
    torch.manual_seed(seed)
    loader = DataLoader(IndexDataset(n, noise), batch_size=BATCH, shuffle=shuffle, **kwargs)
    if resumable:
        assert data.make_resumable(loader, name="train") is None
    return loader


def take(loader: Any, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``for`` loop over the loader: all its batches, or the first n (then break)."""
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def indices(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    return [b[0].tolist() for b in batches]


def assert_same_batches(got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[torch.Tensor, torch.Tensor]],
                        *, noise: bool = False) -> None:
    """Equal index tensors batch by batch (and equal noise tensors with ``noise``)."""
    assert len(got) == len(want), (indices(got), indices(want))
    for g, w in zip(got, want):
        assert torch.equal(g[0], w[0]), (indices(got), indices(want))
        if noise:
            assert torch.equal(g[1], w[1])


def shutdown(*loaders: DataLoader) -> None:
    """Stop persistent workers (and their queue threads) now, not at garbage collection."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


# --- ResumableSampler ------------------------------------------------------------------------------------

def test_sampler_order_is_a_function_of_seed_and_epoch_only() -> None:
    a = ResumableSampler(10, seed=7)
    b = ResumableSampler(list(range(10)), seed=7)  # a sized data source works as its length
    epoch0 = list(a)
    assert sorted(epoch0) == list(range(10))
    assert list(b) == epoch0 and list(a) == epoch0  # same (seed, epoch): same order, again and again
    a.set_epoch(1)
    epoch1 = list(a)
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch0
    # history does not matter: a fresh sampler jumping to epoch 3 equals one that went through 0..2
    for e in (2, 3):
        a.set_epoch(e)
        walked = list(a)
    fresh = ResumableSampler(10, seed=7)
    fresh.set_epoch(3)
    assert list(fresh) == walked == fresh.order(3) == a.order()
    assert ResumableSampler(10, seed=8).order(0) != epoch0
    assert len({tuple(a.order(e)) for e in range(6)}) == 6


def test_sampler_without_shuffle_is_the_identity() -> None:
    s = ResumableSampler(7, shuffle=False, seed=3)
    assert list(s) == list(range(7))
    s.set_epoch(5)
    assert list(s) == list(range(7))


def test_sampler_len_and_set_epoch() -> None:
    assert len(ResumableSampler(10)) == 10
    assert len(ResumableSampler(10, rank=0, world_size=3)) == 4
    assert len(ResumableSampler(10, rank=2, world_size=3, drop_last=True)) == 3
    assert len(ResumableSampler(12, rank=1, world_size=3, drop_last=True)) == 4
    s = ResumableSampler(10)
    assert s.epoch == 0 and s.rank == 0 and s.world_size == 1  # not distributed: one rank
    s.set_epoch(4)
    assert s.epoch == 4 and s.state_dict()["epoch"] == 4
    assert len(list(s)) == 10


def test_sampler_state_resumes_mid_epoch_with_exactly_the_remaining_indices() -> None:
    s = ResumableSampler(10, seed=1)
    s.set_epoch(2)
    full = s.order()
    it = iter(s)
    head = list(itertools.islice(it, 4))
    assert head == full[:4]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4 and state["size"] == 10

    other = ResumableSampler(10, seed=999)  # the seed comes from the state
    other.load_state_dict(state)
    assert other.epoch == 2 and other.seed == 1
    other.set_epoch(2)  # selecting the same epoch keeps the loaded position
    assert list(other) == full[4:]
    assert head + full[4:] == full
    # the epoch after continues from its start
    other.set_epoch(3)
    assert list(other) == ResumableSampler(10, seed=1).order(3)
    # a loaded position belongs to its epoch: moving to another epoch before iterating drops it
    moved = ResumableSampler(10, seed=1)
    moved.load_state_dict(state)
    moved.set_epoch(3)
    assert list(moved) == ResumableSampler(10, seed=1).order(3)


def test_sampler_state_of_a_distributed_rank_resumes_mid_epoch() -> None:
    s = ResumableSampler(10, seed=5, rank=1, world_size=3)
    full = list(s)
    it = iter(s)
    next(it)
    next(it)
    other = ResumableSampler(10, seed=5, rank=1, world_size=3)
    other.load_state_dict(s.state_dict())
    assert list(other) == full[2:]


def test_sampler_state_for_another_dataset_size_raises_naming_both_sizes() -> None:
    state = ResumableSampler(10).state_dict()
    with pytest.raises(ValueError, match=r"(?s)\b10\b.*\b12\b"):
        ResumableSampler(12).load_state_dict(state)


@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_ranks_are_disjoint_and_cover_the_padded_dataset(shuffle: bool) -> None:
    size, world = 10, 3
    ranks = [ResumableSampler(size, shuffle=shuffle, seed=4, rank=r, world_size=world) for r in range(world)]
    orders = [list(s) for s in ranks]
    assert [len(o) for o in orders] == [4, 4, 4] == [len(s) for s in ranks]
    # the padded order (12 positions) is split between the ranks: every position once
    full = ResumableSampler(size, shuffle=shuffle, seed=4).order()
    padded = full + full[:2]
    assert sorted(itertools.chain(*orders)) == sorted(padded)
    counts = collections.Counter(itertools.chain(*orders))
    assert set(counts) == set(range(size))
    assert sorted(i for i, c in counts.items() if c == 2) == sorted(full[:2])  # padding repeats the start
    torch_ranks = [list(DistributedSampler(range(size), num_replicas=world, rank=r, shuffle=shuffle, seed=4))
                   for r in range(world)]
    assert [len(o) for o in orders] == [len(o) for o in torch_ranks]
    assert sum(counts.values()) == sum(map(len, torch_ranks)) == 12
    if not shuffle:  # same padding rule as torch's DistributedSampler, index for index
        assert orders == torch_ranks


def test_distributed_ranks_of_a_divisible_dataset_are_disjoint() -> None:
    orders = [list(ResumableSampler(12, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(o) == 4 for o in orders)
    assert set(orders[0]).isdisjoint(orders[1]) and set(orders[1]).isdisjoint(orders[2])
    assert set(orders[0]).isdisjoint(orders[2])
    assert set().union(*orders) == set(range(12))


@pytest.mark.parametrize("shuffle", [False, True])
def test_distributed_drop_last_truncates_like_distributed_sampler(shuffle: bool) -> None:
    size, world = 10, 3
    orders = [list(ResumableSampler(size, shuffle=shuffle, seed=4, rank=r, world_size=world, drop_last=True))
              for r in range(world)]
    torch_ranks = [list(DistributedSampler(range(size), num_replicas=world, rank=r, shuffle=shuffle, seed=4,
                                           drop_last=True)) for r in range(world)]
    assert [len(o) for o in orders] == [len(o) for o in torch_ranks] == [3, 3, 3]
    flat = list(itertools.chain(*orders))
    assert len(set(flat)) == 9  # disjoint: no padding, one sample left out
    full = ResumableSampler(size, shuffle=shuffle, seed=4).order()
    assert sorted(flat) == sorted(full[:9])
    if not shuffle:
        assert orders == torch_ranks


@pytest.mark.parametrize("rank,world", [(3, 3), (-1, 3), (0, 0), (5, 2)])
def test_invalid_rank_raises(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, rank=rank, world_size=world)


# --- make_resumable on a DataLoader ---------------------------------------------------------------------

def test_make_resumable_swaps_in_a_resumable_sampler_and_a_generator() -> None:
    torch.manual_seed(0)
    loader = DataLoader(IndexDataset(), batch_size=BATCH, shuffle=True)
    original_sampler = loader.sampler
    assert isinstance(original_sampler, RandomSampler) and loader.generator is None
    assert data.make_resumable(loader, name="train") is None
    assert isinstance(loader.sampler, ResumableSampler) and loader.sampler.shuffle
    assert loader.batch_sampler.sampler is loader.sampler
    assert isinstance(loader.generator, torch.Generator)
    assert isinstance(loader, DataLoader) and type(loader) is not DataLoader
    assert len(loader) == BATCHES
    epoch = indices(take(loader))
    assert len(epoch) == BATCHES and sorted(itertools.chain(*epoch)) == list(range(N))
    # a second call changes nothing (no second wrapper)
    cls, sampler = type(loader), loader.sampler
    assert data.make_resumable(loader, name="train") is None
    assert type(loader) is cls and loader.sampler is sampler


def test_plain_shuffled_loader_consumes_the_global_generator() -> None:
    """The control for the test below: without make_resumable an epoch draws from the global generator."""
    loader = build(resumable=False, noise=False)
    before = torch.get_rng_state()
    take(loader)
    assert not torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_does_not_consume_the_global_generator(workers: int) -> None:
    loader = build(num_workers=workers, noise=False)  # in the main process, noise would draw from it
    before = torch.get_rng_state()
    first = take(loader)
    take(loader)
    assert torch.equal(before, torch.get_rng_state())
    assert len(first) == BATCHES


def test_progress_counts_epochs_and_the_batches_the_loop_received() -> None:
    loader = build()
    assert data.progress(loader) == DataProgress(epoch=0, batches=0)
    for i, _ in enumerate(loader):
        assert data.progress(loader) == DataProgress(epoch=0, batches=i + 1)
        if i == 2:
            break
    assert data.progress(loader) == DataProgress(epoch=0, batches=3)
    take(loader, 2)  # a new `for` is the next epoch, even after a break
    assert data.progress(loader) == DataProgress(epoch=1, batches=2)
    take(loader)
    assert data.progress(loader) == DataProgress(epoch=2, batches=BATCHES)
    take(loader, 1)
    assert data.progress(loader) == DataProgress(epoch=3, batches=1)


def test_progress_of_an_untracked_loader_raises() -> None:
    with pytest.raises(ValueError, match="register_dataloader"):
        data.progress(DataLoader(IndexDataset(), batch_size=BATCH))


def test_epochs_of_a_resumable_loader_differ_and_are_reproducible() -> None:
    a = build()
    epochs_a = [indices(take(a)) for _ in range(3)]
    b = build()
    epochs_b = [indices(take(b)) for _ in range(3)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]


CONFIGS = {
    "workers0": dict(num_workers=0),
    "workers2": dict(num_workers=2),
    "persistent": dict(num_workers=2, persistent_workers=True),
    "sequential": dict(num_workers=0, shuffle=False),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_round_trip_mid_epoch_continues_with_exactly_the_remaining_batches(config: str) -> None:
    kw = CONFIGS[config]
    reference = build(**kw)
    ref = [take(reference) for _ in range(3)]
    run = build(**kw)
    resumed = build(**kw)
    try:
        assert_same_batches(take(run), ref[0], noise=config == "workers2")
        assert_same_batches(take(run, 2), ref[1][:2])
        state = data.loader_state(run)
        assert state["epoch"] == 1 and state["batches"] == 2
        if kw.get("num_workers"):  # the workers fetched ahead: the sampler is past the loop's position
            assert run.sampler.yielded > 2 * BATCH
        if config == "sequential":
            assert isinstance(reference.sampler, ResumableSampler) and not reference.sampler.shuffle
            assert indices(ref[0]) == [list(range(i, min(i + BATCH, N))) for i in range(0, N, BATCH)]

        assert data.restore_loader(resumed, state) is True
        assert data.progress(resumed) == DataProgress(epoch=1, batches=2)
        rest = take(resumed)
        assert_same_batches(rest, ref[1][2:])
        assert data.progress(resumed) == DataProgress(epoch=1, batches=BATCHES)
        # the epochs after are the uninterrupted ones too (with workers, their random draws as well:
        # the loader's generator was put back where it was)
        assert_same_batches(take(resumed), ref[2], noise=config == "workers2")
        assert data.progress(resumed) == DataProgress(epoch=2, batches=BATCHES)
    finally:
        shutdown(reference, run, resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_saved_at_the_end_of_an_epoch_continues_with_the_next_epoch(workers: int) -> None:
    reference = build(num_workers=workers)
    ref = [take(reference) for _ in range(3)]
    run = build(num_workers=workers)
    take(run)
    take(run)
    state = data.loader_state(run)
    assert state["epoch"] == 1 and state["batches"] == BATCHES
    resumed = build(num_workers=workers)
    assert data.restore_loader(resumed, state) is True
    nxt = take(resumed)
    assert data.progress(resumed) == DataProgress(epoch=2, batches=BATCHES)
    # with workers the noise comes from the workers' seeds, drawn from the restored generator
    assert_same_batches(nxt, ref[2], noise=workers > 0)


def test_state_saved_before_the_first_iteration_starts_at_the_first_epoch() -> None:
    ref = indices(take(build()))
    state = data.loader_state(build())
    assert state["epoch"] == -1
    resumed = build()
    take(resumed)  # whatever happened before, restoring "not started" starts over at epoch 0
    assert data.restore_loader(resumed, state) is True
    assert data.progress(resumed) == DataProgress(epoch=0, batches=0)
    assert indices(take(resumed)) == ref


def test_undo_resumable_restores_class_sampler_and_generator() -> None:
    torch.manual_seed(0)
    loader = DataLoader(IndexDataset(), batch_size=BATCH, shuffle=True)
    cls, sampler, batch_sampler = type(loader), loader.sampler, loader.batch_sampler
    assert data.make_resumable(loader) is None
    take(loader, 2)
    data.undo_resumable(loader)
    assert type(loader) is cls
    assert loader.sampler is sampler and loader.batch_sampler is batch_sampler
    assert loader.batch_sampler.sampler is sampler
    assert loader.generator is None
    assert "_weightslab_tracker" not in loader.__dict__
    with pytest.raises(ValueError):
        data.progress(loader)
    data.undo_resumable(loader)  # a second undo is harmless
    assert type(loader) is cls
    # a plain loader again: it draws from the global generator
    before = torch.get_rng_state()
    assert sorted(itertools.chain(*indices(take(loader)))) == list(range(N))
    assert not torch.equal(before, torch.get_rng_state())


def test_undo_resumable_keeps_a_generator_the_user_gave() -> None:
    g = torch.Generator()
    loader = DataLoader(IndexDataset(), batch_size=BATCH, shuffle=True, generator=g)
    sampler = loader.sampler
    data.make_resumable(loader)
    assert loader.generator is g  # not replaced
    data.undo_resumable(loader)
    assert loader.generator is g and loader.sampler is sampler and type(loader) is DataLoader


# --- loaders that cannot be made resumable ----------------------------------------------------------------

def _refused(loader: Any, name: str, *words: str) -> None:
    cls = type(loader)
    message = data.make_resumable(loader, name=name)
    assert isinstance(message, str)
    assert repr(name) in message
    for word in words:
        assert word in message, (word, message)
    assert type(loader) is cls and "_weightslab_tracker" not in getattr(loader, "__dict__", {})
    assert data.loader_state(loader) is None
    assert data.restore_loader(loader, {"kind": "weightslab.loader", "epoch": 0, "batches": 1}) is False


def test_iterable_dataset_is_refused_with_the_fix() -> None:
    _refused(DataLoader(Stream(), batch_size=2), "stream", "IterableDataset", "state_dict()", "wl.register_state",
             "map-style")


def test_custom_sampler_without_state_dict_is_refused_with_the_fix() -> None:
    loader = DataLoader(IndexDataset(), batch_size=BATCH, sampler=PlainSampler(N))
    _refused(loader, "custom", "PlainSampler", "state_dict()", "ResumableSampler")
    assert isinstance(loader.sampler, PlainSampler)


def test_random_sampler_with_replacement_is_refused_with_the_fix() -> None:
    loader = DataLoader(IndexDataset(), batch_size=BATCH, sampler=RandomSampler(IndexDataset(), replacement=True))
    sampler = loader.sampler
    _refused(loader, "bootstrap", "RandomSampler", "ResumableSampler")
    assert loader.sampler is sampler


def test_random_sampler_with_num_samples_is_refused() -> None:
    loader = DataLoader(IndexDataset(), batch_size=BATCH, sampler=RandomSampler(IndexDataset(), num_samples=8))
    _refused(loader, "subset", "RandomSampler", "ResumableSampler")


def test_object_that_is_not_a_loader_is_refused_with_the_fix() -> None:
    _refused([[1, 2], [3, 4]], "listy", "list", "state_dict()/load_state_dict()")


def test_custom_sampler_with_state_is_accepted_and_its_state_round_trips() -> None:
    def make() -> DataLoader:
        return DataLoader(IndexDataset(), batch_size=BATCH, sampler=StatefulReverseSampler(N))

    ref = indices(take(make()))
    run = make()
    sampler = run.sampler
    assert data.make_resumable(run, name="custom") is None
    assert run.sampler is sampler and run.batch_sampler.sampler is sampler  # used as it is
    assert indices(take(run, 2)) == ref[:2]
    state = data.loader_state(run)
    assert state["sampler"] == {"pos": 2 * BATCH} and state["batches"] == 2

    resumed = make()
    assert data.make_resumable(resumed, name="custom") is None
    assert data.restore_loader(resumed, state) is True
    assert resumed.sampler.loaded == [{"pos": 2 * BATCH}]
    assert indices(take(resumed)) == ref[2:]
    data.undo_resumable(resumed)
    assert type(resumed) is DataLoader and resumed.sampler.loaded == [{"pos": 2 * BATCH}]


# --- objects with their own state -------------------------------------------------------------------------

def test_stateful_loader_is_used_as_it_is() -> None:
    loader = TinyStatefulLoader()
    assert data.make_resumable(loader, name="mine") is None
    assert type(loader) is TinyStatefulLoader and "_weightslab_tracker" not in loader.__dict__
    assert take(loader, 4) == [0, 1, 2, 3]
    state = data.loader_state(loader)
    assert state == {"pos": 4} == loader.state_dict()
    other = TinyStatefulLoader()
    assert data.restore_loader(other, state) is True
    assert other.loaded == [{"pos": 4}]
    assert list(other) == [4, 5]
    assert data.restore_loader(TinyStatefulLoader(), None) is False  # nothing saved: nothing loaded
    with pytest.raises(ValueError):
        data.progress(loader)
    data.undo_resumable(loader)
    assert type(loader) is TinyStatefulLoader


def test_dataloader_subclass_with_its_own_state_is_not_wrapped() -> None:
    loader = StatefulDataLoaderSubclass(IndexDataset(), batch_size=BATCH, shuffle=True)
    sampler = loader.sampler
    assert data.make_resumable(loader) is None
    assert type(loader) is StatefulDataLoaderSubclass and loader.sampler is sampler and loader.generator is None
    assert data.loader_state(loader) == {"mine": "yes"}
    assert data.restore_loader(loader, {"mine": "back"}) is True and loader.got == {"mine": "back"}


# --- bugs -------------------------------------------------------------------------------------------------

def test_bug_batch_sampler_over_a_resumable_sampler_resumes_at_the_right_index() -> None:
    def make() -> DataLoader:
        return DataLoader(IndexDataset(), batch_sampler=BatchSampler(ResumableSampler(N, seed=3), BATCH, False))

    ref = indices(take(make()))
    run = make()
    assert data.make_resumable(run) is None
    take(run, 2)
    resumed = make()
    assert data.make_resumable(resumed) is None
    data.restore_loader(resumed, data.loader_state(run))
    assert indices(take(resumed)) == ref[2:]


def test_bug_state_taken_right_after_a_restore_is_the_restored_position() -> None:
    ref = [take(build()) for _ in range(1)]
    run = build()
    take(run, 3)
    state = data.loader_state(run)
    resumed = build()
    data.restore_loader(resumed, state)
    again = data.loader_state(resumed)  # e.g. a checkpoint taken right after resume
    assert (again["epoch"], again["batches"]) == (0, 3)
    third = build()
    data.restore_loader(third, again)
    assert_same_batches(take(third), ref[0][3:])


def test_bug_resume_does_not_depend_on_the_global_seed_of_the_resuming_process() -> None:
    ref = take(build(seed=0))
    run = build(seed=0)
    take(run, 2)
    state = data.loader_state(run)
    resumed = build(seed=1)  # a script seeded differently (or by torch.seed()) on resume
    data.restore_loader(resumed, state)
    assert_same_batches(take(resumed), ref[2:])


def test_bug_make_resumable_keeps_the_shuffle_of_the_users_generator() -> None:
    def make(seed: int) -> DataLoader:
        loader = DataLoader(IndexDataset(), batch_size=BATCH, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        assert data.make_resumable(loader) is None
        return loader

    torch.manual_seed(0)
    assert indices(take(make(123))) != indices(take(make(456)))


# --- through the checkpoint system --------------------------------------------------------------------------

def _setup(root: Path) -> tuple[Any, nn.Module, torch.optim.Optimizer, DataLoader]:
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(IndexDataset(), batch_size=BATCH, shuffle=True)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    wl.register_model("model", model)
    wl.register_optimizer("opt", opt)
    wl.register_dataloader("train", loader)
    return system, model, opt, loader


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    loss = model(batch[0].float().unsqueeze(1) / N).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_system_resume_continues_the_uninterrupted_batch_sequence(root: Path) -> None:
    reference = build()
    ref = [b for _ in range(3) for b in take(reference)]

    system, model, opt, loader = _setup(root)
    assert isinstance(loader.sampler, ResumableSampler)  # registered: made resumable by the system
    seen, step = [], 0
    for _ in range(2):
        for batch in loader:
            seen.append(batch)
            _train_step(model, opt, batch)
            step += 1
            wl.checkpoint_on_step(step)
            if step == BATCHES + 3:
                break
    system.close()
    assert_same_batches(seen, ref[:BATCHES + 3])

    system, model, opt, loader = _setup(root)  # everything again, in the same process
    assert system.resume() == BATCHES + 3
    assert data.progress(loader) == DataProgress(epoch=1, batches=3)
    after = []
    for _ in range(2):
        after.extend(loader)
    assert_same_batches(after, ref[BATCHES + 3:])
    system.close()


def test_registering_an_iterable_dataset_loader_warns_once_naming_it(root: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    loader = DataLoader(Stream(), batch_size=2)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        wl.register_dataloader("stream_loader", loader)
        wl.register_dataloader("stream_loader", loader)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "stream_loader" in r.getMessage()]
    assert len(warnings) == 1
    assert "IterableDataset" in warnings[0].getMessage()
    assert type(loader) is DataLoader
    system.close()


def test_unregistering_a_loader_undoes_it(root: Path) -> None:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    loader = DataLoader(IndexDataset(), batch_size=BATCH, shuffle=True)
    sampler = loader.sampler
    wl.register_dataloader("train", loader)
    assert isinstance(loader.sampler, ResumableSampler) and type(loader) is not DataLoader
    wl.unregister("train", kind="dataloader")
    assert type(loader) is DataLoader and loader.sampler is sampler and loader.generator is None
    system.close()


# --- another world size: the position is resharded, never silently reused --------------------------
def _epoch(world: int, rank: int, *, state: dict | None = None, take: int | None = None, size: int = 48) -> list[int]:
    from weightslab.data import ResumableSampler
    sampler = ResumableSampler(size, seed=3, rank=rank, world_size=world)
    if state is not None:
        sampler.load_state_dict(state)
    out = []
    for index in sampler:
        out.append(index)
        if take is not None and len(out) == take:
            break
    return out


@pytest.mark.parametrize("saved_world, new_world, taken, repeated", [
    (2, 4, 6, 0),   # 12 consumed: 3 each for 4 new ranks
    (4, 2, 3, 0),
    (2, 1, 5, 0),
    (2, 4, 5, 2),   # 10 consumed: new ranks start at 2 (8 consumed), 2 samples seen twice
])
def test_a_sampler_position_is_resharded_across_world_sizes(saved_world, new_world, taken, repeated, caplog):
    from weightslab.data import ResumableSampler
    consumed = [i for r in range(saved_world) for i in _epoch(saved_world, r, take=taken)]
    saved = ResumableSampler(48, seed=3, rank=0, world_size=saved_world)
    saved.yielded = taken
    state = saved.state_dict()
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        rest = [i for r in range(new_world) for i in _epoch(new_world, r, state=state)]
    warning = [rec.getMessage() for rec in caplog.records]
    assert len(warning) == new_world and f"saved by {saved_world} ranks and is resumed by {new_world}" in warning[0]
    assert (f"{repeated} samples of this epoch are seen twice" in warning[0]) == bool(repeated)
    assert sorted(set(consumed) | set(rest)) == list(range(48))  # nothing of the epoch is skipped
    assert len(consumed) + len(rest) == 48 + repeated
    lengths = {len(_epoch(new_world, r, state=state)) for r in range(new_world)}
    assert len(lengths) == 1  # every new rank runs the same number of steps


def test_a_registered_loader_position_is_resharded(caplog):
    from torch.utils.data import DataLoader

    from weightslab.data import ResumableSampler, loader_state, make_resumable, restore_loader

    def loader(world: int, rank: int) -> DataLoader:
        dl = DataLoader(list(range(48)), batch_size=4, sampler=ResumableSampler(48, seed=1, rank=rank, world_size=world))
        assert make_resumable(dl) is None
        return dl

    old = [loader(2, r) for r in range(2)]
    seen = []
    for dl in old:
        it = iter(dl)
        for _ in range(3):
            seen += next(it).tolist()
    state = loader_state(old[0])
    assert state["world_size"] == 2
    new = loader(1, 0)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        assert restore_loader(new, state)
    rest = [i for batch in new for i in batch.tolist()]
    assert sorted(seen + rest) == list(range(48))  # 24 consumed by two ranks, 24 left for one
    assert any("resumed by 1" in r.getMessage() for r in caplog.records)
