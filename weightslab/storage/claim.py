"""Who writes an experiment: one process at a time, held by an advisory lock.

Two processes training the same experiment into the same root would interleave the checkpoints of
two unrelated weight trajectories under one name, and ``resume("latest")`` would continue whichever
wrote last. So a process claims an experiment before it writes into it: an exclusive, non-blocking
``flock`` on ``checkpoints/<hash>.lock`` (beside the experiment's directory, so that a run that
never saves leaves no empty experiment behind), held for as long as the run writes there. The
kernel releases it when the holder dies however it dies (a pid file would need judging whether its
pid is still the same process). The holder writes its pid, host and run into the file, so that
the refusal can say who holds it.

A ``flock`` belongs to the open file description: a second claim from the same process (another
checkpoint system) is refused too. A child forked by the holder (a DataLoader worker) would share
it and hold it past the holder's death, so a forked child closes its copies at once
(``os.register_at_fork``; it never unlocks, which would unlock the parent's). On a remote root the
lock is on the local staging root: it separates processes that share that directory (one machine),
not machines writing one bucket.

Lock files are never deleted: removing a lock file another process has opened would let two
processes hold "the" lock at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExperimentInUseError
from .layout import Layout

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no advisory locks (the store does without them too)
    fcntl = None  # type: ignore[assignment]

__all__ = ["ExperimentInUseError", "Holder", "Claim", "Claims", "lock_path"]

log = logging.getLogger(__name__)

_WARNED: set[Path] = set()  # lock files that could not be taken, said once each
_HELD_FDS: set[int] = set()  # the descriptors of this process's claims


def _forget_in_child() -> None:
    # In a forked child (a DataLoader worker, a multiprocessing pool): close its copies of the
    # claims' descriptors, so that the lock goes when the parent dies, whatever the children do.
    # (Only the forking thread exists here; the GIL made the set consistent at the fork.)
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@dataclass(frozen=True)
class Holder:
    """What a claimant writes into the lock file: who it is."""

    pid: int
    host: str
    run: str
    since: str

    def describe(self) -> str:
        alive = ""
        if self.host == socket.gethostname() and self.pid == os.getpid():
            alive = " (this process: another checkpoint system in it writes that experiment)"
        elif self.host == socket.gethostname() and not _pid_alive(self.pid):
            # The kernel says the lock is held, yet its writer is gone: a child it forked holds the
            # file open (DataLoader workers exit within seconds of their parent).
            alive = ", which is no longer running: a process it forked still holds the lock"
        return f"pid {self.pid} on host {self.host}{alive} (run {self.run}, since {self.since})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_dirs(directory: Path) -> None:
    """``atomic.make_dirs`` without ``atomic.DISK``: the directories a lock file needs are those the
    checkpoints go into, so each new one is made durable in its parent all the same; but a lock is
    not a save's write, and the fault-injection tests that replace ``DISK`` count a save's I/O."""
    created = []
    for d in reversed([directory, *directory.parents]):
        if not d.exists():
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            created.append(d)
    for d in created:
        fd = os.open(d.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def lock_path(layout: Layout, exp_hash: str) -> Path:
    """The lock file of one experiment, beside its directory."""
    return layout.checkpoints_dir / f"{exp_hash}.lock"


_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)  # a lock file planted as a symlink is never followed


def _read_holder(path: Path, *, attempts: int = 20) -> Holder | None:
    """Who holds ``path``, as it wrote; None if it does not say (it writes just after locking: a
    few short waits cover that moment)."""
    for attempt in range(attempts):
        try:
            fd = os.open(path, os.O_RDONLY | _FLAGS)
            try:
                data = os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
            body = json.loads(data)
            return Holder(pid=int(body["pid"]), host=str(body["host"]), run=str(body["run"]),
                          since=str(body["since"]))
        except (OSError, ValueError, KeyError, TypeError):
            if attempt + 1 < attempts:
                time.sleep(0.005)
    return None


class Claim:
    """This process's exclusive claim on writing one experiment (an open file with a flock)."""

    def __init__(self, exp_hash: str, path: Path, fd: int | None):
        self.experiment, self.path, self._fd, self._pid = exp_hash, path, fd, os.getpid()
        if fd is not None:
            _HELD_FDS.add(fd)

    @classmethod
    def acquire(cls, layout: Layout, exp_hash: str, *, run: str) -> "Claim":
        """Claim ``exp_hash``, or raise :class:`ExperimentInUseError` naming the live holder."""
        path = lock_path(layout, exp_hash)
        if fcntl is None:  # pragma: no cover
            return cls(exp_hash, path, None)
        try:
            _make_dirs(path.parent)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _FLAGS, 0o666)  # (the umask decides, as for the root)
            except PermissionError:  # another user's lock file in a shared root: a lock needs no write access
                fd = os.open(path, os.O_RDONLY | _FLAGS)
        except OSError as exc:
            return cls._unlocked(exp_hash, path, exc)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(path)
            who = holder.describe() if holder is not None else "a process that did not say who it is"
            raise ExperimentInUseError(
                f"experiment {exp_hash} under {layout.root} is being written by another live process: {who}. "
                "Two runs writing one experiment would interleave their checkpoints, so this run does not write "
                "there. Stop the other run, give this one another root_log_dir, or continue from one of its "
                f"checkpoints in a new experiment with wl.fork('{exp_hash}@latest'). (Lock file: {path}.)",
                experiment=exp_hash, holder=holder) from None
        except OSError as exc:  # a filesystem without locks
            os.close(fd)
            return cls._unlocked(exp_hash, path, exc)
        except BaseException:
            os.close(fd)
            raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "run": run,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:  # (who holds it is information for a refused process, not part of the lock)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # never write through a planted hard link
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        except OSError:  # (read-only: another user's file; a refused process may then read an earlier holder)
            pass
        return cls(exp_hash, path, fd)

    @classmethod
    def _unlocked(cls, exp_hash: str, path: Path, exc: OSError) -> "Claim":
        # No lock can be taken here (a read-only root, a filesystem without flock): the run writes as
        # it did before claims existed (its saves fail on their own if the root cannot be written).
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("cannot lock %s (%s: %s): this run cannot tell whether another process writes experiment "
                        "%s at the same time", path, type(exc).__name__, exc, exp_hash)
        return cls(exp_hash, path, None)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and os.getpid() == self._pid:  # (a forked child closed its copy already)
            _HELD_FDS.discard(fd)
            os.close(fd)  # closing the last descriptor releases the lock


class Claims:
    """The experiments one run writes into, each claimed while the run is in it.

    :meth:`enter` claims at once (and raises when another live process holds the experiment);
    :meth:`leave` only says the run has moved on: the claim is released by :meth:`release_left`,
    which the run's writer calls once the saves it queued for that experiment are written. A run
    that returns to an experiment before then keeps its claim.
    """

    def __init__(self, layout: Layout, *, run: str):
        self._layout = layout
        self._run = run
        self._lock = threading.Lock()
        self._held: dict[str, Claim] = {}
        self._in: set[str] = set()  # the experiments the run is in (entered and not left)

    def enter(self, exp_hash: str) -> None:
        with self._lock:
            self._in.add(exp_hash)
            if exp_hash not in self._held:
                try:
                    self._held[exp_hash] = Claim.acquire(self._layout, exp_hash, run=self._run)
                except BaseException:
                    self._in.discard(exp_hash)
                    raise

    def holds(self, exp_hash: str) -> bool:
        with self._lock:
            return exp_hash in self._held

    def leave(self, exp_hash: str) -> None:
        with self._lock:
            self._in.discard(exp_hash)

    def drop(self, exp_hash: str) -> None:
        """Release one claim now (nothing was written under it)."""
        with self._lock:
            self._in.discard(exp_hash)
            claim = self._held.pop(exp_hash, None)
            if claim is not None:
                claim.release()

    def release_left(self) -> None:
        """Release the claims of the experiments the run has left."""
        with self._lock:
            for exp_hash in [h for h in self._held if h not in self._in]:
                self._held.pop(exp_hash).release()

    def close(self) -> None:
        with self._lock:
            for claim in self._held.values():
                claim.release()
            self._held.clear()
            self._in.clear()
