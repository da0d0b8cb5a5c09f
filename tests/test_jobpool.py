"""JobPool: jobs in this process or in spawned workers, results as they end, failures named."""

from __future__ import annotations

import math
import operator

import pytest

from revlens.jobpool import JobFailed, JobPool, default_workers, threads_per_worker


def test_inline_jobs_run_in_order_and_take_jobs_submitted_meanwhile():
    seen = []
    with JobPool(1) as pool:
        pool.submit("a", operator.add, 1, 2)
        pool.submit("b", operator.mul, 3, 4)
        for key, value in pool.results():
            seen.append((key, value))
            if key == "a":
                pool.submit("c", operator.sub, value, 1)
        assert pool.pending() == 0
    assert seen == [("a", 3), ("b", 12), ("c", 2)]


def test_worker_processes_return_every_result_and_follow_up_jobs():
    with JobPool(2, threads=1) as pool:
        for i in range(4):
            pool.submit(("pow", i), math.pow, 2, i)
        got = {}
        for key, value in pool.results():
            got[key] = value
            if key == ("pow", 3):
                pool.submit(("sqrt", 3), math.sqrt, value)
    assert got == {("pow", i): 2.0**i for i in range(4)} | {("sqrt", 3): math.sqrt(8.0)}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_and_drops_the_rest(workers):
    with JobPool(workers, threads=1) as pool:
        pool.submit("fine", math.sqrt, 4.0)
        pool.submit("broken", math.sqrt, -1.0)
        with pytest.raises(JobFailed, match="job 'broken' failed.*ValueError: math domain error"):
            dict(pool.results())
        assert pool.pending() == 0


def test_worker_counts():
    assert default_workers(on_gpu=True, cores=16) == 1
    assert default_workers(cores=2) == 2 and default_workers(cores=16) == 4 and default_workers(cores=1) == 1
    assert threads_per_worker(2, cores=2) == 1 and threads_per_worker(4, cores=16) == 4
    assert threads_per_worker(4, cores=2) == 1
    gib = 2**30
    assert default_workers(cores=8, bytes_per_worker=4 * gib, available_bytes=9 * gib) == 2
    assert default_workers(cores=8, bytes_per_worker=4 * gib, available_bytes=gib) == 1
    with pytest.raises(ValueError, match="whole number >= 1"):
        JobPool(0)
