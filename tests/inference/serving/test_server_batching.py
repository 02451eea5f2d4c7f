"""The scheduler with fake runners: survivors of several batches regroup, the oldest work runs
first, expired jobs never run, a full queue refuses, a runner's failure fails only its jobs,
close answers everything."""

import threading
import time

import numpy as np
import pytest

from ranet.inference.serving import batching

NUM_CLASSES = 2


class FakeRunner:
    """Two stages: an image with an even pixel value exits at stage 1, the others at 2.
    Records every call as (stage, values); waits on ``gate`` before each call."""
    num_queues = 2

    def __init__(self, gate=None, fail_on=None):
        self.calls = []
        self.gate = gate
        self.fail_on = fail_on

    def run(self, queue, items):
        if self.gate is not None:
            self.gate.wait(5)
        values = [int(item.job.images[item.row].flat[0]) for item in items]
        self.calls.append((queue, values))
        if self.fail_on in values:
            raise RuntimeError("broken")
        return [(value % NUM_CLASSES, queue + 1, np.full(NUM_CLASSES, 0.5, np.float32))
                if queue == 1 or value % 2 == 0 else None for value in values]


def _job(values, results, deadline=1e9, now=0.0):
    images = np.array(values, np.float32).reshape(-1, 1, 1, 1)
    done = threading.Event()

    def on_done(result):
        results.append(result)
        done.set()
    return batching.Job(images, now, deadline, on_done, NUM_CLASSES), done


def test_survivors_of_several_batches_regroup_within_the_batch_timeout():
    gate = threading.Event()
    runner = FakeRunner(gate)
    # Stage 2 waits up to 5 s for a full batch: long enough that only regrouping fills it.
    scheduler = batching.Scheduler([runner], batching.BatchingOptions(4, 5_000_000, 100))
    results = []
    jobs = [_job(values, results) for values in ([1, 2, 3, 4], [5, 6, 7, 8])]
    for job, _ in jobs:
        scheduler.submit(job)
    gate.set()
    for _, done in jobs:
        assert done.wait(4), runner.calls
    scheduler.close()
    assert runner.calls == [(0, [1, 2, 3, 4]), (0, [5, 6, 7, 8]), (1, [1, 3, 5, 7])]
    np.testing.assert_array_equal(results[0]["exits"], [2, 1, 2, 1])
    np.testing.assert_array_equal(results[1]["classes"], [1, 0, 1, 0])


def test_without_a_batch_timeout_the_oldest_work_runs_first():
    gate = threading.Event()
    runner = FakeRunner(gate)
    scheduler = batching.Scheduler([runner], batching.BatchingOptions(2, 0, 100))
    results = []
    jobs = [_job([1, 3], results), _job([5, 7], results)]
    for job, _ in jobs:
        scheduler.submit(job)
    gate.set()
    for _, done in jobs:
        assert done.wait(5)
    scheduler.close()
    # The first batch's survivors are older than the second request: they go on at once.
    assert runner.calls == [(0, [1, 3]), (1, [1, 3]), (0, [5, 7]), (1, [5, 7])]


def test_an_expired_job_never_runs_and_a_full_queue_refuses():
    clock = [100.0]
    gate_runner = FakeRunner(threading.Event())
    scheduler = batching.Scheduler([gate_runner], batching.BatchingOptions(1, 0, 1),
                                   clock=lambda: clock[0])
    results = []
    blocker, blocker_done = _job([2], results, now=100.0)
    scheduler.submit(blocker)
    while scheduler.queued:  # until the one worker holds it, at the gate
        time.sleep(0.001)
    expired, expired_done = _job([4], results, deadline=100.5, now=100.0)
    scheduler.submit(expired)
    with pytest.raises(batching.Overloaded, match="queue is full"):
        scheduler.submit(_job([6, 8], results)[0])
    clock[0] = 101.0
    gate_runner.gate.set()
    assert blocker_done.wait(5) and expired_done.wait(5)
    scheduler.close()
    assert isinstance(results[1], batching.DeadlineExceeded)
    assert [values for _, values in gate_runner.calls] == [[2]]
    with pytest.raises(batching.Overloaded, match="shutting down"):
        scheduler.submit(_job([2], results)[0])


def test_a_failing_batch_fails_its_jobs_only_and_close_answers_everything():
    scheduler = batching.Scheduler([FakeRunner(fail_on=13), FakeRunner(fail_on=13)],
                                   batching.BatchingOptions(1, 0, 100))
    results = []
    jobs = [_job([value], results) for value in (13, 2, 4, 6, 8, 3)]
    for job, _ in jobs:
        scheduler.submit(job)
    scheduler.close()
    assert all(done.is_set() for _, done in jobs)
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    assert sum(isinstance(r, dict) for r in results) == 5
    assert scheduler.in_flight == 0
