"""Which per-rank state each rank of a resumed job gets (weightslab.distributed.ranks, pure)."""

from __future__ import annotations

import pytest

from weightslab import codec
from weightslab.distributed.ranks import attach, own, view
from weightslab.errors import RankStateError


def _tensor(key: str) -> dict:
    return {codec.TAG: "tensor", "key": key}


def _rank_state(rank: int, *, rng: str, stats: int) -> dict:
    return {"rng": {"torch": _tensor(f"ranks/{rank}/rng/torch")}, "dataloaders": {"main": {"position": rank}},
            "custom": {"stats": stats}}


def _tree(*states: dict) -> dict:
    tree = {"step": 4, "models": {"main": {}}, **states[0]}
    attach(tree, [own(tree)] + list(states[1:]))
    return tree


def _digests(*rngs: str) -> dict:
    return {f"ranks/{r}/rng/torch": f"sha256:{d}" for r, d in enumerate(rngs)}


def test_same_world_size_gives_each_rank_its_own_state():
    tree = _tree(_rank_state(0, rng="a", stats=1), _rank_state(1, rng="b", stats=2))
    for rank in range(2):
        got, notes = view(tree, rank=rank, world_size=2, digests=_digests("a", "b"))
        assert got["rng"]["torch"]["key"] == f"ranks/{rank}/rng/torch"
        assert got["custom"] == {"stats": rank + 1} and got["dataloaders"]["main"]["position"] == rank
        assert got["models"] == {"main": {}} and notes == []


def test_another_world_size_refuses_state_that_differs_and_lists_it():
    tree = _tree(_rank_state(0, rng="a", stats=1), _rank_state(1, rng="b", stats=2))
    with pytest.raises(RankStateError) as info:
        view(tree, rank=0, world_size=4, digests=_digests("a", "b"))
    assert info.value.unmappable == ["random generators (each saved rank had its own)",
                                     "custom state 'stats' (it differs between the saved ranks)"]
    assert "saved by 2 ranks and this job runs 4" in str(info.value)
    got, notes = view(tree, rank=3, world_size=4, digests=_digests("a", "b"), mode="rank0")
    assert got["rng"]["torch"]["key"] == "ranks/0/rng/torch" and got["custom"] == {"stats": 1}
    assert len(notes) == 1 and "random generators" in notes[0] and "'stats'" in notes[0]


def test_equal_state_on_every_saved_rank_maps_onto_any_world_size():
    # Equal values under different tensor keys: compared by the blobs' digests, not the keys.
    tree = _tree(_rank_state(0, rng="a", stats=7), _rank_state(1, rng="a", stats=7))
    got, notes = view(tree, rank=0, world_size=1, digests=_digests("same", "same"))
    assert notes == [] and got["custom"] == {"stats": 7}
    # The loader positions differ, and are the loaders' to reshard: they never cause a refusal.
    assert got["dataloaders"]["main"]["position"] == 0


def test_a_single_process_checkpoint_serves_every_rank():
    tree = {"step": 2, **_rank_state(0, rng="a", stats=1)}
    got, notes = view(tree, rank=1, world_size=2, digests={})
    assert got == tree and notes == []


def test_bad_mode_and_damaged_ranks_are_named():
    tree = _tree(_rank_state(0, rng="a", stats=1), _rank_state(1, rng="b", stats=2))
    with pytest.raises(ValueError, match="rank_state must be one of"):
        view(tree, rank=0, world_size=2, digests={}, mode="rank1")
    tree["ranks"]["states"].pop()
    with pytest.raises(RankStateError, match="records 2 ranks but holds the state of 1"):
        view(tree, rank=0, world_size=2, digests={})
