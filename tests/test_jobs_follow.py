"""A job's run followed to its end: the state it shows while the pool holds it, and
what an unexpected error while following it leaves behind (the fake pool of
jobs_fakes.py)."""

from __future__ import annotations

import pytest
from conftest import wait_until
from jobs_fakes import SCRIPT, FakePool, runners, wait_state

from vibevoice_pool.jobs.store import JobState


@pytest.fixture
def runner(tmp_path):
    yield from runners(tmp_path)


def test_a_job_waiting_in_the_pools_queue_shows_queued_until_a_worker_begins_it(runner):
    pool = FakePool()
    pool.begin.clear()  # handed to the pool, no worker has begun it
    r = runner(pool)
    job = r.submit("me", {"script": SCRIPT})
    wait_state(r, job.id, JobState.RUNNING)  # the store's own state: in the pool
    view = r.describe(r.store.get(job.id))
    assert view["state"] == "queued" and view["worker"] is None
    assert view["timings"]["started_at"] is None and view["timings"]["ran_s"] is None
    shown = {st: [j.id for j in r.store.list("me", state=st)[0]] for st in JobState}
    assert shown[JobState.QUEUED] == [job.id] and shown[JobState.RUNNING] == []
    pool.hold(after_chunks=1)
    pool.begin.set()
    wait_until(lambda: r.describe(r.store.get(job.id))["state"] == "running", 10)
    view = r.describe(r.store.get(job.id))
    assert view["worker"] in (0, 1) and view["timings"]["started_at"] is not None
    shown = {st: [j.id for j in r.store.list("me", state=st)[0]] for st in JobState}
    assert shown[JobState.RUNNING] == [job.id] and shown[JobState.QUEUED] == []
    pool.release()
    wait_state(r, job.id, JobState.DONE)


def test_a_job_whose_following_breaks_stops_its_pool_row_and_drops_its_progress(
    runner, monkeypatch
):
    """An unexpected error while following a job fails it; its row in the pool, which no
    one reads any more, is cancelled, and its saved progress goes."""
    pool = FakePool()
    pool.hold(after_chunks=2)
    r = runner(pool)
    dropped = []
    monkeypatch.setattr(r.progress, "drop", dropped.append)

    def broken(*args):
        raise RuntimeError("simulated: a bug while saving progress")

    monkeypatch.setattr(r.progress, "tick", broken)
    job = r.submit("me", {"script": SCRIPT})
    done = wait_state(r, job.id, JobState.FAILED)
    assert "lost track" in done.error
    assert pool.cancelled == {done.request_id} and dropped == [job.id]
