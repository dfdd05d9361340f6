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

One experiment directory holds one trajectory of weights. The run claims each experiment it enters
(``enter``: another live process writing it stops a run at its start; later, only the saves into
it fail), and never writes where another trajectory's checkpoints are: a fresh run in an
experiment that holds an earlier run's checkpoints, or a run resumed from a checkpoint older than
its experiment's newest, continues in a *branch* of that experiment (``restart-<n>`` /
``rewind-<n>`` added to the hash like a fork's name; the parent names where it came from), with a
log line that says so.

Each experiment the run enters that has no record yet is announced to the ``experiment_opened``
callbacks (:mod:`weightslab.events`) once, on the training thread, with its parent and why.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import hyperparams as _hp
from .change import ChangeDetector, StateChange
from .errors import CorruptCheckpointError, HyperparamsError, WeightslabError
from .events import Events, ExperimentOpened
from .failures import Failures
from .fingerprint import ExperimentHashGenerator, Fingerprint, architecture_text, diff_architecture, diff_hyperparams
from .ledger import Ledger
from .provenance import now, versions
from .storage.archive import describe_lossy
from .storage.claim import ExperimentInUseError
from .storage.experiment import ExperimentRecord, Parent
from .storage.manager import CheckpointManager
from .storage.manifest import Manifest

__all__ = ["Lineage", "Look", "check_record"]

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
    ``saved(experiment, step)`` says whether this run took that checkpoint itself; ``enter(hash)``
    claims an experiment for this run (raising
    :class:`~weightslab.storage.claim.ExperimentInUseError`), ``leave(hash)`` lets it go.
    """

    def __init__(self, ledger: Ledger, manager: CheckpointManager, failures: Failures, events: Events, *,
                 exclude_keys: tuple[str, ...], resume_mode: str | None,
                 file_record: Callable[[ExperimentRecord], None], saved: Callable[[str, int], bool],
                 enter: Callable[[str], None], leave: Callable[[str], None]):
        self._ledger = ledger
        self._manager = manager
        self._failures = failures
        self._events = events
        self._announced: set[str] = set()  # experiments whose opening the callbacks were told of
        self._resume_mode = resume_mode
        self._file_record = file_record
        self._saved = saved
        self._enter = enter
        self._leave = leave
        self.hasher = ExperimentHashGenerator(exclude_keys=exclude_keys)
        self.detector = ChangeDetector()
        self.record: ExperimentRecord | None = None
        self._fingerprint: Fingerprint | None = None
        self.branch: str | None = None  # set by a fork: part of every hash from then on
        self.resumed_from: str | None = None  # the checkpoint this run continues
        self._resumed: tuple[str, int] | None = None  # ... as (experiment, step)
        self._rewind: tuple[Fingerprint, list[int]] | None = None  # its experiment's later steps: branch away

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
        if self._rewind is not None:
            self._rewind_now()
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
                 self.hash, old, parent_step, "; ".join(lines) or "no readable difference")

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
    def open(self, fp: Fingerprint, *, parent: Parent | None, starting: bool | None = None) -> None:
        """Make ``fp``'s experiment the current one (or a branch of it, see :meth:`_own`): its existing
        record, or a new one with ``parent``. ``starting`` (default: no experiment is open yet) says
        that another live process writing it raises rather than failing the saves."""
        branch, fp, parent = self._own(fp, parent, starting=self.record is None if starting is None else starting)
        self._adopt(fp, parent, branch=branch)

    def _own(self, fp: Fingerprint, parent: Parent | None, *, starting: bool,
             resuming: tuple[str, int] | None = None) -> tuple[str | None, Fingerprint, Parent | None]:
        """Where the run writes instead of ``fp``'s experiment, claimed: (branch, fingerprint, parent).

        That experiment itself, unless it holds checkpoints of another trajectory, which this run's
        must never replace (:meth:`_theirs`): then a new branch of it. Another live process writing
        it raises when ``starting``; later, the run stays (its saves fail)."""
        if not self._claim(fp.hash, starting):  # first: a live writer refuses the run even if it would branch
            return fp.branch, fp, parent
        theirs, after = self._theirs(fp.hash, resuming)
        if not theirs:
            return fp.branch, fp, parent
        return self._branch_away(fp, parent, theirs=theirs, after=after, starting=starting)

    def _theirs(self, exp_hash: str, resuming: tuple[str, int] | None = None) -> tuple[list[int], int | None]:
        """The steps of ``exp_hash``'s checkpoints that belong to another trajectory, and the step after
        which they count: an earlier run's; on returning to the experiment of the checkpoint the run
        continues, those after it that this run did not take; after a resume of ``resuming``
        (experiment, step) now, any later than that step, this run's own included."""
        resumed = resuming if resuming is not None else self._resumed
        after = resumed[1] if resumed is not None and resumed[0] == exp_hash else None
        return [step for step, _ in self._manager.layout.manifests(exp_hash)
                if (after is None or step > after) and (resuming is not None or not self._saved(exp_hash, step))], after

    def _branch_away(self, fp: Fingerprint, parent: Parent | None, *, theirs: list[int], after: int | None,
                     starting: bool) -> tuple[str, Fingerprint, Parent]:
        """A new branch of ``fp``'s experiment, claimed, for a run that must not write there; said."""
        kind = "rewind" if after is not None else "restart"
        branch, branched = self._new_branch(kind, base=fp.branch)
        try:
            self._claim(branched.hash, starting)
        finally:
            self._leave(fp.hash)
        if parent is None:
            parent = Parent(fp.hash, after if after is not None else max(theirs), kind)
        where = f"a branch of it: experiment {branched.hash} (branch {branch!r}, parent {parent.ref})"
        if kind == "rewind":
            log.warning("experiment %s holds %d checkpoints after step %d (up to step %d), the step this run continues "
                        "from: they are another trajectory's. So as not to replace them, this run continues in %s",
                        fp.hash, len(theirs), after, max(theirs), where)
        elif self._resume_mode == "never":
            log.info("resume='never': experiment %s holds %d checkpoints of earlier runs (up to step %d); this run "
                     "starts fresh in %s and replaces none of them", fp.hash, len(theirs), max(theirs), where)
        else:
            self._failures.warn_once(
                f"earlier:{fp.hash}", "experiment %s already holds %d checkpoints (up to step %d) from an earlier run "
                "that this run did not resume. So as not to replace them, this run writes into %s. Call "
                "system.resume() before training to continue that run instead.", fp.hash, len(theirs), max(theirs),
                where)
        return branch, branched, parent

    def _new_branch(self, kind: str, *, base: str | None) -> tuple[str, Fingerprint]:
        """The first ``<base>/<kind>-<n>`` whose experiment has no directory yet. (Not "no lock file":
        the ranks of a job must all pick the same, and rank 0 claims before the others look; a
        directory appears only with a commit, which every rank reaches together.)"""
        models, hyperparams = self._ledger.objects("model"), self._ledger.objects("hyperparams")
        for n in itertools.count(1):
            branch = f"{base}/{kind}-{n}" if base else f"{kind}-{n}"
            fp = self.hasher.fingerprint(models, hyperparams, branch=branch)
            if not self._manager.layout.experiment_dir(fp.hash).exists():
                return branch, fp
        raise AssertionError("unreachable")

    def _claim(self, exp_hash: str, starting: bool) -> bool:
        """Claim ``exp_hash`` for this run; False (said once) when another live process writes it."""
        try:
            self._enter(exp_hash)
            return True
        except ExperimentInUseError as exc:
            if starting:  # nothing trained or changed yet: the run does not start
                exc.at_start = True
                raise
            self._failures.warn_once(f"in-use:{exp_hash}", "the run moves into experiment %s: %s Training goes on; "
                                     "its checkpoints there fail (raised from wait() or close()) while that process "
                                     "writes it", exp_hash, exc)
            return False

    def _adopt(self, fp: Fingerprint, parent: Parent | None, *, branch: str | None,
               record: ExperimentRecord | None = None) -> None:
        """The run is in ``fp``'s (claimed) experiment from now on, with ``record``, or its existing
        record, or a new one with ``parent``; the experiment it leaves is let go once its saves are written."""
        if record is None:
            try:
                record = self._manager.read_experiment(fp.hash)
            except WeightslabError as exc:
                self._failures.warn_once(f"record:{fp.hash}", "the record of experiment %s cannot be read (%s); its "
                                         "lineage information is lost, checkpoints still go to its directory", fp.hash,
                                         exc)
            if record is not None and parent is not None:
                log.info("returning to existing experiment %s", fp.hash)
        opened = record is None and fp.hash not in self._announced  # (its record may not be written yet)
        if record is None:
            record = ExperimentRecord.open(
                fp, created=now()[0], excluded_keys=self.hasher.excluded_keys, parent=parent, versions=versions(),
                architecture_text=architecture_text(self._ledger.objects("model")),
                hyperparams_values={n: _hp.to_plain(o) for n, o in self._ledger.objects("hyperparams").items()})
        previous = self.hash
        self.branch, self.record, self._fingerprint = branch, record, fp
        if previous is not None and previous != fp.hash:
            self._leave(previous)
        self._announced.add(fp.hash)
        if opened:
            parent = record.parent
            self._events.emit("experiment_opened", ExperimentOpened(
                event="experiment_opened", experiment=fp.hash, parent=parent.ref if parent else None,
                reason=parent.reason if parent else None, differences=tuple(parent.changes) if parent else (),
                branch=branch))

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
        self.open(fp, parent=Parent(record.hash, entry.step, "restart_with_changes", tuple(lines)), starting=True)
        self.track()
        log.warning("this run differs from the latest related run %s (%s): not resuming it; starting a new "
                    "experiment %s with that run as its parent. To continue its weights with the new settings, "
                    "call system.resume(%r)", entry.ref, "; ".join(lines) or "no readable difference", fp.hash,
                    entry.ref)

    def continue_from(self, manifest: Manifest, record: ExperimentRecord | None) -> list[str] | None:
        """The run now holds ``manifest``'s state: continue in its experiment (and on its branch).
        If the registered objects hash differently (a hyperparameter the checkpoint could not
        overwrite, other excluded keys), branch into a child experiment and return the differences;
        None when the run continues the checkpoint's own experiment. Raises, changing nothing, when
        another live process writes the experiment the run would continue in.

        An experiment holding checkpoints after the one resumed (another trajectory: the run resumed
        an earlier one) is left at the next step boundary for a ``rewind-<n>`` branch of it: until
        the run trains, it is where the checkpoint is (a script may resume several in turn)."""
        branch = record.branch if record is not None else None  # continuing a fork stays on its branch
        fp = self.hasher.fingerprint(self._ledger.objects("model"), self._ledger.objects("hyperparams"), branch=branch)
        resumed = (manifest.experiment, manifest.step)
        lines, rewind = None, None
        if fp.hash == manifest.experiment:
            self._claim(fp.hash, True)
            target, parent = fp, None
            theirs, _ = self._theirs(fp.hash, resumed)
            rewind = (fp, theirs) if theirs else None
        else:
            lines = self._differences(record, fp) if record is not None else []
            branch, target, parent = self._own(
                fp, Parent(manifest.experiment, manifest.step, "resume_with_changes", tuple(lines)), starting=True,
                resuming=resumed)
        # (claimed: nothing below fails)
        self.resumed_from, self._resumed, self._rewind = manifest.ref, resumed, rewind
        self._adopt(target, parent, branch=branch, record=record if target.hash == manifest.experiment else None)
        self.track()
        if lines is not None:
            log.info("resumed %s with changes -> new experiment %s: %s", manifest.ref, target.hash,
                     "; ".join(lines) or "no readable difference")
        return lines

    def _rewind_now(self) -> None:
        """The run trains on from a checkpoint older than its experiment's newest: into a branch."""
        (fp, theirs), self._rewind = self._rewind, None
        assert self._resumed is not None
        if self.hash == fp.hash:
            branch, branched, parent = self._branch_away(fp, None, theirs=theirs, after=self._resumed[1],
                                                         starting=False)
            self._adopt(branched, parent, branch=branch)

    def fork(self, manifest: Manifest, *, branch: str, lines: list[str], reason: str = "fork") -> str:
        """Branch from ``manifest`` (restored, with its overrides applied) into ``branch``'s experiment."""
        fp = self.hasher.fingerprint(self._ledger.objects("model"), self._ledger.objects("hyperparams"), branch=branch)
        branch, target, parent = self._own(fp, Parent(manifest.experiment, manifest.step, reason, tuple(lines)),
                                           starting=True)
        self.resumed_from, self._resumed, self._rewind = manifest.ref, (manifest.experiment, manifest.step), None
        self._adopt(target, parent, branch=branch)
        self.track()
        return target.hash

    def continue_lossy(self, manifest: Manifest, record: ExperimentRecord | None) -> list[str]:
        """The run now holds the decoded values of a checkpoint of the lossy archive: it goes on in a
        child experiment (branch ``lossy-<n>`` of the checkpoint's), whose parent (reason
        ``"lossy_resume"``) records the lossy origin and its error bounds, which are logged."""
        lines = [f"resumed from {manifest.ref} of the lossy archive ({describe_lossy(manifest)})"]
        log.warning("%s: the run goes on from values that differ from the ones saved, in a child experiment",
                    lines[0])
        branch, _ = self._new_branch("lossy", base=record.branch if record is not None else None)
        self.fork(manifest, branch=branch, lines=lines, reason="lossy_resume")
        return lines

    @staticmethod
    def _differences(record: ExperimentRecord, fp: Fingerprint) -> list[str]:
        return diff_architecture(record.architecture, fp.architecture) + \
            diff_hyperparams(dict(record.hyperparams), fp.hyperparams)



def check_record(record: ExperimentRecord, path: Path | str) -> None:
    """What a resume reads of an experiment's record after restoring (the branch, the architecture
    and hyperparameters it diffs against), checked before anything is restored: a record it could not
    use is damaged (:class:`CorruptCheckpointError`: ``latest`` falls back, an explicit ref refuses)."""
    try:
        if record.branch is not None and not isinstance(record.branch, str):
            raise TypeError(f"branch {record.branch!r} is not a string")
        for model in record.architecture:
            name, modules = model
            if not isinstance(name, str) or not isinstance(modules, list):
                raise TypeError(f"architecture entry {model!r} is not [model name, modules]")
            for m in modules:
                if not (isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("name", "class", "config"))
                        and all(isinstance(m.get(k), list) for k in ("params", "buffers"))):
                    raise TypeError(f"module entry {m!r} of model {name!r} is malformed")
        diff_hyperparams(dict(record.hyperparams), dict(record.hyperparams))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CorruptCheckpointError(f"experiment record {path} is damaged ({exc}); a resume would fail after "
                                     "restoring. Restore the file from a backup, or delete it (the checkpoints "
                                     "stay; only the lineage is lost)", path=path) from None
