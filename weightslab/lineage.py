"""The lineage of a run: which experiment it is in now, and which experiment each one came from.

An experiment is a hash of the architecture and the hyperparameters (:mod:`weightslab.fingerprint`).
Hashing at every step is too slow, so at each boundary the change detector (:mod:`weightslab.change`)
says cheaply whether anything that enters the hash may have moved; only then is the run hashed
again. A new hash opens a child experiment whose record names its parent (the experiment and step
it came from), why (a model change, a config change, a fork, a restart or resume with changes) and
the readable differences; returning to an earlier configuration reuses its directory.

:class:`Lineage` holds the run's current experiment record and fingerprint, the branch a fork
added to the hash, and the checkpoint the run continues (``resumed_from``). Every hash of the
registered objects is computed by :meth:`Lineage.fingerprint`, in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from . import hyperparams as _hp
from .change import ChangeDetector, StateChange
from .errors import HyperparamsError, WeightslabError
from .failures import Failures
from .fingerprint import ExperimentHashGenerator, Fingerprint, architecture_text, diff_architecture, diff_hyperparams
from .ledger import Ledger
from .provenance import now, versions
from .storage.experiment import ExperimentRecord, Parent
from .storage.manager import CheckpointManager
from .storage.manifest import Manifest

__all__ = ["Lineage", "Look"]

log = logging.getLogger(__name__)


@dataclass
class Look:
    """What a boundary's look at the registered objects found."""

    events: list[str] = field(default_factory=list)  # "model_change", "config_change", "state_change"
    changes: list[dict[str, Any]] = field(default_factory=list)  # for the checkpoint's record
    state: list[StateChange] = field(default_factory=list)  # freeze, eval, reset, ... (same experiment)
    hyperparams_moved: bool = False  # a hyperparameter value may have changed


class Lineage:
    """The experiment identity of one run, and the parents of the experiments it opens.

    ``file_record(record)`` files a parent's record (in the background, before its child's);
    ``saved(experiment, step)`` says whether this run took that checkpoint itself.
    """

    def __init__(self, ledger: Ledger, manager: CheckpointManager, failures: Failures, *,
                 exclude_keys: tuple[str, ...], resume_mode: str | None,
                 file_record: Callable[[ExperimentRecord], None], saved: Callable[[str, int], bool]):
        self._ledger = ledger
        self._manager = manager
        self._failures = failures
        self._resume_mode = resume_mode
        self._file_record = file_record
        self._saved = saved
        self.hasher = ExperimentHashGenerator(exclude_keys=exclude_keys)
        self.detector = ChangeDetector()
        self.record: ExperimentRecord | None = None
        self._fingerprint: Fingerprint | None = None
        self.branch: str | None = None  # set by a fork: part of every hash from then on
        self.resumed_from: str | None = None  # the checkpoint this run continues

    @property
    def hash(self) -> str | None:
        return self.record.hash if self.record is not None else None

    # --- hashing ----------------------------------------------------------------------------
    def fingerprint(self) -> Fingerprint:
        """The hash of the registered models and hyperparameters (and of the branch), now."""
        return self.hasher.fingerprint(self._ledger.objects("model"), self._ledger.objects("hyperparams"),
                                       branch=self.branch)

    def current_hash(self) -> str | None:
        """The experiment the registered objects hash to; None when nothing is registered."""
        if not self._ledger.objects("model") and not self._ledger.objects("hyperparams"):
            return None
        return self.fingerprint().hash

    def track(self) -> list[StateChange]:
        """Take the registered objects as the change detector's new baseline."""
        return self.detector.track(self._ledger.objects("model"), self._ledger.objects("hyperparams"))

    # --- at a step boundary -------------------------------------------------------------------
    def look(self, step: int, *, last_step: int | None, forced: tuple[str, ...] = ()) -> Look:
        """What changed since the last boundary; a new hash opens a child experiment."""
        poll = self.detector.poll()
        look = Look(state=list(poll.state), hyperparams_moved=poll.hyperparams)
        if self.record is None or poll.structure or poll.hyperparams or {"model_change", "config_change"} & set(forced):
            self._refresh(step, last_step, look)
        if look.state:  # a change of model state keeps the experiment, and is a reason to save
            look.events.append("state_change")
            look.changes += [c.to_json() for c in look.state]
            for c in look.state:
                log.info("step %d: %s", step, c)
        return look

    def ensure(self, step: int) -> str:
        """The current experiment's hash, hashing the registered objects if none is open yet."""
        if self.record is None:
            self._refresh(step, None, Look())
        assert self.record is not None
        return self.record.hash

    def _refresh(self, step: int, last_step: int | None, look: Look) -> None:
        try:
            fp = self.fingerprint()
        except HyperparamsError as exc:
            # A value that cannot be hashed was put into the live config: keep the current
            # experiment, say so once, and keep checking at later boundaries.
            self.track()
            self._failures.fail(f"hyperparameter check at step {step}", exc)
            return
        look.state += self.track()
        if self.record is None:
            self.open(fp, parent=None)
            return
        if fp.hash == self.record.hash:
            return
        assert self._fingerprint is not None
        diff = fp.compare(self._fingerprint)
        lines: list[str] = []
        if diff.architecture:
            arch = diff_architecture(self._fingerprint.architecture, fp.architecture)
            self._warn_if_optimizer_is_stale(fp.hash)
            look.events.append("model_change")
            look.changes.append({"kind": "model_change", "diff": arch})
            lines += arch
        if diff.hyperparams:
            hp = diff_hyperparams(self._fingerprint.hyperparams, fp.hyperparams)
            look.events.append("config_change")
            look.changes.append({"kind": "config_change", "diff": hp})
            lines += hp
        old = self.record.hash
        parent_step = last_step if last_step is not None else step
        # The parent may have no checkpoint yet (checkpoint_frequency=None): file its record anyway,
        # before the child's, so the lineage never names an unknown experiment.
        self._file_record(self.record)
        self.open(fp, parent=Parent(old, parent_step, look.events[0], tuple(lines)))
        log.info("step %d: %s -> new experiment %s (parent %s@%d): %s", step, " and ".join(look.events),
                 fp.hash, old, parent_step, "; ".join(lines) or "no readable difference")

    def _warn_if_optimizer_is_stale(self, exp_hash: str) -> None:
        live = {id(p) for m in self._ledger.objects("model").values() for p in m.parameters()}
        for name, opt in self._ledger.objects("optimizer").items():
            stale = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in live)
            if stale:
                self._failures.warn_once(
                    f"stale-optimizer:{name}:{exp_hash}",
                    "the architecture changed, but optimizer %r still holds %d parameters that are no longer in any "
                    "registered model (it goes on training the old ones): build a new optimizer over "
                    "model.parameters() and register it again as %r; weightslab carries the state of the parameters "
                    "that did not change over to it", name, stale, name)

    # --- opening experiments ------------------------------------------------------------------
    def open(self, fp: Fingerprint, *, parent: Parent | None) -> None:
        """Make ``fp``'s experiment the current one: its existing record, or a new one with ``parent``."""
        try:
            existing = self._manager.read_experiment(fp.hash)
        except WeightslabError as exc:
            self._failures.warn_once(f"record:{fp.hash}", "the record of experiment %s cannot be read (%s); its "
                                     "lineage information is lost, checkpoints still go to its directory", fp.hash, exc)
            existing = None
        if existing is not None:
            record = existing
            if parent is not None:
                log.info("returning to existing experiment %s", fp.hash)
        else:
            record = ExperimentRecord.open(
                fp, created=now()[0], excluded_keys=self.hasher.excluded_keys, parent=parent, versions=versions(),
                architecture_text=architecture_text(self._ledger.objects("model")),
                hyperparams_values={n: _hp.to_plain(o) for n, o in self._ledger.objects("hyperparams").items()})
        self.record, self._fingerprint = record, fp
        if self.resumed_from is not None and self.resumed_from.startswith(fp.hash + "@"):
            return
        earlier = [e for e in self._manager.checkpoints([fp.hash]) if not self._saved(fp.hash, e.step)]
        if earlier and self._resume_mode == "never":
            log.info("resume='never': experiment %s holds %d checkpoints of earlier runs; this run starts fresh "
                     "and replaces those of the same steps", fp.hash, len(earlier))
        elif earlier:
            self._failures.warn_once(
                f"earlier:{fp.hash}",
                "experiment %s already holds %d checkpoints (up to step %d) from an earlier run that this run did not "
                "resume; checkpoints this run takes at the same steps will replace them. Call system.resume() before "
                "training to continue that run instead.", fp.hash, len(earlier), max(e.step for e in earlier))

    def start_fresh(self, root: str) -> None:
        """Nothing to resume in this run's lineage. If the root holds a run of the same architecture
        or the same hyperparameters, this is a restart with changes: record it as the parent."""
        if not self._ledger.objects("model") and not self._ledger.objects("hyperparams"):
            log.info("no checkpoint to resume under %s; starting fresh", root)
            return
        fp = self.fingerprint()
        related = None
        for entry in reversed(self._manager.checkpoints()):
            try:
                record = self._manager.read_experiment(entry.experiment)
            except WeightslabError:
                continue
            if record is not None and (record.architecture_digest == fp.architecture_digest
                                       or record.hyperparams_digest == fp.hyperparams_digest):
                related = (record, entry)
                break
        if related is None:
            log.info("no checkpoint of experiment %s (nor of a run of the same architecture or hyperparameters) "
                     "under %s; starting fresh", fp.hash, root)
            return
        record, entry = related
        lines = self._differences(record, fp)
        self.track()
        self.open(fp, parent=Parent(record.hash, entry.step, "restart_with_changes", tuple(lines)))
        log.warning("this run differs from the latest related run %s (%s): not resuming it; starting a new "
                    "experiment %s with that run as its parent. To continue its weights with the new settings, "
                    "call system.resume(%r)", entry.ref, "; ".join(lines) or "no readable difference", fp.hash,
                    entry.ref)

    def continue_from(self, manifest: Manifest, record: ExperimentRecord | None) -> list[str] | None:
        """The run now holds ``manifest``'s state: continue in its experiment (and on its branch).
        If the registered objects hash differently (a hyperparameter the checkpoint could not
        overwrite, other excluded keys), branch into a child experiment and return the differences;
        None when the run continues the checkpoint's own experiment."""
        self.resumed_from = manifest.ref
        self.branch = record.branch if record is not None else None  # continuing a fork stays on its branch
        fp = self.fingerprint()
        self.track()
        if fp.hash == manifest.experiment and record is not None:
            self.record, self._fingerprint = record, fp
            return None
        lines = self._differences(record, fp) if record is not None else []
        self.open(fp, parent=Parent(manifest.experiment, manifest.step, "resume_with_changes", tuple(lines)))
        log.info("resumed %s with changes -> new experiment %s: %s", manifest.ref, fp.hash,
                 "; ".join(lines) or "no readable difference")
        return lines

    def fork(self, manifest: Manifest, *, branch: str, lines: list[str]) -> str:
        """Branch from ``manifest`` (restored, with its overrides applied) into ``branch``'s experiment."""
        self.branch = branch
        fp = self.fingerprint()
        self.track()
        self.resumed_from = manifest.ref
        self.open(fp, parent=Parent(manifest.experiment, manifest.step, "fork", tuple(lines)))
        return fp.hash

    @staticmethod
    def _differences(record: ExperimentRecord, fp: Fingerprint) -> list[str]:
        return diff_architecture(record.architecture, fp.architecture) + \
            diff_hyperparams(dict(record.hyperparams), fp.hyperparams)

