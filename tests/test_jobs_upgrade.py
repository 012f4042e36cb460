"""The server's state on disk across versions and damage: a job store written by an
older or a newer version, a migration killed half-way, damaged files at launch."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

import pytest
from conftest import Server, wait_until

from vibevoice_pool.jobs.schema import SCHEMA_VERSION
from vibevoice_pool.jobs.store import JobError, JobErrorKind, JobStore

T0 = 1_000_000.0


def add_job(store: JobStore, job_id: str) -> None:
    store.create(
        job_id,
        owner="me",
        body={"script": "Speaker 1: hi"},
        fmt="wav",
        seed=1,
        est_audio_s=1.0,
        est_bytes=10,
        at=T0,
    )


def from_a_newer_version(data) -> None:
    """The store in `data` as a newer version could leave it: a higher user_version
    and a column this version does not know."""
    store = JobStore.open(data)
    add_job(store, "kept")
    store.close()
    conn = sqlite3.connect(data / "jobs.db")
    conn.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()


def test_a_store_from_a_newer_version_is_refused_and_left_as_it_is(tmp_path):
    data = tmp_path / "data"
    from_a_newer_version(data)
    before = (data / "jobs.db").read_bytes()
    with pytest.raises(JobError) as e:
        JobStore.open(data)
    assert e.value.kind is JobErrorKind.DATA_DIR
    assert f"version {SCHEMA_VERSION + 1}" in e.value.message
    assert f"up to {SCHEMA_VERSION}" in e.value.message and "newer" in e.value.message
    assert (data / "jobs.db").read_bytes() == before  # not written: the newer one reads it
    conn = sqlite3.connect(data / "jobs.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # as the operator's newer one...
    conn.commit()
    conn.close()
    store = JobStore.open(data)  # ...the folder's lock was let go with the refusal
    assert store.get("kept") is not None
    store.close()


def test_a_launch_on_a_newer_store_stops_with_one_line_before_any_worker(tmp_path):
    from_a_newer_version(tmp_path / "cache" / "data")  # the default --data-dir
    s = Server(["--engine", "sim", "--gpus", "cpu:1"], tmp_path)
    try:
        assert s.proc.wait(60) == 2
        log = s.log()
        assert "Traceback" not in log and "Initialising" not in log
        lines = [line for line in log.splitlines() if "newer vibevoice-pool" in line]
        assert len(lines) == 1 and f"version {SCHEMA_VERSION + 1}" in lines[0]
    finally:
        s.stop()


def damaged_store(data, jobs: int = 2000) -> bytes:
    """A store of `jobs` queued jobs, a stretch in its middle overwritten (as a bad
    disk or a careless copy leaves it): SQLite opens it, and a query over its jobs
    fails half-way. Its bytes, as damaged."""
    store = JobStore.open(data)
    for i in range(jobs):
        store.create(
            f"job{i}",
            owner=f"owner{i % 50}",
            body={"script": "Speaker 1: hello there " * 10},
            fmt="wav",
            seed=1,
            est_audio_s=1.0,
            est_bytes=10,
            at=T0 + i,
        )
    store.close()
    raw = bytearray((data / "jobs.db").read_bytes())
    half = len(raw) // 2
    raw[half : half + 64 * 1024] = bytes(range(256)) * 256
    (data / "jobs.db").write_bytes(bytes(raw))
    return bytes(raw)


@pytest.mark.parametrize("damage", ["middle", "garbage", "cut"])
def test_a_damaged_store_is_refused_at_open_and_left_as_it_is(tmp_path, damage):
    data = tmp_path / "data"
    if damage == "middle":
        before = damaged_store(data)
    else:
        damaged_store(data, jobs=200)
        raw = (data / "jobs.db").read_bytes()
        before = raw[:100] if damage == "cut" else b"not a database\n" * 500
        (data / "jobs.db").write_bytes(before)
    with pytest.raises(JobError) as e:
        JobStore.open(data)
    assert e.value.kind is JobErrorKind.STORAGE  # the server serves on without jobs
    assert "damaged" in e.value.message and ".recover" in e.value.message
    assert (data / "jobs.db").read_bytes() == before
    (data / "jobs.db").rename(data / "jobs.db.damaged")  # as the message says
    JobStore.open(data).close()  # a new one; the lock was let go


def test_a_launch_on_a_damaged_store_serves_without_jobs_and_says_why(tmp_path):
    data = tmp_path / "cache" / "data"
    before = damaged_store(data)
    s = Server(["--engine", "sim", "--gpus", "cpu:1"], tmp_path)
    try:
        s.wait_ready()
        assert s.get("/health").status_code == 200
        jobs = s.get("/v1/jobs")
        assert jobs.status_code == 503
        error = jobs.json()["error"]
        assert error["code"] == "jobs_unavailable" and "damaged" in error["message"]
        assert "restart it once there is space" not in error["message"]
        log = s.log()
        assert "Traceback" not in log
        assert len([line for line in log.splitlines() if "is damaged" in line]) == 1
    finally:
        s.stop()
    assert (data / "jobs.db").read_bytes() == before  # left for the operator to recover


@dataclass(frozen=True)
class Req:  # what resume reads of a request: a copy of it carries the saved history
    resume: object = None


@pytest.mark.parametrize("damage", ["cut", "flipped", "empty", "steps cut"])
def test_a_damaged_saved_history_runs_the_job_from_its_start(tmp_path, caplog, damage):
    """A job's saved history (progress/<id>.hist, and the steps it counts in .steps)
    damaged on disk: the job runs again from its start, with a warning, instead of
    failing as 'building the request failed' (a cut npz is zipfile.BadZipFile, an
    empty one EOFError)."""
    import numpy as np

    from vibevoice_pool.jobs.progress import Progress
    from workers.wire.history import History, HistoryDelta

    progress = Progress(tmp_path)
    tokens, feedback = b"\x01" * 60, b"\x02" * 240  # 15 steps, 4 values each
    progress._save(
        "j", np.ones(2400, dtype=np.float32), 0, HistoryDelta(0, tokens, feedback, 4, 2400)
    )
    request = Req()
    hist = History(tokens, feedback, 4, 2400, None)
    assert progress.resume("j", request)[0].resume == hist  # sound: it resumes
    path = tmp_path / "progress" / ("j.steps" if damage == "steps cut" else "j.hist")
    raw = path.read_bytes()
    at = raw.find(np.array([4, 2400], dtype=np.int64).tobytes()) + 9  # in the counts
    assert at > 9 or damage == "steps cut"
    damaged = {
        "cut": raw[: len(raw) // 2],
        "steps cut": raw[: len(raw) // 2],
        "empty": b"",
        "flipped": raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :],
    }
    path.write_bytes(damaged[damage])
    again, audio = Progress(tmp_path).resume("j", request)
    assert again is request and audio.made == 0
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_a_current_store_short_of_a_column_is_mended_at_open(tmp_path):
    """user_version says current, but a column is gone (a hand edit, a tool that copied
    the table): the open adds it back, instead of every new job failing with
    'table jobs has no column named idem_fp'."""
    data = tmp_path / "data"
    store = JobStore.open(data)
    add_job(store, "kept")
    store.close()
    conn = sqlite3.connect(data / "jobs.db")
    conn.execute("DROP INDEX jobs_by_key")
    conn.execute("ALTER TABLE jobs DROP COLUMN idem_fp")
    conn.commit()
    conn.close()
    store = JobStore.open(data)
    try:
        add_job(store, "new")
        assert store.get("kept") is not None and store.get("new") is not None
    finally:
        store.close()


KILLED_MIGRATION = """
import os, signal, sqlite3, sys
from vibevoice_pool.jobs.store import JobStore

at, mid = sys.argv[2], sys.argv[3] == "mid"
connect = sqlite3.connect
steps = []

def traced(*args, **kw):
    conn = connect(*args, **kw)
    def kill(sql):  # as the statement starts, or (mid) some way into it
        if at in sql and not mid:
            os.kill(os.getpid(), signal.SIGKILL)
        steps.append(at in sql)
    def midway():
        if steps and steps[-1]:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0
    conn.set_trace_callback(kill)
    conn.set_progress_handler(midway, 5000)
    return conn

sqlite3.connect = traced
JobStore.open(sys.argv[1])
print("not killed")
"""


@pytest.mark.parametrize(
    "at, mid",
    [
        ("VACUUM", "mid"),
        ("VACUUM", "start"),
        ("CREATE INDEX IF NOT EXISTS jobs_by_owner", "start"),
        ("ADD COLUMN idem_key", "start"),
        ("UNIQUE", "start"),
    ],
)
def test_an_upgrade_killed_half_way_is_finished_by_the_next_open(tmp_path, at, mid):
    """A server SIGKILLed while it upgrades a version 1 store (in the middle of its VACUUM,
    before it, between its CREATEs, between two ADD COLUMNs, before user_version): the
    next open finishes the upgrade, and the old jobs are all there."""
    import subprocess
    import sys

    from test_jobs_store import V1_JOBS

    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "jobs.db")
    old.executescript(V1_JOBS)
    for i in range(2000):  # enough rows that the VACUUM is killed in its middle
        old.execute(
            "INSERT INTO jobs (id, owner, state, body, format, seed, est_audio_s, est_bytes,"
            " created_at) VALUES (?, 'old', 'queued', ?, 'wav', 1, 1.0, 10, ?)",
            (f"old{i}", '{"script": "Speaker 1: %s"}' % ("x" * 2000), T0 + i),  # pages to copy
        )
    old.commit()
    old.close()
    run = subprocess.run(
        [sys.executable, "-c", KILLED_MIGRATION, str(data), at, mid], capture_output=True, text=True
    )
    assert run.returncode == -9, run.stdout + run.stderr  # killed where asked
    store = JobStore.open(data)
    try:
        assert len(store.list("old", limit=5000)[0]) == 2000
        add_job(store, "new")
        assert store.get("new").state.value == "queued"
    finally:
        store.close()
    conn = sqlite3.connect(data / "jobs.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    conn.close()


@pytest.mark.parametrize("damage", ["gone", "cut"])
def test_a_job_whose_stored_body_is_gone_fails_and_the_next_one_runs(tmp_path, caplog, damage):
    """A queued job's large body (bodies/<id>.json) deleted or cut short on disk: the job
    fails storage_error, with one line saying why, and the job behind it runs. (A missing
    file was JobError NOT_FOUND, which the runner took for a job gone meanwhile: it picked
    the same job again at once, for ever, and no job ran.)"""
    from jobs_fakes import SCRIPT, FakePool, build, wait_state

    from vibevoice_pool.jobs.runner import JobRunner
    from vibevoice_pool.jobs.store import JobState

    store = JobStore.open(tmp_path / "data")
    for job_id, body, at in (
        ("big", {"script": SCRIPT, "pad": "x" * 300_000}, T0),  # past 256 KB: a file
        ("next", {"script": SCRIPT}, T0 + 1),
    ):
        store.create(
            job_id, owner="me", body=body, fmt="wav", seed=1, est_audio_s=4.0, est_bytes=10, at=at
        )
    (path,) = (tmp_path / "data" / "bodies").iterdir()
    if damage == "gone":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:1000])
    runner = JobRunner(store, FakePool(), build, queue_depth=2).start()
    try:
        failed = wait_state(runner, "big", JobState.FAILED)
        assert failed.error_code == "storage_error" and "cannot be read" in failed.error
        wait_state(runner, "next", JobState.DONE)
    finally:
        runner.stop()
    assert not [r for r in caplog.records if r.exc_info]  # said in a line, no traceback
    assert [r for r in caplog.records if "job big failed: storage_error" in r.getMessage()]


def test_a_result_cut_short_on_disk_is_a_typed_error_not_a_broken_file(tmp_path, caplog):
    """A done job's result file cut short (a disk fault, a copy of the data folder taken
    while it was written): GET .../audio answers 500 storage_error saying so, and the log
    names the file, instead of 200 with a file that does not decode."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from jobs_fakes import SCRIPT, FakePool, build, wait_state

    from vibevoice_pool.api.jobs import jobs_router
    from vibevoice_pool.jobs.runner import JobRunner
    from vibevoice_pool.jobs.store import JobState

    class Front:
        class cfg:
            api_key = ""

    runner = JobRunner(JobStore.open(tmp_path / "data"), FakePool(), build, queue_depth=2)
    runner.start()
    try:
        app = FastAPI()
        app.include_router(jobs_router(Front(), runner))
        client = TestClient(app)
        sent = client.post("/v1/jobs", json={"script": SCRIPT})
        job = wait_state(runner, sent.json()["id"], JobState.DONE)
        mine = {"X-Owner-Token": sent.headers["x-owner-token"]}
        whole = client.get(f"/v1/jobs/{job.id}/audio", headers=mine)
        assert whole.status_code == 200 and len(whole.content) == job.result_bytes
        path = runner.result_file(job)
        path.write_bytes(whole.content[: len(whole.content) // 2])
        cut = client.get(f"/v1/jobs/{job.id}/audio", headers=mine)
        assert cut.status_code == 500
        error = cut.json()["error"]
        assert error["code"] == "storage_error" and "damaged" in error["message"]
        assert any(str(path) in r.getMessage() for r in caplog.records)
    finally:
        runner.stop()


@pytest.mark.parametrize("name, size", [("owner.secret", 32), ("page.secret", 16)])
def test_a_secret_file_left_empty_is_replaced_not_used_as_an_empty_key(
    tmp_path, caplog, name, size
):
    """A server killed between making a secret file and writing it left it empty, and
    the next start read b"" as the key: anyone could then sign an owner token (HMAC
    under an empty key). Such a file is now replaced, with a warning."""
    import base64
    import hashlib
    import hmac

    from vibevoice_pool.api.jobs import OwnerTokens

    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(b"")  # as the kill left it
    if name == "owner.secret":
        tokens = OwnerTokens.in_folder(data)
        part = "A" * 32  # a token anyone could make under an empty key
        mac = hmac.new(b"", part.encode(), hashlib.sha256).digest()
        forged = part + base64.urlsafe_b64encode(mac).decode()[:22]
        assert not tokens.valid(forged)
        assert tokens.valid(tokens.mint())
        secret = tokens._secret
        again = OwnerTokens.in_folder(data)._secret
    else:
        from vibevoice_pool.ui.jobs import _secret

        secret, again = _secret(data).encode(), _secret(data).encode()
    assert len(secret) == 2 * size and (data / name).read_bytes() == secret  # kept now
    assert (data / name).stat().st_mode & 0o777 == 0o600
    assert again == secret  # and used again at the next start, not replaced
    assert any(name in r.getMessage() and "replaced" in r.getMessage() for r in caplog.records)


def test_a_store_damaged_while_serving_is_a_typed_error_said_once(tmp_path, caplog):
    """A jobs.db damaged while the server ran (a bad disk under it) made each read
    raise sqlite3.DatabaseError: the runner logged a traceback every tick (0.5 s),
    and /v1/jobs answered a bare 500. A read's SQLite error is now a JobError, as a
    write's was: STORAGE naming the damaged file and what to do, which the runner
    says once and waits on, as for a full disk."""
    from jobs_fakes import FakePool, build

    from vibevoice_pool.jobs.runner import JobRunner

    data = tmp_path / "data"
    store = JobStore.open(data)
    for i in range(2000):
        body = {"script": "Speaker 1: hello there " * 10}
        args = dict(fmt="wav", seed=1, est_audio_s=1.0, est_bytes=10, at=T0 + i)
        store.create(f"job{i}", owner=f"owner{i % 50}", body=body, **args)
    with caplog.at_level("INFO", logger="vibevoice_pool"):
        runner = JobRunner(store, FakePool(), build, queue_depth=2).start()  # serving
        try:
            store._conn.execute("PRAGMA cache_size=1")  # a busy server's: other pages in it
            store._conn.execute("PRAGMA shrink_memory")
            with open(data / "jobs.db", "r+b") as f:  # the bad disk, under the running store
                f.seek(f.seek(0, 2) // 2)
                f.write(bytes(range(256)) * 256)
            caplog.clear()
            with pytest.raises(JobError) as e:
                store.running_ids(also_queued=True)
            wait_until(lambda: "is damaged" in caplog.text, 10, what="the damage said")
            time.sleep(1.5)  # three more ticks of the runner
        finally:
            runner.stop(0)
    assert e.value.kind is JobErrorKind.STORAGE
    assert "is damaged" in e.value.message and ".recover" in e.value.message
    said = [r for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None, caplog.text
    assert "the runner hit an error" not in caplog.text
