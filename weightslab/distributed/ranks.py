"""Per-rank state in a checkpoint of a distributed job, and which of it each rank of a resumed job gets.

Replicated state (models, optimizers, schedulers, hyperparameters) is the same on every rank of a
data-parallel job and is saved once. What differs per rank is saved for every rank, under the
tree's ``ranks`` entry: the random generators, the data loaders' positions and custom state
(``wl.register_state``). The top-level sections hold rank 0's, so a reader that knows nothing of
ranks (``wl.load``, ``export``) sees a single-process checkpoint.

On resume with the same world size, rank r gets rank r's state. On another world size, loader
positions are resharded (``weightslab.data``); random generators and custom state are restored
when every saved rank held the same value (then it does not matter which rank it came from), and
otherwise cannot be mapped: :func:`view` refuses, listing them, unless the caller accepts rank 0's
state on every rank (``rank_state="rank0"``). Pure: no torch, no process group, no disk.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..canonical import TAG, canonical_json
from ..errors import RankStateError

__all__ = ["PER_RANK", "RANK_STATE_MODES", "attach", "own", "view"]

#: Sections of a state tree that each rank holds for itself.
PER_RANK = ("rng", "dataloaders", "custom")
#: ``"exact"``: refuse per-rank state that cannot be mapped onto another world size;
#: ``"rank0"``: give every rank rank 0's, with a warning naming what that changes.
RANK_STATE_MODES = ("exact", "rank0")


def own(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The per-rank sections of a captured tree."""
    return {section: tree[section] for section in PER_RANK if section in tree}


def attach(tree: dict[str, Any], states: Sequence[Mapping[str, Any]]) -> None:
    """Record every rank's per-rank sections (``states[r]`` for rank r) in rank 0's tree."""
    tree["ranks"] = {"world_size": len(states), "states": [dict(s) for s in states]}


def _comparable(node: Any, digests: Mapping[str, str]) -> Any:
    """``node`` with each tensor reference replaced by its blob's digest: equal values compare equal
    whichever rank's tensor key they were saved under."""
    if isinstance(node, dict):
        if node.get(TAG) in ("tensor", "ndarray") and "key" in node:
            return {TAG: node[TAG], "digest": digests.get(node["key"], node["key"])}
        return {k: _comparable(v, digests) for k, v in node.items()}
    if isinstance(node, list):
        return [_comparable(v, digests) for v in node]
    return node


def _same(nodes: Sequence[Any], digests: Mapping[str, str]) -> bool:
    rendered = {canonical_json(_comparable(n, digests)) for n in nodes}
    return len(rendered) == 1


def view(tree: Mapping[str, Any], *, rank: int, world_size: int, digests: Mapping[str, str],
         mode: str = "exact") -> tuple[dict[str, Any], list[str]]:
    """The tree rank ``rank`` of a ``world_size``-rank job restores, and warnings to give.

    ``digests`` maps the checkpoint's tensor keys to their blobs' digests. Raises
    :class:`RankStateError` when per-rank state cannot be mapped and ``mode`` is ``"exact"``.
    """
    if mode not in RANK_STATE_MODES:
        raise ValueError(f"rank_state must be one of {RANK_STATE_MODES}, got {mode!r}")
    ranks = tree.get("ranks")
    if not isinstance(ranks, Mapping):  # saved by one process: every rank starts from its state
        return dict(tree), []
    saved_world, states = int(ranks["world_size"]), list(ranks["states"])
    if len(states) != saved_world:
        raise RankStateError(f"the checkpoint records {saved_world} ranks but holds the state of {len(states)}; "
                             "it is damaged")
    if saved_world == world_size:
        return {**tree, **states[rank]}, []
    unmappable = []
    if not _same([s.get("rng") for s in states], digests):
        unmappable.append("random generators (each saved rank had its own)")
    custom_names = sorted({name for s in states for name in (s.get("custom") or {})})
    for name in custom_names:
        if not _same([(s.get("custom") or {}).get(name) for s in states], digests):
            unmappable.append(f"custom state {name!r} (it differs between the saved ranks)")
    if not unmappable:
        return dict(tree), []
    listing = "; ".join(unmappable)
    if mode == "exact":
        raise RankStateError(
            f"the checkpoint was saved by {saved_world} ranks and this job runs {world_size}: per-rank state that "
            f"cannot be given to the new ranks: {listing}. Resume with {saved_world} ranks to continue exactly, or "
            "pass rank_state='rank0' (system.resume(ref, rank_state='rank0'), or CheckpointConfig(rank_state="
            "'rank0') with resume='auto') to give every rank rank 0's; loader positions are resharded either way",
            unmappable=unmappable)
    return dict(tree), [f"resumed a {saved_world}-rank checkpoint on {world_size} ranks: every rank takes rank 0's "
                        f"{listing} (rank_state='rank0'), so these no longer continue as they would have"]
