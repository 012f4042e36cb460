"""Jobs between tenants, without processes: fairness between owners, the per-owner
limits, bodies counted against the data limit, space given back, and a database
that is really full (SQLite's max_page_count makes it answer SQLITE_FULL).
Through a real server: test_tenants.py."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import pytest
from conftest import wait_until
from jobs_fakes import SCRIPT, FakePool, build, wait_state

from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import DB_NAME, JobError, JobErrorKind, JobState, JobStore

T0 = 1_000_000.0
MB = 1024 * 1024


def new_job(store: JobStore, at: float = T0, owner: str = "a", est: int = 1000, body=None) -> str:
    job_id = uuid.uuid4().hex
    store.create(
        job_id,
        owner=owner,
        body=body or {"script": "Speaker 1: hi"},
        fmt="wav",
        seed=1,
        est_audio_s=1.0,
        est_bytes=est,
        at=at,
    )
    return job_id


@pytest.fixture
def store(tmp_path):
    s = JobStore.open(tmp_path / "data")
    yield s
    s.close()


def fill_up(store: JobStore) -> None:
    """Make the database really full: no page left, none may be added."""
    conn = store._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    while True:
        try:
            conn.execute("INSERT INTO events (job_id, at, to_state) VALUES ('filler', 0, 'x')")
        except sqlite3.OperationalError as e:
            assert e.sqlite_errorcode == sqlite3.SQLITE_FULL
            return


def free_up(store: JobStore) -> None:
    store._conn.execute("PRAGMA max_page_count=1073741823")
    store._conn.execute("DELETE FROM events WHERE job_id='filler'")


# ---- fairness ---------------------------------------------------------------


def test_the_next_job_goes_to_the_owner_with_fewest_running_then_least_recently_served(store):
    def start(job_id: str, at: float) -> None:  # handed over, then begun by a worker
        store.claim(job_id, "r", at)
        store.note_worker(job_id, 0, at)  # (started_at: what "served" counts)

    done = {"result_path": "x", "result_bytes": 1, "audio_s": 1, "compute_s": None, "worker": 0}
    a = [new_job(store, T0 + i, owner="a") for i in range(5)]
    b = [new_job(store, T0 + 10 + i, owner="b") for i in range(2)]
    assert store.next_queued().id == a[0]  # nobody runs: the oldest job's owner
    start(a[0], T0 + 20)
    assert store.next_queued().id == b[0]  # a holds one, b none: b, though newer
    start(b[0], T0 + 21)
    assert store.next_queued().id == a[1]  # one each; a was served longer ago
    assert store.next_queued(max_running=1) is None  # both at the cap: nothing
    store.finish_done(a[0], **done, at=T0 + 30)
    assert store.next_queued(max_running=1).id == a[1]
    # None running, and the least recently served owner goes first though its queued
    # job is the newer: above, the oldest job and the least recently served agreed.
    store.finish_done(b[0], **done, at=T0 + 31)
    start(a[1], T0 + 40)
    store.finish_done(a[1], **done, at=T0 + 41)
    assert store.next_queued().id == b[1]  # b last began at T0+21, a at T0+40


def test_one_owners_limits_refuse_its_jobs_and_leave_others_room(tmp_path):
    s = JobStore.open(tmp_path / "d", owner_max_active=2, owner_disk_mb=1, disk_limit_mb=100)
    try:
        first, _ = new_job(s, owner="a"), new_job(s, owner="a")
        with pytest.raises(JobError) as e:
            new_job(s, owner="a")
        assert e.value.kind is JobErrorKind.OWNER_LIMIT
        assert "jobs_owner_max_active=2" in e.value.message
        s.cancel(first, T0)  # a finished job is no longer active
        new_job(s, owner="a")
        body = len(json.dumps({"script": "Speaker 1: hi"}))
        new_job(s, owner="b", est=MB - body)  # exactly its share
        with pytest.raises(JobError) as e:
            new_job(s, owner="c", est=MB - body + 1)
        assert (
            e.value.kind is JobErrorKind.OWNER_LIMIT and "jobs_owner_disk_mb=1" in e.value.message
        )
    finally:
        s.close()


# ---- bodies and space -----------------------------------------------------------


def test_bodies_count_against_the_limit_and_their_space_returns(tmp_path):
    s = JobStore.open(tmp_path / "d", disk_limit_mb=10)
    voice = {"script": "Speaker 1: hi", "speakers": [{"audio": "A" * (3 * MB)}]}
    bodies = tmp_path / "d" / "bodies"
    try:
        jobs = [new_job(s, body=voice) for _ in range(3)]
        with pytest.raises(JobError) as e:  # 9 MB held and 3 MB more: over 10
            new_job(s, body=voice)
        assert e.value.kind is JobErrorKind.DISK_LIMIT and "its body" in e.value.message
        assert len(list(bodies.iterdir())) == 3  # big bodies are files, not database pages
        assert 9 * MB < s.disk_bytes() <= 10 * MB
        assert (tmp_path / "d" / DB_NAME).stat().st_size < MB
        assert s.body(jobs[0]) == voice
        for job_id in jobs:
            s.cancel(job_id, T0)
        assert s.reserved_bytes() == 0 and list(bodies.iterdir()) == []  # gone as they end
        assert s.body(jobs[0]) == {} and s.disk_bytes() < MB
        assert s.reclaim(force=True)
        new_job(s, body=voice)  # and the room is there again
    finally:
        s.close()


def test_a_small_body_in_the_database_gives_its_pages_back(tmp_path):
    s = JobStore.open(tmp_path / "d")
    small = {"script": "Speaker 1: " + "x" * 200_000}  # under 256 KB: kept in the database
    try:
        jobs = [new_job(s, body=small) for _ in range(20)]
        assert not (tmp_path / "d" / "bodies").exists()
        grown = (tmp_path / "d" / DB_NAME).stat().st_size + s.disk_bytes()
        for job_id in jobs:
            s.cancel(job_id, T0)
        assert s.reclaim(force=True)
        db = (tmp_path / "d" / DB_NAME).stat().st_size
        assert grown > 4 * MB and db < MB and s.disk_bytes() < MB
    finally:
        s.close()


def test_expiry_gives_the_space_back(tmp_path):
    now = [time.time()]
    s = JobStore.open(tmp_path / "d")
    r = JobRunner(s, FakePool(), build, queue_depth=2, ttl_s=60, clock=lambda: now[0]).start()
    try:
        big = {"script": SCRIPT, "speakers": [{"voice": "x" * (2 * MB)}]}
        job = wait_state(r, r.submit("me", big).id, JobState.DONE)
        assert r.store.body(job.id) == {}  # dropped once it finished
        assert r.store.disk_bytes() >= r.result_file(job).stat().st_size
        now[0] += 61
        assert r.expire() == 1
        assert r.store.disk_bytes() < MB and r.store.reserved_bytes() == 0
    finally:
        r.stop()


# ---- a full disk ------------------------------------------------------------------


def test_a_full_database_refuses_new_jobs_as_disk_full(store):
    fill_up(store)
    with pytest.raises(JobError) as e:
        new_job(store)
    assert e.value.kind is JobErrorKind.DISK_FULL and "full" in e.value.message
    assert store.list("a")[0] == []  # nothing half-written
    free_up(store)
    new_job(store)


def test_on_a_full_disk_a_finish_waits_to_be_written_and_nothing_runs_twice(tmp_path):
    pool = FakePool()
    pool.hold()
    r = JobRunner(JobStore.open(tmp_path / "d"), pool, build, queue_depth=2).start()
    try:
        job = r.submit("me", {"script": SCRIPT})
        queued = r.submit("you", {"script": SCRIPT})
        wait_until(lambda: len(pool.submitted) == 2, 10, what="both jobs to be handed over")
        fill_up(r.store)
        with pytest.raises(JobError) as e:
            r.submit("me", {"script": SCRIPT})
        assert e.value.kind is JobErrorKind.DISK_FULL
        pool.release()  # they finish while the disk is full: the finish waits
        wait_until(lambda: not r._live, 10, what="the runs to end")
        time.sleep(1.5)  # several ticks of the runner
        assert r.store.get(job.id).state is JobState.RUNNING  # not written yet, not requeued
        assert len(pool.submitted) == 2  # and nothing was run again meanwhile
        free_up(r.store)
        for job_id in (job.id, queued.id):
            done = wait_state(r, job_id, JobState.DONE)
            assert done.runs == 1 and done.finished_count == 1
    finally:
        r.stop()


def test_a_running_job_that_no_run_holds_is_queued_again(tmp_path):
    s = JobStore.open(tmp_path / "d")
    orphan = new_job(s, owner="me")
    s.claim(orphan, "lost-request", T0)  # running, but no run of this process holds it
    pool = FakePool()
    pool.hold()
    r = JobRunner(s, pool, build, queue_depth=2)
    r._upkeep()
    assert s.get(orphan).state is JobState.QUEUED
    assert s.events(orphan)[-1][1:] == ("queued", "no worker held it")
    s.close()


def test_another_owner_starts_while_one_owner_fills_the_pool(tmp_path):
    pool = FakePool()
    pool.hold()
    r = JobRunner(JobStore.open(tmp_path / "d"), pool, build, queue_depth=2).start()
    try:
        assert r.owner_cap() == 1  # two rows in the fake pool: all but one
        first = [r.submit("a", {"script": SCRIPT}) for _ in range(20)]
        wait_until(lambda: r.store.get(first[0].id).state is JobState.RUNNING, 10)
        time.sleep(1.0)
        assert len(pool.submitted) == 1  # one owner holds at most the cap
        other = r.submit("b", {"script": SCRIPT})
        wait_until(lambda: r.store.get(other.id).state is JobState.RUNNING, 5)
        assert len(pool.submitted) == 2
    finally:
        pool.release()
        r.stop()
