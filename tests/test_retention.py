"""Tests of weightslab/retention.py: the pure decision of which checkpoints to delete."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from weightslab.retention import (CHANGE_REASONS, CheckpointRecord, KeepBest, KeepChanges, KeepEvery, KeepLast,
                                  Retention, RetentionPlan)
from weightslab.triggers import REASONS

NAN = float("nan")


def R(step: int, *, exp: str = "aaaa", t: int | None = None, reasons: tuple[str, ...] = ("step",),
      **metrics: float) -> CheckpointRecord:
    """A record; committed at ``t`` (default: ``step``, so commit order follows step order)."""
    return CheckpointRecord(exp, step, step if t is None else t, reasons, metrics)


def refs(*steps: int, exp: str = "aaaa") -> set[str]:
    return {f"{exp}@{s}" for s in steps}


def kept(plan: RetentionPlan) -> set[str]:
    return {r.ref for r in plan.keep}


# --------------------------------------------------------------------------------------------- kept sets

LOSSES = [R(1, loss=0.9), R(2, loss=0.3), R(3, loss=0.5), R(4, loss=0.1), R(5, loss=0.7), R(6, loss=0.8)]
ACCS = [R(1, acc=0.2), R(2, acc=0.9), R(3, acc=0.5), R(4, acc=0.95), R(5, acc=0.1), R(6, acc=0.3)]

KEPT_CASES = [
    # (id, records, retention, expected kept refs)
    ("empty input", [], Retention(policies=(KeepLast(n=1),)), set()),
    ("empty input, no policies", [], Retention.keep_all(), set()),
    ("no policies keeps everything", [R(1), R(2), R(3)], Retention(), refs(1, 2, 3)),
    ("keep_all keeps everything", [R(1), R(2), R(3)], Retention.keep_all(), refs(1, 2, 3)),
    ("of() with nothing keeps everything", [R(1), R(2), R(3)], Retention.of(), refs(1, 2, 3)),
    ("keep last, n > count", [R(1), R(2), R(3)], Retention(policies=(KeepLast(n=5),)), refs(1, 2, 3)),
    ("keep last, n == count", [R(1), R(2), R(3)], Retention(policies=(KeepLast(n=3),)), refs(1, 2, 3)),
    ("keep last 1", [R(10), R(20), R(30)], Retention(policies=(KeepLast(n=1),)), refs(30)),
    ("keep last 2", [R(10), R(20), R(30), R(40)], Retention(policies=(KeepLast(n=2),)), refs(30, 40)),
    ("keep last goes by commit time, not step",  # resumed from step 10: step 20 is newer than step 30
     [R(10, t=1), R(30, t=3), R(20, t=4)], Retention(policies=(KeepLast(n=1),)), refs(20)),
    ("keep last: same commit time, higher step is newer",
     [R(5, t=7), R(6, t=7), R(4, t=7)], Retention(policies=(KeepLast(n=1),)), refs(6)),
    ("keep every 100 (step 0 included, latest kept)",
     [R(0), R(50), R(100), R(150), R(200), R(250)], Retention(policies=(KeepEvery(steps=100),)),
     refs(0, 100, 200, 250)),
    ("keep every 1 keeps all", [R(1), R(2), R(3)], Retention(policies=(KeepEvery(steps=1),)), refs(1, 2, 3)),
    ("latest kept when no policy keeps it", [R(0), R(5), R(7)], Retention(policies=(KeepEvery(steps=100),)),
     refs(0, 7)),
    ("latest kept when keep-every keeps nothing", [R(3), R(5), R(7)], Retention(policies=(KeepEvery(steps=100),)),
     refs(7)),
    ("keep best 1, min", LOSSES, Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(4, 6)),
    ("keep best 2, min", LOSSES, Retention(policies=(KeepBest(k=2, metric="loss", mode="min"),)),
     refs(2, 4, 6)),
    ("keep best k > candidates", LOSSES, Retention(policies=(KeepBest(k=99, metric="loss"),)),
     refs(1, 2, 3, 4, 5, 6)),
    ("keep best 1, max", ACCS, Retention(policies=(KeepBest(k=1, metric="acc", mode="max"),)), refs(4, 6)),
    ("keep best 2, max", ACCS, Retention(policies=(KeepBest(k=2, metric="acc", mode="max"),)), refs(2, 4, 6)),
    ("keep best, min of a max metric", ACCS, Retention(policies=(KeepBest(k=1, metric="acc", mode="min"),)),
     refs(5, 6)),
    ("tie: the earlier commit wins (min)",
     [R(1, loss=0.9), R(2, loss=0.2), R(3, loss=0.2), R(4, loss=0.5)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(2, 4)),
    ("tie: the earlier commit wins, whatever the step",
     [R(1, t=1, loss=0.9), R(3, t=2, loss=0.2), R(2, t=3, loss=0.2), R(4, t=4, loss=0.5)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(3, 4)),
    ("tie: the earlier commit wins (max)",
     [R(1, acc=0.1), R(2, acc=0.8), R(3, acc=0.8), R(4, acc=0.5)],
     Retention(policies=(KeepBest(k=1, metric="acc", mode="max"),)), refs(2, 4)),
    ("tie: same commit time, lower step wins",
     [R(2, t=5, loss=0.2), R(1, t=5, loss=0.2), R(9, t=9, loss=0.5)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(1, 9)),
    ("tie across k: the two earliest of three equal",
     [R(1, loss=0.2), R(2, loss=0.2), R(3, loss=0.2), R(4, loss=0.9)],
     Retention(policies=(KeepBest(k=2, metric="loss"),)), refs(1, 2, 4)),
    ("missing metric is not a candidate",
     [R(1, loss=0.9), R(2, acc=0.99), R(3, loss=0.5), R(4)],
     Retention(policies=(KeepBest(k=2, metric="loss"),)), refs(1, 3, 4)),
    ("NaN metric is not a candidate",
     [R(1, loss=0.9), R(2, loss=NAN), R(3, loss=0.5), R(4, loss=0.7)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(3, 4)),
    ("NaN never beats a number, even in max mode",
     [R(1, acc=0.1), R(2, acc=NAN), R(3, acc=0.2)],
     Retention(policies=(KeepBest(k=2, metric="acc", mode="max"),)), refs(1, 3)),
    ("no candidates: only the latest",
     [R(1), R(2, loss=NAN), R(3, acc=1.0)], Retention(policies=(KeepBest(k=3, metric="loss"),)), refs(3)),
    ("infinities are candidates",
     [R(1, loss=float("inf")), R(2, loss=float("-inf")), R(3, loss=0.0)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(2, 3)),
    ("int metric values rank like floats",
     [R(1, loss=3), R(2, loss=1), R(3, loss=2.5)], Retention(policies=(KeepBest(k=1, metric="loss"),)),
     refs(2, 3)),
    ("keep changes",
     [R(1, reasons=("config_change",)), R(2), R(3, reasons=("model_change", "step")), R(4, reasons=("exit",)),
      R(5, reasons=("resume_with_changes",)), R(6, reasons=("manual",)), R(7, reasons=("state_change",)),
      R(8, reasons=("step",))],
     Retention(policies=(KeepChanges(),)), refs(1, 3, 5, 7, 8)),
    ("keep changes: exit and manual are not changes",
     [R(1, reasons=("exit",)), R(2, reasons=("manual",)), R(3, reasons=())],
     Retention(policies=(KeepChanges(),)), refs(3)),
    ("union: last + every",
     [R(s) for s in range(0, 101, 10)], Retention(policies=(KeepLast(n=2), KeepEvery(steps=50))),
     refs(0, 50, 90, 100)),
    ("union: last + best + changes",
     [R(1, loss=0.5), R(2, loss=0.1, reasons=("config_change",)), R(3, loss=0.05), R(4, loss=0.4),
      R(5, loss=0.6, reasons=("state_change",)), R(6, loss=0.7), R(7, loss=0.8)],
     Retention(policies=(KeepLast(n=1), KeepBest(k=1, metric="loss"), KeepChanges())), refs(2, 3, 5, 7)),
    ("union: two metrics",
     [R(1, loss=0.1, acc=0.2), R(2, loss=0.5, acc=0.9), R(3, loss=0.3, acc=0.4), R(4, loss=0.6, acc=0.3)],
     Retention(policies=(KeepBest(k=1, metric="loss"), KeepBest(k=1, metric="acc", mode="max"))),
     refs(1, 2, 4)),
    ("union: everything, overlapping",
     [R(0, loss=0.1, reasons=("config_change",)), R(10, loss=0.2), R(20, loss=0.3)],
     Retention(policies=(KeepLast(n=1), KeepEvery(steps=20), KeepBest(k=1, metric="loss"), KeepChanges())),
     refs(0, 20)),
    ("the best is never deleted: best 1 + last 1 keeps both",
     [R(1, loss=0.1), R(2, loss=0.5), R(3, loss=0.9)],
     Retention(policies=(KeepBest(k=1, metric="loss"), KeepLast(n=1))), refs(1, 3)),
    ("Retention.of: the same union",
     [R(s, loss=1.0 / (s + 1) if s != 30 else 0.0) for s in range(0, 60, 10)],
     Retention.of(keep_last=1, keep_every=20, keep_best=1, metric="loss"), refs(0, 20, 30, 40, 50)),
    ("experiments are independent: last 1 each",
     [R(1, exp="aaaa"), R(2, exp="aaaa"), R(1, exp="bbbb"), R(5, exp="bbbb"), R(3, exp="cccc")],
     Retention(policies=(KeepLast(n=1),)), refs(2) | refs(5, exp="bbbb") | refs(3, exp="cccc")),
    ("experiments are independent: interleaved commit times",
     [R(1, exp="aaaa", t=1), R(1, exp="bbbb", t=2), R(2, exp="aaaa", t=3), R(2, exp="bbbb", t=4),
      R(3, exp="aaaa", t=5)],
     Retention(policies=(KeepLast(n=1),)), refs(3) | refs(2, exp="bbbb")),
    ("experiments are independent: best per experiment",
     [R(1, exp="aaaa", loss=0.1), R(2, exp="aaaa", loss=0.9), R(3, exp="aaaa", loss=0.8),
      R(1, exp="bbbb", loss=0.5), R(2, exp="bbbb", loss=0.4), R(3, exp="bbbb", loss=0.6)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)), refs(1, 3) | refs(2, 3, exp="bbbb")),
    ("one record: always kept", [R(7)], Retention(policies=(KeepEvery(steps=3),)), refs(7)),
]


@pytest.mark.parametrize("records, retention, expected", [c[1:] for c in KEPT_CASES],
                         ids=[c[0] for c in KEPT_CASES])
def test_kept(records, retention, expected):
    plan = retention.plan(records)
    assert kept(plan) == expected
    assert {r.ref for r in plan.delete} == {r.ref for r in records} - expected
    assert set(plan.why) == expected


# ------------------------------------------------------------------------------------------------- why

WHY_CASES = [
    # (id, records, retention, expected why)
    ("no policies", [R(1), R(2)], Retention(),
     {"aaaa@1": ("keep all",), "aaaa@2": ("keep all", "latest")}),
    ("latest only", [R(1), R(7)], Retention(policies=(KeepEvery(steps=100),)), {"aaaa@7": ("latest",)}),
    ("last n", [R(1), R(2), R(3), R(4)], Retention(policies=(KeepLast(n=3),)),
     {"aaaa@2": ("last 3",), "aaaa@3": ("last 3",), "aaaa@4": ("last 3", "latest")}),
    ("every", [R(0), R(5), R(10), R(12)], Retention(policies=(KeepEvery(steps=10),)),
     {"aaaa@0": ("every 10 steps",), "aaaa@10": ("every 10 steps",), "aaaa@12": ("latest",)}),
    ("best and top k", [R(1, loss=0.3), R(2, loss=0.1), R(3, loss=0.2), R(4, loss=0.9)],
     Retention(policies=(KeepBest(k=2, metric="loss"),)),
     {"aaaa@2": ("best loss (min)",), "aaaa@3": ("top 2 loss (min)",), "aaaa@4": ("latest",)}),
    ("best max", [R(1, acc=0.3), R(2, acc=0.1)], Retention(policies=(KeepBest(k=1, metric="acc", mode="max"),)),
     {"aaaa@1": ("best acc (max)",), "aaaa@2": ("latest",)}),
    ("changes, each named in report order",
     [R(1, reasons=("state_change", "model_change", "step")), R(2, reasons=("config_change",)), R(3)],
     Retention(policies=(KeepChanges(),)),
     {"aaaa@1": ("change: model_change", "change: state_change"), "aaaa@2": ("change: config_change",),
      "aaaa@3": ("latest",)}),
    ("every reason, in policy order, latest last",
     [R(0, loss=0.5), R(10, loss=0.1, reasons=("config_change",)), R(20, loss=0.7), R(30, loss=0.9)],
     Retention(policies=(KeepLast(n=3), KeepBest(k=1, metric="loss"), KeepEvery(steps=10), KeepChanges())),
     {"aaaa@0": ("every 10 steps",),
      "aaaa@10": ("last 3", "best loss (min)", "every 10 steps", "change: config_change"),
      "aaaa@20": ("last 3", "every 10 steps"),
      "aaaa@30": ("last 3", "every 10 steps", "latest")}),
    ("the latest and best at once", [R(1, loss=0.5), R(2, loss=0.1)],
     Retention(policies=(KeepBest(k=1, metric="loss"),)),
     {"aaaa@2": ("best loss (min)", "latest")}),
    ("a repeated policy is reported once", [R(1), R(2)], Retention(policies=(KeepLast(n=1), KeepLast(n=1))),
     {"aaaa@2": ("last 1", "latest")}),
    ("two best policies on one metric", [R(1, loss=0.1), R(2, loss=0.5), R(3, loss=0.2)],
     Retention(policies=(KeepBest(k=1, metric="loss"), KeepBest(k=2, metric="loss", mode="max"))),
     {"aaaa@1": ("best loss (min)",), "aaaa@2": ("best loss (max)",),
      "aaaa@3": ("top 2 loss (max)", "latest")}),
    ("per experiment", [R(1, exp="aaaa"), R(1, exp="bbbb"), R(2, exp="bbbb")], Retention(policies=(KeepLast(n=1),)),
     {"aaaa@1": ("last 1", "latest"), "bbbb@2": ("last 1", "latest")}),
]


@pytest.mark.parametrize("records, retention, expected", [c[1:] for c in WHY_CASES],
                         ids=[c[0] for c in WHY_CASES])
def test_why(records, retention, expected):
    plan = retention.plan(records)
    assert dict(plan.why) == expected
    assert list(plan.why) == [r.ref for r in plan.keep]  # in the order of keep


# -------------------------------------------------------------------------------------------- ordering

def test_keep_and_delete_are_ordered_by_experiment_then_commit_time_then_step():
    records = [R(3, exp="bbbb", t=10), R(1, exp="aaaa", t=50), R(9, exp="aaaa", t=20), R(2, exp="bbbb", t=10),
               R(4, exp="aaaa", t=20), R(7, exp="cccc", t=1), R(8, exp="bbbb", t=5)]
    for retention in (Retention(), Retention(policies=(KeepLast(n=1),))):
        plan = retention.plan(records)
        both = sorted(plan.keep + plan.delete, key=lambda r: (r.experiment, r.created_ns, r.step))
        assert [r.ref for r in both] == ["aaaa@4", "aaaa@9", "aaaa@1", "bbbb@8", "bbbb@2", "bbbb@3", "cccc@7"]
        assert list(plan.keep) == [r for r in both if r in plan.keep]
        assert list(plan.delete) == [r for r in both if r in plan.delete]
    plan = Retention(policies=(KeepLast(n=1),)).plan(records)
    assert plan.keep_refs == ("aaaa@1", "bbbb@3", "cccc@7")
    assert plan.delete_refs == ("aaaa@4", "aaaa@9", "bbbb@8", "bbbb@2")


def test_plan_does_not_depend_on_input_order():
    rng = random.Random(7)
    records = [R(s, exp=e, t=rng.randrange(5), loss=rng.random()) for e in ("aaaa", "bbbb") for s in range(12)]
    retention = Retention(policies=(KeepLast(n=2), KeepBest(k=2, metric="loss")))
    expected = retention.plan(records)
    for _ in range(5):
        rng.shuffle(records)
        assert retention.plan(iter(records)) == expected


# ------------------------------------------------------------------------------------------ invariants

def _random_records(rng: random.Random) -> list[CheckpointRecord]:
    records = []
    for exp in rng.sample(["aaaa", "bbbb", "cccc", "dddd"], rng.randint(0, 3)):
        steps = rng.sample(range(0, 60), rng.randint(1, 12))
        for step in steps:
            metrics = {}
            for name in ("loss", "acc"):
                roll = rng.random()
                if roll < 0.15:
                    continue  # missing
                metrics[name] = NAN if roll < 0.25 else float(rng.choice([0.1, 0.2, 0.3, 0.5, rng.random()]))
            reasons = tuple(r for r in REASONS if rng.random() < 0.2)
            records.append(CheckpointRecord(exp, step, rng.randrange(0, 20), reasons, metrics))  # ties in time
    return records


def _random_retention(rng: random.Random) -> Retention:
    policies = []
    if rng.random() < 0.5:
        policies.append(KeepLast(n=rng.randint(1, 5)))
    if rng.random() < 0.4:
        policies.append(KeepEvery(steps=rng.randint(1, 25)))
    for metric in ("loss", "acc"):
        if rng.random() < 0.4:
            policies.append(KeepBest(k=rng.randint(1, 4), metric=metric, mode=rng.choice(["min", "max"])))
    if rng.random() < 0.3:
        policies.append(KeepChanges())
    rng.shuffle(policies)
    return Retention(policies=tuple(policies))


def _expected_kept(records: list[CheckpointRecord], retention: Retention) -> set[str]:
    """An independent, brute-force statement of the rules."""
    if not retention.policies:
        return {r.ref for r in records}
    out = set()
    for exp in {r.experiment for r in records}:
        group = [r for r in records if r.experiment == exp]
        newest_first = sorted(group, key=lambda r: (-r.created_ns, -r.step))
        out.add(newest_first[0].ref)
        for p in retention.policies:
            if isinstance(p, KeepLast):
                out.update(r.ref for r in newest_first[:p.n])
            elif isinstance(p, KeepEvery):
                out.update(r.ref for r in group if r.step % p.steps == 0)
            elif isinstance(p, KeepChanges):
                out.update(r.ref for r in group if set(r.reasons) & set(CHANGE_REASONS))
            else:
                cands = [r for r in group if not math.isnan(r.metrics.get(p.metric, NAN))]
                for _ in range(p.k):
                    if not cands:
                        break
                    value = (min if p.mode == "min" else max)(r.metrics[p.metric] for r in cands)
                    first = min((r for r in cands if r.metrics[p.metric] == value),
                                key=lambda r: (r.created_ns, r.step))
                    out.add(first.ref)
                    cands.remove(first)
    return out


def test_invariants_over_random_record_sets():
    rng = random.Random(20240601)
    for case in range(200):
        records = _random_records(rng)
        retention = _random_retention(rng)
        plan = retention.plan(records)
        where = f"case {case}: {retention!r}"
        keep, delete = [r.ref for r in plan.keep], [r.ref for r in plan.delete]
        # A partition of the input.
        assert sorted(keep + delete) == sorted(r.ref for r in records), where
        assert not set(keep) & set(delete), where
        assert len(set(keep)) == len(keep) and len(set(delete)) == len(delete), where
        # Every kept record says why; nothing else does.
        assert list(plan.why) == keep, where
        assert all(plan.why[ref] for ref in keep), where
        assert all(len(set(v)) == len(v) for v in plan.why.values()), where
        # Ordered.
        key = lambda r: (r.experiment, r.created_ns, r.step)  # noqa: E731
        assert list(plan.keep) == sorted(plan.keep, key=key), where
        assert list(plan.delete) == sorted(plan.delete, key=key), where
        for exp in {r.experiment for r in records}:
            group = [r for r in records if r.experiment == exp]
            kept_here = [r for r in plan.keep if r.experiment == exp]
            # The latest of each experiment is kept.
            latest = max(group, key=lambda r: (r.created_ns, r.step))
            assert latest.ref in keep and "latest" in plan.why[latest.ref], where
            for p in retention.policies:
                if isinstance(p, KeepLast):
                    assert len(kept_here) >= min(p.n, len(group)), where
                if isinstance(p, KeepBest):
                    values = [r.metrics[p.metric] for r in group
                              if p.metric in r.metrics and not math.isnan(r.metrics[p.metric])]
                    if values:
                        best = min(values) if p.mode == "min" else max(values)
                        holders = [r for r in kept_here if r.metrics.get(p.metric) == best]
                        assert holders, where
                        assert any(p.best_label in plan.why[r.ref] for r in holders), where
                    assert sum(1 for r in kept_here if p.best_label in plan.why[r.ref]) == (1 if values else 0)
        if retention.keeps_everything:
            assert not delete, where
        # The rules, stated independently.
        assert set(keep) == _expected_kept(records, retention), where


# ------------------------------------------------------------------------------------ the API around it

def test_keeps_everything():
    assert Retention().keeps_everything
    assert Retention.keep_all().keeps_everything
    assert Retention.of().keeps_everything
    assert Retention(policies=(KeepLast(n=1), KeepEvery(steps=1))).keeps_everything
    assert not Retention(policies=(KeepLast(n=100),)).keeps_everything
    assert not Retention.of(keep_changes=True).keeps_everything
    assert Retention.keep_all() == Retention(policies=())


@pytest.mark.parametrize("kwargs, policies", [
    ({}, ()),
    ({"keep_last": 3}, (KeepLast(n=3),)),
    ({"keep_every": 100}, (KeepEvery(steps=100),)),
    ({"keep_best": 2, "metric": "loss"}, (KeepBest(k=2, metric="loss", mode="min"),)),
    ({"keep_best": 1, "metric": "acc", "mode": "max"}, (KeepBest(k=1, metric="acc", mode="max"),)),
    ({"keep_changes": True}, (KeepChanges(),)),
    ({"keep_changes": False}, ()),
    ({"keep_changes": True, "keep_best": 1, "metric": "loss", "keep_every": 10, "keep_last": 2},
     (KeepLast(n=2), KeepEvery(steps=10), KeepBest(k=1, metric="loss"), KeepChanges())),
])
def test_of_builds_policies(kwargs, policies):
    assert Retention.of(**kwargs).policies == policies


def test_policies_are_frozen_and_keyword_only():
    for obj, attr in ((KeepLast(n=1), "n"), (KeepEvery(steps=2), "steps"), (KeepBest(k=1, metric="x"), "k"),
                      (Retention(), "policies"), (R(1), "step")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, 3)
    for make in (lambda: KeepLast(3), lambda: KeepEvery(3), lambda: KeepBest(1, "loss"),
                 lambda: Retention((KeepLast(n=1),)), lambda: Retention.of(3)):
        with pytest.raises(TypeError):
            make()


def test_record_basics():
    metrics = {"loss": 0.5}
    r = CheckpointRecord("abcd1234", 7, 123, ["step", "exit"], metrics)
    assert r.ref == "abcd1234@7"
    assert r.reasons == ("step", "exit")
    metrics["loss"] = 9.0  # the record holds a copy ...
    assert r.metrics["loss"] == 0.5
    with pytest.raises(TypeError):  # ... that cannot be changed
        r.metrics["loss"] = 1.0  # type: ignore[index]
    assert r == CheckpointRecord("abcd1234", 7, 123, ("step", "exit"), {"loss": 0.5})
    assert hash(r) == hash(CheckpointRecord("abcd1234", 7, 123, ("step", "exit"), {"loss": 0.5}))
    assert CheckpointRecord("abcd", 0, 0).reasons == () and dict(CheckpointRecord("abcd", 0, 0).metrics) == {}


def test_policy_select_is_per_experiment():
    records = [R(1, exp="aaaa"), R(2, exp="bbbb")]
    for policy in (KeepLast(n=1), KeepEvery(steps=1), KeepBest(k=1, metric="loss"), KeepChanges()):
        assert policy.select([]) == {}
        with pytest.raises(ValueError) as info:
            policy.select(records)
        assert "one experiment" in str(info.value) and "['aaaa', 'bbbb']" in str(info.value)
    assert KeepLast(n=2).select([R(3), R(1), R(2)]) == {"aaaa@2": ("last 2",), "aaaa@3": ("last 2",)}


# ------------------------------------------------------------------------------------------ validation

VALIDATION_CASES = [
    # (id, make, exception type, message fragments)
    ("KeepLast n=0", lambda: KeepLast(n=0), ValueError, ["KeepLast", "n must be a positive int", "0"]),
    ("KeepLast n=-2", lambda: KeepLast(n=-2), ValueError, ["n must be a positive int", "-2"]),
    ("KeepLast n=True", lambda: KeepLast(n=True), ValueError, ["n must be a positive int", "True"]),
    ("KeepLast n=2.0", lambda: KeepLast(n=2.0), ValueError, ["n must be a positive int", "2.0"]),
    ("KeepLast n='3'", lambda: KeepLast(n="3"), ValueError, ["n must be a positive int", "'3'"]),
    ("KeepLast n=None", lambda: KeepLast(n=None), ValueError, ["n must be a positive int", "None"]),
    ("KeepEvery steps=0", lambda: KeepEvery(steps=0), ValueError, ["KeepEvery", "steps must be a positive int"]),
    ("KeepEvery steps=False", lambda: KeepEvery(steps=False), ValueError, ["steps must be a positive int", "False"]),
    ("KeepEvery steps=1.5", lambda: KeepEvery(steps=1.5), ValueError, ["steps must be a positive int", "1.5"]),
    ("KeepBest k=0", lambda: KeepBest(k=0, metric="loss"), ValueError, ["KeepBest", "k must be a positive int"]),
    ("KeepBest k=True", lambda: KeepBest(k=True, metric="loss"), ValueError, ["k must be a positive int", "True"]),
    ("KeepBest metric=''", lambda: KeepBest(k=1, metric=""), ValueError, ["metric must be a non-empty string", "''"]),
    ("KeepBest metric=None", lambda: KeepBest(k=1, metric=None), ValueError, ["metric must be a non-empty string"]),
    ("KeepBest metric=3", lambda: KeepBest(k=1, metric=3), ValueError, ["metric must be a non-empty string", "3"]),
    ("KeepBest mode", lambda: KeepBest(k=1, metric="loss", mode="lowest"), ValueError,
     ["mode must be 'min'", "'max'", "'lowest'"]),
    ("KeepBest mode case", lambda: KeepBest(k=1, metric="loss", mode="MIN"), ValueError, ["'MIN'"]),
    ("of keep_best without metric", lambda: Retention.of(keep_best=3), ValueError,
     ["keep_best requires metric", "metric='loss'"]),
    ("of metric without keep_best", lambda: Retention.of(metric="loss"), ValueError,
     ["metric='loss' is only used with keep_best"]),
    ("of bad mode", lambda: Retention.of(keep_best=1, metric="loss", mode="up"), ValueError, ["mode must be", "'up'"]),
    ("of bad keep_last", lambda: Retention.of(keep_last=0), ValueError, ["n must be a positive int"]),
    ("of bad keep_every", lambda: Retention.of(keep_every=True), ValueError, ["steps must be a positive int"]),
    ("of bad keep_best", lambda: Retention.of(keep_best=-1, metric="loss"), ValueError, ["k must be a positive int"]),
    ("of bad keep_changes", lambda: Retention.of(keep_changes="yes"), ValueError,
     ["keep_changes must be True or False", "'yes'"]),
    ("Retention non-policy", lambda: Retention(policies=(KeepLast(n=1), "last 3")), ValueError,
     ["'last 3' is not a retention policy", "KeepLast", "KeepChanges"]),
    ("Retention policy class, not instance", lambda: Retention(policies=(KeepChanges,)), ValueError,
     ["is not a retention policy"]),
    ("Retention policies a single policy", lambda: Retention(policies=KeepLast(n=1)), ValueError,
     ["policies must be a tuple of policies"]),
    ("Retention policies a string", lambda: Retention(policies="keep_last"), ValueError,
     ["policies must be a tuple of policies"]),
    ("record empty experiment", lambda: CheckpointRecord("", 1, 1), ValueError,
     ["experiment must be a non-empty string"]),
    ("record experiment not str", lambda: CheckpointRecord(12, 1, 1), ValueError,
     ["experiment must be a non-empty string", "12"]),
    ("record negative step", lambda: CheckpointRecord("abcd", -1, 1), ValueError,
     ["step must be a non-negative int", "-1"]),
    ("record bool step", lambda: CheckpointRecord("abcd", True, 1), ValueError, ["step must be a non-negative int"]),
    ("record float created_ns", lambda: CheckpointRecord("abcd", 1, 1.5), ValueError,
     ["abcd@1", "created_ns must be a non-negative int", "1.5"]),
    ("record reasons a string", lambda: CheckpointRecord("abcd", 1, 1, "step"), ValueError,
     ["abcd@1", "reasons must be a tuple of strings"]),
    ("record unknown reasons", lambda: CheckpointRecord("abcd", 1, 1, ("step", "checkpoint", "oops")), ValueError,
     ["abcd@1", "unknown reasons ['checkpoint', 'oops']", "config_change"]),
    ("record metrics not a mapping", lambda: CheckpointRecord("abcd", 1, 1, (), [("loss", 1.0)]), ValueError,
     ["metrics must be a mapping", "list"]),
    ("record metric not a number", lambda: CheckpointRecord("abcd", 1, 1, (), {"loss": "0.5"}), ValueError,
     ["metric 'loss' must be a real number", "'0.5'"]),
    ("record metric bool", lambda: CheckpointRecord("abcd", 1, 1, (), {"ok": True}), ValueError,
     ["metric 'ok' must be a real number"]),
    ("record metric name", lambda: CheckpointRecord("abcd", 1, 1, (), {"": 1.0}), ValueError,
     ["metric names must be non-empty strings"]),
    ("plan duplicated refs", lambda: Retention().plan([R(1), R(2), R(1, t=9), R(3, exp="bbbb"), R(3, exp="bbbb")]),
     ValueError, ["duplicated checkpoint refs ['aaaa@1', 'bbbb@3']"]),
    ("plan duplicated refs with policies", lambda: Retention.of(keep_last=1).plan([R(5), R(5)]), ValueError,
     ["duplicated checkpoint refs ['aaaa@5']"]),
    ("plan non-record", lambda: Retention().plan([R(1), ("aaaa", 2, 2)]), ValueError,
     ["expects CheckpointRecord objects", "('aaaa', 2, 2)"]),
]


@pytest.mark.parametrize("make, exc, fragments", [c[1:] for c in VALIDATION_CASES],
                         ids=[c[0] for c in VALIDATION_CASES])
def test_validation(make, exc, fragments):
    with pytest.raises(exc) as info:
        make()
    assert type(info.value) is exc
    for fragment in fragments:
        assert fragment in str(info.value)
