"""Which checkpoints to delete: a pure decision from plain inputs (no torch, no disk, no clock).

A root fills up: every experiment keeps every checkpoint it ever committed. Retention decides which
ones may go, from plain records (experiment, step, commit time, reasons, metrics), so the decision can
be tested exhaustively and shown to a person before anything is deleted; deleting is done elsewhere.

Policies say which records of *one* experiment they keep and why; a :class:`Retention` applies its
policies to each experiment independently and keeps the union. Whatever the policies say, two
checkpoints of each experiment are never deleted:

* the latest one (newest by ``created_ns``, then ``step``): resuming needs it;
* the best one of each :class:`KeepBest` metric (a :class:`KeepBest` always keeps its best record;
  the guarantee also names it in the plan's ``why``).

A retention with no policies keeps everything (and :attr:`Retention.keeps_everything` says so): an
empty configuration must never mean "delete all but the latest".

A retention with an ``archive`` (:class:`~weightslab.storage.archive.Archive`: which lossy codec, how
long a chain) demotes instead of deleting: what no policy keeps is re-encoded into the lossy archive
tier, each checkpoint as closed-loop deltas against the one before it, in chains that start at an
exact checkpoint and hold at most ``archive.max_chain`` links. The newest ``archive.ring``
checkpoints of each experiment always stay exact (a resume needs them), and so does the oldest when
no exact checkpoint precedes it (a chain needs an exact start). What is already archived stays.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Union

from .triggers import REASONS

if TYPE_CHECKING:  # (the archive's settings live with its codecs, in the storage layer; planning needs two ints)
    from .storage.archive import Archive

__all__ = [
    "CheckpointRecord",
    "Demotion",
    "KeepLast",
    "KeepEvery",
    "KeepBest",
    "KeepChanges",
    "Policy",
    "Retention",
    "RetentionPlan",
    "CHANGE_REASONS",
    "KEEP_ALL_LABEL",
    "LATEST_LABEL",
    "RING_LABEL",
    "ANCHOR_LABEL",
    "ARCHIVED_LABEL",
]

#: The checkpoint reasons that mark a change of the run (kept by :class:`KeepChanges`), in report order.
CHANGE_REASONS = tuple(r for r in REASONS if r in {"fork", "config_change", "model_change", "resume_with_changes", "lossy_resume",
                                                   "state_change"})

_MODES = ("min", "max")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(owner: str, name: str, value: object) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{owner}: {name} must be a positive int (1 or more), got {value!r}")


def _order_key(record: CheckpointRecord) -> tuple[int, int]:
    """Oldest first: commit time, then step (two checkpoints committed in the same nanosecond)."""
    return (record.created_ns, record.step)


@dataclass(frozen=True)
class CheckpointRecord:
    """What retention needs to know about one committed checkpoint."""

    experiment: str
    step: int
    created_ns: int
    reasons: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    #: False for a checkpoint of the lossy archive tier; ``chain`` is then its longest chain of lossy links
    exact: bool = True
    chain: int = 0
    #: False for what cannot be archived (tensors sharded across ranks, in their own files)
    archivable: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError(f"CheckpointRecord: experiment must be a non-empty string (the experiment hash), "
                             f"got {self.experiment!r}")
        if not _is_int(self.step) or self.step < 0:
            raise ValueError(f"CheckpointRecord {self.experiment!r}: step must be a non-negative int, "
                             f"got {self.step!r}")
        if not _is_int(self.created_ns) or self.created_ns < 0:
            raise ValueError(f"CheckpointRecord {self.experiment}@{self.step}: created_ns must be a non-negative "
                             f"int (nanoseconds since the epoch), got {self.created_ns!r}")
        if isinstance(self.reasons, str) or not isinstance(self.reasons, Iterable):
            raise ValueError(f"CheckpointRecord {self.ref}: reasons must be a tuple of strings such as "
                             f"('step',), got {self.reasons!r}")
        reasons = tuple(self.reasons)
        unknown = sorted({repr(r) for r in reasons if r not in REASONS})
        if unknown:
            raise ValueError(f"CheckpointRecord {self.ref}: unknown reasons [{', '.join(unknown)}]; "
                             f"expected some of {REASONS}")
        object.__setattr__(self, "reasons", reasons)
        if not isinstance(self.metrics, Mapping):
            raise ValueError(f"CheckpointRecord {self.ref}: metrics must be a mapping of names to numbers, "
                             f"got {type(self.metrics).__name__}")
        for name, value in self.metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"CheckpointRecord {self.ref}: metric names must be non-empty strings, "
                                 f"got {name!r}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"CheckpointRecord {self.ref}: metric {name!r} must be a real number "
                                 f"(NaN allowed), got {value!r}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))
        if not isinstance(self.exact, bool) or not isinstance(self.archivable, bool):
            raise ValueError(f"CheckpointRecord {self.ref}: exact and archivable must be True or False, got "
                             f"{self.exact!r} and {self.archivable!r}")
        if not _is_int(self.chain) or self.chain < 0 or (self.chain == 0) != self.exact:
            raise ValueError(f"CheckpointRecord {self.ref}: chain must be 0 for an exact checkpoint and 1 or more for "
                             f"an archived one, got chain={self.chain!r} with exact={self.exact!r}")

    @property
    def ref(self) -> str:
        """``<experiment>@<step>``: the checkpoint's ref, unique within a root."""
        return f"{self.experiment}@{self.step}"


def _one_experiment(owner: object, records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    """The records, oldest first, after checking they all belong to one experiment."""
    experiments = sorted({r.experiment for r in records})
    if len(experiments) > 1:
        raise ValueError(f"{owner!r} selects among the checkpoints of one experiment, got records of "
                         f"{experiments}; group them by experiment first (Retention.plan does)")
    return sorted(records, key=_order_key)


@dataclass(frozen=True, kw_only=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints (by ``created_ns``, then ``step``)."""

    n: int

    def __post_init__(self) -> None:
        _check_positive("KeepLast", "n", self.n)

    @property
    def label(self) -> str:
        return f"last {self.n}"

    def select(self, records: Sequence[CheckpointRecord]) -> dict[str, tuple[str, ...]]:
        """The refs this policy keeps among ``records`` (one experiment), each with why."""
        ordered = _one_experiment(self, records)
        return {r.ref: (self.label,) for r in ordered[-self.n:]}


@dataclass(frozen=True, kw_only=True)
class KeepEvery:
    """Keep the checkpoints whose step is a multiple of ``steps`` (step 0 included)."""

    steps: int

    def __post_init__(self) -> None:
        _check_positive("KeepEvery", "steps", self.steps)

    @property
    def label(self) -> str:
        return f"every {self.steps} steps"

    def select(self, records: Sequence[CheckpointRecord]) -> dict[str, tuple[str, ...]]:
        """The refs this policy keeps among ``records`` (one experiment), each with why."""
        return {r.ref: (self.label,) for r in _one_experiment(self, records) if r.step % self.steps == 0}


@dataclass(frozen=True, kw_only=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by ``metric`` (lowest for ``mode="min"``, highest for ``"max"``).

    Records without the metric, or with NaN, are not candidates. Ties go to the earlier checkpoint
    (by ``created_ns``, then ``step``): the first to reach a value is the one that reached it.
    """

    k: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        _check_positive("KeepBest", "k", self.k)
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"KeepBest: metric must be a non-empty string naming a logged metric "
                             f"(e.g. 'loss'), got {self.metric!r}")
        if self.mode not in _MODES:
            raise ValueError(f"KeepBest: mode must be 'min' (lower is better) or 'max' (higher is better), "
                             f"got {self.mode!r}")

    @property
    def best_label(self) -> str:
        """Why the single best record is kept, e.g. ``"best loss (min)"``."""
        return f"best {self.metric} ({self.mode})"

    @property
    def label(self) -> str:
        """Why the other records in the top ``k`` are kept, e.g. ``"top 3 loss (min)"``."""
        return f"top {self.k} {self.metric} ({self.mode})"

    def ranked(self, records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
        """The candidates among ``records`` (one experiment), best first; ties: earlier first."""
        candidates = [r for r in _one_experiment(self, records)
                      if self.metric in r.metrics and not math.isnan(r.metrics[self.metric])]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(candidates, key=lambda r: (sign * float(r.metrics[self.metric]),) + _order_key(r))

    def select(self, records: Sequence[CheckpointRecord]) -> dict[str, tuple[str, ...]]:
        """The refs this policy keeps among ``records`` (one experiment), each with why."""
        top = self.ranked(records)[:self.k]
        return {r.ref: (self.best_label if i == 0 else self.label,) for i, r in enumerate(top)}


@dataclass(frozen=True, kw_only=True)
class KeepChanges:
    """Keep the checkpoints saved because something changed (any of :data:`CHANGE_REASONS`)."""

    def select(self, records: Sequence[CheckpointRecord]) -> dict[str, tuple[str, ...]]:
        """The refs this policy keeps among ``records`` (one experiment), each with why."""
        kept: dict[str, tuple[str, ...]] = {}
        for r in _one_experiment(self, records):
            changes = tuple(f"change: {c}" for c in CHANGE_REASONS if c in r.reasons)
            if changes:
                kept[r.ref] = changes
        return kept


#: Any retention policy.
Policy = Union[KeepLast, KeepEvery, KeepBest, KeepChanges]
_POLICY_TYPES = (KeepLast, KeepEvery, KeepBest, KeepChanges)

#: Why a record is kept by a retention without policies.
KEEP_ALL_LABEL = "keep all"
#: Why the latest checkpoint of each experiment is kept, whatever the policies.
LATEST_LABEL = "latest"
#: Why the newest checkpoints stay exact when a retention archives.
RING_LABEL = "resume ring"
#: Why a checkpoint no policy keeps stays exact: the chains of the archived ones after it start there.
ANCHOR_LABEL = "archive anchor"
#: Why a checkpoint already in the lossy archive is kept.
ARCHIVED_LABEL = "archived"


@dataclass(frozen=True)
class Demotion:
    """One checkpoint to re-encode into the lossy archive: against ``base`` (the checkpoint before it,
    exact or archived), as link ``chain`` of its chain (1: ``base`` is exact)."""

    record: CheckpointRecord
    base: CheckpointRecord
    chain: int

    @property
    def ref(self) -> str:
        return self.record.ref


@dataclass(frozen=True)
class RetentionPlan:
    """The decision: what to keep, what to delete, and why each kept checkpoint is kept.

    ``keep`` and ``delete`` are ordered by experiment, then ``created_ns``, then ``step``; ``why`` maps
    the ref of every kept checkpoint (and only those) to its reasons, in policy order, ``"latest"`` last.
    ``demote`` (with an archive) lists, in the order they must be carried out, the checkpoints to
    re-encode into the lossy archive; they are in ``keep`` too, with the reason ``"archived"``.
    """

    keep: tuple[CheckpointRecord, ...]
    delete: tuple[CheckpointRecord, ...]
    why: Mapping[str, tuple[str, ...]] = field(hash=False)
    demote: tuple[Demotion, ...] = ()

    @property
    def demote_refs(self) -> tuple[str, ...]:
        return tuple(d.ref for d in self.demote)

    @property
    def keep_refs(self) -> tuple[str, ...]:
        return tuple(r.ref for r in self.keep)

    @property
    def delete_refs(self) -> tuple[str, ...]:
        return tuple(r.ref for r in self.delete)


@dataclass(frozen=True, kw_only=True)
class Retention:
    """Keep a checkpoint if ANY policy keeps it, per experiment; never delete the latest or a best.

    No policies: keep everything (see :meth:`keep_all`). With an ``archive``, demote what would be
    deleted (see the module's docstring).
    """

    policies: tuple[Policy, ...] = ()
    archive: "Archive | None" = None

    def __post_init__(self) -> None:
        if isinstance(self.policies, (str, bytes)) or not isinstance(self.policies, Iterable):
            raise ValueError(f"Retention: policies must be a tuple of policies such as (KeepLast(n=3),), "
                             f"got {self.policies!r}")
        policies = tuple(self.policies)
        for p in policies:
            if not isinstance(p, _POLICY_TYPES):
                raise ValueError(f"Retention: {p!r} is not a retention policy; expected instances of "
                                 f"{', '.join(t.__name__ for t in _POLICY_TYPES)}")
        object.__setattr__(self, "policies", policies)
        if self.archive is not None:
            ring, chain = getattr(self.archive, "ring", None), getattr(self.archive, "max_chain", None)
            if not (_is_int(ring) and ring >= 2 and _is_int(chain) and chain >= 1):
                raise ValueError(f"Retention: archive must be a weightslab Archive (its ring at least 2, its "
                                 f"max_chain at least 1), such as Archive.of('lc'), got {self.archive!r}")

    @classmethod
    def keep_all(cls) -> Retention:
        """The retention that never deletes anything."""
        return cls(policies=())

    @classmethod
    def of(cls, *, keep_last: int | None = None, keep_every: int | None = None, keep_best: int | None = None,
           metric: str | None = None, mode: str = "min", keep_changes: bool = False,
           archive: "Archive | None" = None) -> Retention:
        """A retention from plain values (a config file, a command line); all None/False: keep everything.

        Policies come in this order: keep_last, keep_every, keep_best, keep_changes.
        """
        if keep_best is not None and metric is None:
            raise ValueError("Retention.of: keep_best requires metric, the name of the metric to rank "
                             "checkpoints by (e.g. metric='loss')")
        if keep_best is None and metric is not None:
            raise ValueError(f"Retention.of: metric={metric!r} is only used with keep_best; pass keep_best=K "
                             f"to keep the K best checkpoints by it, or drop metric")
        if not isinstance(keep_changes, bool):
            raise ValueError(f"Retention.of: keep_changes must be True or False, got {keep_changes!r}")
        if mode not in _MODES:
            raise ValueError(f"Retention.of: mode must be 'min' (lower is better) or 'max' (higher is better), "
                             f"got {mode!r}")
        policies: list[Policy] = []
        if keep_last is not None:
            policies.append(KeepLast(n=keep_last))
        if keep_every is not None:
            policies.append(KeepEvery(steps=keep_every))
        if keep_best is not None:
            policies.append(KeepBest(k=keep_best, metric=metric, mode=mode))  # type: ignore[arg-type]
        if keep_changes:
            policies.append(KeepChanges())
        return cls(policies=tuple(policies), archive=archive)

    @property
    def keeps_everything(self) -> bool:
        """True when this retention can never delete a checkpoint: no policies, or a ``KeepEvery(steps=1)``."""
        return not self.policies or any(isinstance(p, KeepEvery) and p.steps == 1 for p in self.policies)

    def plan(self, records: Iterable[CheckpointRecord]) -> RetentionPlan:
        """Decide, for every record, keep or delete; each experiment on its own."""
        records = list(records)
        for r in records:
            if not isinstance(r, CheckpointRecord):
                raise ValueError(f"Retention.plan expects CheckpointRecord objects, got {r!r}")
        duplicated = sorted(ref for ref, count in Counter(r.ref for r in records).items() if count > 1)
        if duplicated:
            raise ValueError(f"Retention.plan: duplicated checkpoint refs {duplicated}; each checkpoint "
                             f"must appear once")

        by_experiment: dict[str, list[CheckpointRecord]] = {}
        for r in records:
            by_experiment.setdefault(r.experiment, []).append(r)

        keep: list[CheckpointRecord] = []
        delete: list[CheckpointRecord] = []
        demote: list[Demotion] = []
        why: dict[str, tuple[str, ...]] = {}
        for experiment in sorted(by_experiment):
            group = sorted(by_experiment[experiment], key=_order_key)
            labels: dict[str, list[str]] = {}

            def add(ref: str, reasons: Iterable[str]) -> None:
                bucket = labels.setdefault(ref, [])
                bucket.extend(x for x in reasons if x not in bucket)

            if not self.policies:
                for r in group:
                    add(r.ref, (KEEP_ALL_LABEL,))
            for policy in self.policies:
                for ref, reasons in policy.select(group).items():
                    add(ref, reasons)
            # The guarantees, whatever the policies say.
            for policy in self.policies:
                if isinstance(policy, KeepBest):
                    ranked = policy.ranked(group)
                    if ranked:
                        add(ranked[0].ref, (policy.best_label,))
            add(group[-1].ref, (LATEST_LABEL,))
            if self.archive is not None:
                demote += self._archive(group, labels, add)

            for r in group:
                if r.ref in labels:
                    keep.append(r)
                    why[r.ref] = tuple(labels[r.ref])
                else:
                    delete.append(r)
        return RetentionPlan(keep=tuple(keep), delete=tuple(delete), why=MappingProxyType(why), demote=tuple(demote))

    def _archive(self, group: list[CheckpointRecord], labels: Mapping[str, object],
                 add: "Callable[[str, Iterable[str]], None]") -> list[Demotion]:
        """The demotions of one experiment (``group``, oldest first), labelling what stays: the ring,
        what is archived already, the exact start of a chain. Each checkpoint no policy keeps is
        encoded against the one before it, continuing that one's chain while it is shorter than
        ``max_chain``, else starting a new chain at the nearest exact checkpoint before it."""
        assert self.archive is not None
        for r in group[-self.archive.ring:]:
            add(r.ref, (RING_LABEL,))
        out: list[Demotion] = []
        before: CheckpointRecord | None = None  # the previous checkpoint that stays, as it will be
        exact: CheckpointRecord | None = None  # the nearest exact one before
        for r in group:
            if r.ref in labels or not r.exact:
                if not r.exact:
                    add(r.ref, (ARCHIVED_LABEL,))
                before, exact = r, (r if r.exact else exact)
                continue
            if not r.archivable:
                continue  # deleted, as without an archive
            if before is not None and (before.exact or before.chain < self.archive.max_chain):
                base = before
            else:
                base = exact
            if base is None:  # nothing exact before it: it stays exact, the start of the chains after it
                add(r.ref, (ANCHOR_LABEL,))
                before = exact = r
                continue
            chain = 1 if base.exact else base.chain + 1
            out.append(Demotion(record=r, base=base, chain=chain))
            add(r.ref, (ARCHIVED_LABEL,))
            before = CheckpointRecord(experiment=r.experiment, step=r.step, created_ns=r.created_ns, reasons=r.reasons,
                                      metrics=r.metrics, exact=False, chain=chain)
        return out
