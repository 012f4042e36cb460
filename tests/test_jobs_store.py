"""Durable jobs without processes: the store's transitions and its schema
(the runner and routes are in test_jobs_runner.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid

import pytest

from vibevoice_pool.jobs.store import JobError, JobErrorKind, JobState, JobStore

T0 = 1_000_000.0


def new_job(store: JobStore, at: float = T0, est_bytes: int = 1000, owner: str = "me") -> str:
    job_id = uuid.uuid4().hex
    store.create(
        job_id,
        owner=owner,
        body={"script": "Speaker 1: hi"},
        fmt="wav",
        seed=1,
        est_audio_s=1.0,
        est_bytes=est_bytes,
        at=at,
    )
    return job_id


@pytest.fixture
def store(tmp_path):
    s = JobStore.open(tmp_path / "data", disk_limit_mb=1)
    yield s
    s.close()


# ---- the store ---------------------------------------------------------


def test_a_job_moves_queued_running_done_once(store):
    job_id = new_job(store)
    assert store.get(job_id).state is JobState.QUEUED
    assert store.claim(job_id, "r1", T0 + 1)
    assert not store.claim(job_id, "r2", T0 + 1)  # already running
    done = dict(result_path="results/x.wav", result_bytes=10, audio_s=1.0, compute_s=0.5)
    assert store.finish_done(job_id, worker=0, at=T0 + 2, **done)
    assert not store.finish_done(job_id, worker=1, at=T0 + 3, **done)
    assert not store.fail(job_id, "engine_error", "late", T0 + 3)
    with pytest.raises(JobError) as e:
        store.cancel(job_id, T0 + 3)
    assert e.value.kind is JobErrorKind.CONFLICT
    job = store.get(job_id)
    assert (job.state, job.finished_count, job.runs, job.worker) == (JobState.DONE, 1, 1, 0)
    assert [(a, b) for a, b, _ in store.events(job_id)] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "done"),
    ]


def test_the_database_itself_refuses_a_second_finish(store, tmp_path):
    job_id = new_job(store)
    store.cancel(job_id, T0)
    conn = sqlite3.connect(tmp_path / "data" / "jobs.db")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE jobs SET finished_count = finished_count + 1 WHERE id=?", (job_id,))
    conn.close()


def test_racing_finish_fail_and_cancel_have_exactly_one_winner(store):
    def finish(job_id):
        done = dict(result_path="r", result_bytes=1, audio_s=1.0, compute_s=None, worker=0)
        return store.finish_done(job_id, at=T0, **done)

    def fail(job_id):
        return store.fail(job_id, "engine_error", "x", T0)

    def cancel(job_id):
        try:
            store.cancel(job_id, T0)
            return True
        except JobError:
            return False

    for _ in range(20):
        job_id = new_job(store)
        store.claim(job_id, "r", T0)
        wins: list[bool] = []
        barrier = threading.Barrier(3)

        def race(move, job_id=job_id, wins=wins, barrier=barrier):
            barrier.wait()
            wins.append(move(job_id))

        threads = [threading.Thread(target=race, args=(f,)) for f in (finish, fail, cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False, False, True]
        assert store.get(job_id).finished_count == 1


def test_at_start_running_jobs_are_queued_again_oldest_first(store):
    a, b, c = new_job(store, T0), new_job(store, T0 + 1), new_job(store, T0 + 2)
    store.claim(b, "r", T0 + 3)
    store.claim(c, "r", T0 + 3)
    store.finish_done(
        c, result_path="r", result_bytes=1, audio_s=1, compute_s=None, worker=0, at=T0 + 4
    )
    assert store.requeue_unfinished(T0 + 5) == [a, b]
    assert store.get(b).state is JobState.QUEUED and store.get(c).state is JobState.DONE
    assert store.events(b)[-1][2] == "the server restarted while it ran"
    assert store.next_queued().id == a


def test_finished_jobs_expire_and_hand_back_their_results(store):
    old, new, running = new_job(store), new_job(store), new_job(store)
    for job_id, at in ((old, T0 + 10), (new, T0 + 100)):
        store.claim(job_id, "r", at)
        store.finish_done(
            job_id,
            result_path=f"results/{job_id}.wav",
            result_bytes=5,
            audio_s=1,
            compute_s=None,
            worker=0,
            at=at,
        )
    store.claim(running, "r", T0)
    assert store.expire(before=T0 + 50) == [f"results/{old}.wav"]
    assert store.get(old) is None and store.events(old) == []
    assert store.get(new).state is JobState.DONE and store.get(running) is not None


BODY = len(json.dumps({"script": "Speaker 1: hi"}))  # what new_job's body weighs


def test_the_disk_limit_counts_results_bodies_and_what_queued_jobs_will_write(store):
    mb = 1024 * 1024
    a = new_job(store, est_bytes=mb // 2)
    assert store.reserved_bytes() == mb // 2 + BODY  # a queued job's body counts too
    with pytest.raises(JobError) as e:  # the body counts twice while it is written
        new_job(store, est_bytes=mb // 2 - 3 * BODY + 1)
    assert e.value.kind is JobErrorKind.DISK_LIMIT and "jobs_disk_limit_mb=1" in e.value.message
    new_job(store, est_bytes=mb // 2 - 3 * BODY)  # exactly at the limit
    store.cancel(a, T0)  # a cancelled job holds nothing: its body is dropped
    assert store.reserved_bytes() == mb // 2 - 2 * BODY
    assert store.reserved_bytes(owner="me") == store.reserved_bytes()
    assert store.reserved_bytes(owner="someone else") == 0


def test_one_data_folder_serves_one_server(tmp_path):
    first = JobStore.open(tmp_path / "d")
    with pytest.raises(JobError) as e:
        JobStore.open(tmp_path / "d")
    assert e.value.kind is JobErrorKind.DATA_DIR and "in use" in e.value.message
    first.close()
    JobStore.open(tmp_path / "d").close()


V1_JOBS = """CREATE TABLE jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, body TEXT NOT NULL,
    format TEXT NOT NULL, seed INTEGER NOT NULL, est_audio_s REAL NOT NULL,
    est_bytes INTEGER NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    runs INTEGER NOT NULL DEFAULT 0, request_id TEXT, worker INTEGER,
    audio_s REAL NOT NULL DEFAULT 0, compute_s REAL, result_path TEXT,
    result_bytes INTEGER NOT NULL DEFAULT 0, error_code TEXT, error TEXT,
    finished_count INTEGER NOT NULL DEFAULT 0 CHECK (finished_count <= 1));
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
    at REAL NOT NULL, from_state TEXT, to_state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
PRAGMA user_version=1;"""


def test_a_database_from_version_1_opens_keeps_its_jobs_and_records_stop_reasons(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "jobs.db")
    old.executescript(V1_JOBS)
    old.execute(
        "INSERT INTO jobs (id, owner, state, body, format, seed, est_audio_s, est_bytes,"
        " created_at, finished_at, result_path, result_bytes, finished_count)"
        " VALUES ('old', 'me', 'done', '{}', 'wav', 1, 1.0, 10, ?, ?, 'results/old.wav', 10, 1)",
        (T0, T0 + 1),
    )
    old.commit()
    old.close()

    store = JobStore.open(data)
    try:
        before = store.get("old")
        assert before.state is JobState.DONE and before.stop_reason is None
        job_id = new_job(store, at=T0 + 2)
        assert store.claim(job_id, "r1", T0 + 3)
        done = {"result_path": "results/x.wav", "result_bytes": 5, "audio_s": 1.0}
        assert store.finish_done(
            job_id, compute_s=0.1, worker=0, at=T0 + 4, stop_reason="runaway_cap", **done
        )
        assert store.get(job_id).stop_reason == "runaway_cap"
        assert store.kept_results() == {"results/old.wav", "results/x.wav"}
    finally:
        store.close()
    conn = sqlite3.connect(data / "jobs.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    cols = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert {"stop_reason", "body_bytes", "idem_key", "idem_fp"} <= cols
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(jobs)")}
    assert "jobs_by_key" in indexes
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # converted: space returns
    conn.close()
    JobStore.open(data).close()  # a second open finds the column there and adds nothing


def test_paged_list_is_newest_first_and_per_owner(store):
    mine = [new_job(store, T0 + i) for i in range(5)]
    new_job(store, T0 + 10, owner="someone else")
    page, more = store.list("me", limit=2)
    assert [j.id for j in page] == mine[::-1][:2] and more
    page, more = store.list("me", limit=2, offset=4)
    assert [j.id for j in page] == [mine[0]] and not more


# ---- the runner over a fake pool --------------------------------------


def test_an_idempotency_key_gives_back_its_job_per_owner_and_refuses_another_body(store):
    def create(owner, body, idem):
        return store.create(
            uuid.uuid4().hex,
            owner=owner,
            body=body,
            fmt="wav",
            seed=1,
            est_audio_s=1.0,
            est_bytes=10,
            at=T0,
            idem=idem,
        )

    first = create("me", {"script": "Speaker 1: hi"}, ("k" * 16, "fp1"))
    again = create("me", {"script": "Speaker 1: hi"}, ("k" * 16, "fp1"))
    assert again.id == first.id
    assert len(store.list("me", limit=10, offset=0)[0]) == 1
    other = create("someone else", {"script": "Speaker 1: hi"}, ("k" * 16, "fp1"))
    assert other.id != first.id  # a key is the owner's own
    with pytest.raises(JobError) as e:
        create("me", {"script": "Speaker 1: bye"}, ("k" * 16, "fp2"))
    assert e.value.kind is JobErrorKind.KEY_REUSED and first.id in e.value.message
    store.cancel(first.id, T0 + 1)
    store.delete(first.id)  # once the job is gone, so is its key
    assert create("me", {"script": "Speaker 1: bye"}, ("k" * 16, "fp2")).id != first.id
