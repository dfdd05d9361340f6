"""Tests of weightslab/writer.py: the background writer thread."""

from __future__ import annotations

import logging
import threading

import pytest

from weightslab.writer import Writer

TIMEOUT = 5  # seconds an event may take before the test fails (never slept)
BLOCKED = 0.2  # how long a call must stay blocked to count as blocked


@pytest.fixture
def writers():
    """Writers made by a test; each is closed at the end so its thread never leaks."""
    made: list[Writer] = []

    def make(**kwargs) -> Writer:
        w = Writer(**kwargs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


class Held:
    """A job that announces it started and then waits to be released."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()

    def __call__(self):
        self.started.set()
        assert self.release.wait(TIMEOUT), "job was never released"
        self.done.set()


def _in_thread(fn):
    """Run ``fn`` in a helper thread; returns (thread, returned event, result list)."""
    returned = threading.Event()
    result: list = []

    def run():
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)
        finally:
            returned.set()

    t = threading.Thread(target=run)
    t.start()
    return t, returned, result


def test_jobs_run_in_order_on_a_background_thread(writers):
    w = writers(max_pending=3)
    assert w.thread is None  # started lazily
    ran: list[tuple[int, int]] = []
    for i in range(10):
        w.submit(f"job{i}", lambda i=i: ran.append((i, threading.get_ident())))
    w.wait()
    assert [i for i, _ in ran] == list(range(10))
    idents = {ident for _, ident in ran}
    assert idents == {w.thread.ident}
    assert threading.get_ident() not in idents
    assert w.thread.name == "weightslab-writer"
    assert w.pending == 0


def test_thread_name_option(writers):
    w = writers(name="custom-writer")
    w.submit("x", lambda: None)
    w.wait()
    assert w.thread.name == "custom-writer"


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending must be at least 1, got 0"):
        Writer(max_pending=0)


def test_submit_blocks_while_max_pending_jobs_are_in_flight(writers):
    w = writers(max_pending=2)
    held = Held()
    w.submit("held", held)
    assert held.started.wait(TIMEOUT)
    second = threading.Event()
    w.submit("second", second.set)  # queued: one running, one queued
    assert w.pending == 2
    third = threading.Event()
    t, returned, result = _in_thread(lambda: w.submit("third", third.set))
    assert not returned.wait(BLOCKED), "submit returned while max_pending jobs were in flight"
    assert w.pending == 2 and not second.is_set() and not third.is_set()
    held.release.set()
    assert returned.wait(TIMEOUT)
    t.join(TIMEOUT)
    assert result == [None]
    w.wait()
    assert second.is_set() and third.is_set()


def test_a_failing_job_is_kept_and_the_next_one_runs(writers, caplog):
    w = writers()
    boom = ValueError("disk full")
    after = threading.Event()

    def fail():
        raise boom

    with caplog.at_level(logging.WARNING, logger="weightslab.writer"):
        w.submit("step-7", fail)
        w.submit("step-8", after.set)
        w.wait()
    assert after.is_set()
    assert w.take_errors() == [boom]
    assert w.take_errors() == []  # handed over once
    assert any("step-7" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records)
    assert w.thread.is_alive()  # the writer goes on
    again = threading.Event()
    w.submit("step-9", again.set)
    w.wait()
    assert again.is_set()


def test_base_exceptions_are_kept_too(writers):
    w = writers()

    def stop():
        raise KeyboardInterrupt("interrupted")

    w.submit("k", stop)
    w.wait()
    [err] = w.take_errors()
    assert isinstance(err, KeyboardInterrupt)


def test_wait_returns_only_when_every_job_is_done(writers):
    w = writers(max_pending=3)
    held = Held()
    tail = threading.Event()
    w.submit("held", held)
    w.submit("tail", tail.set)
    t, returned, _ = _in_thread(w.wait)
    assert not returned.wait(BLOCKED), "wait() returned while a job was still running"
    assert not tail.is_set()
    held.release.set()
    assert returned.wait(TIMEOUT)
    assert held.done.is_set() and tail.is_set()
    assert w.pending == 0
    t.join(TIMEOUT)


def test_wait_with_nothing_submitted_returns_at_once(writers):
    w = writers()
    w.wait()
    assert w.thread is None and w.pending == 0


def test_close_drains_queued_jobs_then_joins(writers):
    w = writers(max_pending=4)
    held = Held()
    ran: list[int] = []
    w.submit("held", held)
    assert held.started.wait(TIMEOUT)
    for i in range(3):
        w.submit(f"q{i}", lambda i=i: ran.append(i))
    thread = w.thread
    t, returned, result = _in_thread(w.close)
    assert not returned.wait(BLOCKED), "close() returned before the running job finished"
    assert thread.is_alive() and ran == []
    held.release.set()
    assert returned.wait(TIMEOUT)
    t.join(TIMEOUT)
    assert result == [None]
    assert ran == [0, 1, 2]  # queued jobs ran, in order, before the thread stopped
    assert not thread.is_alive()
    assert w.pending == 0
    w.close()  # idempotent
    w.close()
    assert not thread.is_alive()


def test_close_without_any_job(writers):
    w = writers()
    w.close()
    w.close()
    assert w.thread is None


def test_submit_after_close_raises(writers):
    w = writers()
    w.submit("a", lambda: None)
    w.close()
    ran = threading.Event()
    with pytest.raises(RuntimeError, match="writer is closed"):
        w.submit("late", ran.set)
    assert not ran.is_set() and w.pending == 0


def test_keep_adds_an_error(writers):
    w = writers()
    first, second = OSError("snapshot failed"), RuntimeError("other")
    w.keep(first)

    def fail():
        raise second

    w.submit("fails", fail)
    w.wait()
    assert w.take_errors() == [first, second]
    assert w.take_errors() == []
    assert w.thread is not None  # keep() itself does not start or need the thread


def test_close_from_inside_a_job_does_not_deadlock(writers):
    w = writers()
    closed = threading.Event()

    def job():
        w.close()
        closed.set()

    w.submit("closer", job)
    assert closed.wait(TIMEOUT)
    w.thread.join(TIMEOUT)
    assert not w.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit("late", lambda: None)


def test_submit_blocked_across_close_is_not_lost(writers):
    w = writers(max_pending=1)
    release = threading.Event()
    started = threading.Event()

    def first():
        started.set()
        assert release.wait(TIMEOUT)
        w.close()  # close while the second submit waits for the slot (close joins nothing from here)

    w.submit("first", first)
    assert started.wait(TIMEOUT)
    second_ran = threading.Event()
    t, returned, result = _in_thread(lambda: w.submit("second", second_ran.set))
    assert not returned.wait(BLOCKED)  # blocked: the single slot is taken
    release.set()
    assert returned.wait(TIMEOUT)
    t.join(TIMEOUT)
    w.thread.join(TIMEOUT)
    assert not w.thread.is_alive()
    # Either the late submit is refused, or its job runs; it must not be accepted and dropped.
    refused = bool(result) and isinstance(result[0], RuntimeError)
    assert refused or second_ran.is_set(), f"submit returned {result!r} but its job never ran"
    assert w.pending == 0


def test_replace_drops_queued_droppable_jobs_never_the_running_one(writers):
    w = writers(max_pending=2)
    first, ran, handed = Held(), [], []
    w.submit("1", first, droppable="one")
    assert first.started.wait(TIMEOUT)  # running: it may not be dropped any more
    w.submit("2", lambda: ran.append(2), droppable="two")  # queued (room for two)
    w.submit("3", lambda: ran.append(3), droppable="three", replace=handed.append)  # no room: takes 2's place
    w.submit("4", lambda: ran.append(4), replace=handed.append)  # not droppable itself
    assert handed == [["two"], ["three"]]
    first.release.set()
    w.wait()
    assert ran == [4] and first.done.is_set()


def test_replace_waits_when_nothing_queued_can_be_dropped(writers):
    w = writers(max_pending=1)
    first = Held()
    w.submit("1", first, droppable="one")
    assert first.started.wait(TIMEOUT)
    returned = threading.Event()
    threading.Thread(target=lambda: (w.submit("2", lambda: None, replace=lambda t: None), returned.set())).start()
    assert not returned.wait(BLOCKED)  # the running job is never dropped: wait for room
    first.release.set()
    assert returned.wait(TIMEOUT)
    w.wait()
