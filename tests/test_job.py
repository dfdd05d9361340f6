"""Tests of weightslab/distributed/job.py in a single process: a job of one, where every question has
its obvious answer and nothing is sent (tests/test_distributed.py runs the protocol on real ranks)."""

from __future__ import annotations

import pytest

from weightslab.distributed.job import Agreement, Job


def test_a_single_process_is_a_job_of_one_that_writes():
    job = Job()
    assert (job.world, job.rank, job.size, job.writes, job.distributed, job.gone, job.group) == \
        (None, 0, 1, True, False, False, None)


def test_its_collectives_are_the_identity():
    job = Job()
    assert job.agree(("step",), signal=15, edits=True) == Agreement(("step",), 15, True)
    assert job.share(b"branch") == b"branch" and job.share(None) == b""
    exchange = job.exchange_own(experiment="0123456789abcdef", step=3, payload=b"", error=None, sharded=0,
                                skip=False)
    assert exchange.others == () and not exchange.skip and 0 <= exchange.token < 2 ** 63
    job.agree_on_checkpoint("latest", "0123456789abcdef@3", None)
    job.barrier_before_stop()  # nothing to wait for


def test_a_failure_of_this_process_is_raised_as_it_is():
    job = Job()
    with pytest.raises(OSError, match="disk full"):
        job.exchange_own(experiment="0123456789abcdef", step=3, payload=b"", error=OSError("disk full"), sharded=0,
                         skip=False)
    with pytest.raises(ValueError, match="damaged"):
        job.agree_on_checkpoint("latest", None, ValueError("damaged"))
