"""JobStore: durable jobs, written down in SQLite before they run.

Owns the data folder (`--data-dir`):

    <data>/jobs.db        SQLite in WAL mode: the jobs table and the events table
    <data>/jobs.lock      held (flock) by the one server that uses this folder
    <data>/results/       one finished result per job, written by jobs/runner.py

Every state change is one compare-and-set UPDATE (`... WHERE id=? AND state IN
(...)`) in the same transaction as its row in `events`, so two racing callers
(the runner finishing a job, a user cancelling it) cannot both win:

    queued -> running -> done | failed | cancelled
      ^          |        (queued -> failed | cancelled as well)
      +----------+  requeue: at start, at shutdown, when the pool says "later"

`finished_count` counts the transitions into a terminal state; a CHECK keeps
it at most 1, so the database itself refuses a second finish. Finished jobs
expire after job_ttl_s; disk use (finished results plus what queued and running
jobs will write) stays under jobs_disk_limit_mb. No pool, no HTTP; times passed in.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from .schema import migrate

DB_NAME = "jobs.db"
LOCK_NAME = "jobs.lock"
RESULTS_DIR = "results"


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.RUNNING)
TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobErrorKind(str, enum.Enum):
    """What went wrong with a job request; the values are the API's error codes."""

    NOT_FOUND = "not_found"  # no such job (or it expired)
    NOT_READY = "not_ready"  # the audio of a job that has not finished
    CONFLICT = "conflict"  # cancelling a job that already finished
    DISK_LIMIT = "disk_limit"  # the results would pass jobs_disk_limit_mb
    STORAGE = "storage_error"  # the result could not be written (disk full, I/O error)
    DATA_DIR = "data_dir"  # the data folder cannot be used (in use, not writable)


class JobError(Exception):
    def __init__(self, kind: JobErrorKind, message: str):
        super().__init__(message)
        self.kind = JobErrorKind(kind)
        self.message = message

    def __repr__(self) -> str:
        return f"JobError({self.kind.value}: {self.message})"


@dataclass(frozen=True)
class Job:
    """One row of the jobs table (without the body, which can be large)."""

    id: str
    owner: str
    state: JobState
    format: str
    seed: int
    est_audio_s: float
    est_bytes: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    runs: int
    request_id: str | None
    worker: int | None
    audio_s: float
    compute_s: float | None
    result_path: str | None
    result_bytes: int
    error_code: str | None
    error: str | None
    finished_count: int
    stop_reason: str | None  # a StopReason value, once done

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


_COLUMNS = ", ".join(f.name for f in Job.__dataclass_fields__.values())


def _job(row: tuple) -> Job:
    return Job(row[0], row[1], JobState(row[2]), *row[3:])


class JobStore:
    """The jobs table. Thread-safe: one connection behind one lock."""

    def __init__(self, folder: Path, conn: sqlite3.Connection, lock_fd: int, limit_bytes: int):
        self.folder = folder
        self.results = folder / RESULTS_DIR
        self.limit_bytes = limit_bytes
        self._conn = conn
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, folder: str | Path, *, disk_limit_mb: float = 10240.0) -> JobStore:
        """Open (or create) the store in `folder`, taking its lock.
        JobError(DATA_DIR) if another server holds it or it cannot be written."""
        folder = Path(folder).expanduser()
        try:
            (folder / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JobError(
                JobErrorKind.DATA_DIR,
                f"cannot use {folder} for jobs ({e.strerror}); pass a writable --data-dir",
            ) from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(lock_fd)
            raise JobError(
                JobErrorKind.DATA_DIR,
                f"the data folder {folder} is in use by another vibevoice-pool server "
                f"(pid {holder}); give this one its own --data-dir",
            ) from None
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
        try:
            conn = sqlite3.connect(
                folder / DB_NAME, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a finished transition survives power loss
            migrate(conn)
        except sqlite3.Error as e:
            os.close(lock_fd)
            raise JobError(JobErrorKind.DATA_DIR, f"cannot open {folder / DB_NAME}: {e}") from e
        return cls(folder, conn, lock_fd, int(disk_limit_mb * 1024 * 1024))

    def close(self) -> None:
        with self._mutex:
            if self._lock_fd < 0:
                return
            self._conn.close()
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ---- reading -------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._mutex:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)
            ).fetchone()
        return _job(row) if row else None

    def body(self, job_id: str) -> dict:
        with self._mutex:
            row = self._conn.execute("SELECT body FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id}")
        return json.loads(row[0])

    def list(
        self, owner: str, *, limit: int = 20, offset: int = 0, state: JobState | None = None
    ) -> tuple[list[Job], bool]:
        """An owner's jobs, newest first; and whether more follow."""
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE owner=?"
        args: list = [owner]
        if state is not None:
            sql += " AND state=?"
            args.append(JobState(state).value)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
        args += [limit + 1, offset]
        with self._mutex:
            rows = self._conn.execute(sql, args).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def next_queued(self) -> Job | None:
        """The oldest queued job."""
        with self._mutex:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state='queued' "
                "ORDER BY created_at, rowid LIMIT 1"
            ).fetchone()
        return _job(row) if row else None

    def count(self, state: JobState) -> int:
        with self._mutex:
            return self._conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state=?", (JobState(state).value,)
            ).fetchone()[0]

    def events(self, job_id: str) -> list[tuple[str | None, str, str]]:
        """(from, to, detail) of every transition of a job, in order."""
        with self._mutex:
            return self._conn.execute(
                "SELECT from_state, to_state, detail FROM events WHERE job_id=? ORDER BY seq",
                (job_id,),
            ).fetchall()

    # ---- disk ----------------------------------------------------------

    def result_bytes(self) -> int:
        """Bytes of the results on disk (finished jobs)."""
        with self._mutex:
            return self._conn.execute(
                "SELECT COALESCE(SUM(result_bytes), 0) FROM jobs WHERE state='done'"
            ).fetchone()[0]

    def reserved_bytes(self) -> int:
        """Finished results plus what the queued and running jobs are expected to write."""
        with self._mutex:
            return self._conn.execute(
                "SELECT COALESCE(SUM(CASE WHEN state='done' THEN result_bytes ELSE est_bytes END), 0)"
                " FROM jobs WHERE state IN ('done', 'queued', 'running')"
            ).fetchone()[0]

    def _mb(self, n: int) -> str:
        return f"{n / (1024 * 1024):.1f} MB"

    # ---- transitions ---------------------------------------------------

    def _move(
        self,
        job_id: str,
        to: JobState,
        allowed: tuple[JobState, ...],
        detail: str,
        at: float,
        sets: str = "",
        args: tuple = (),
    ) -> JobState | None:
        """Compare-and-set: move a job in one of `allowed` to `to`, with the
        extra SET clauses; returns the state it left, or None if it was in none."""
        marks = ",".join("?" * len(allowed))
        finish = ", finished_count = finished_count + 1" if to in TERMINAL else ""
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    f"SELECT state FROM jobs WHERE id=? AND state IN ({marks})",
                    (job_id, *[s.value for s in allowed]),
                ).fetchone()
                if row is None:
                    self._conn.execute("ROLLBACK")
                    return None
                cur = self._conn.execute(
                    f"UPDATE jobs SET state=?{finish}{sets} WHERE id=? AND state=?",
                    (to.value, *args, job_id, row[0]),
                )
                assert cur.rowcount == 1  # the transaction holds the write lock
                self._conn.execute(
                    "INSERT INTO events (job_id, at, from_state, to_state, detail)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (job_id, at, row[0], to.value, detail),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return JobState(row[0])

    def create(
        self,
        job_id: str,
        *,
        owner: str,
        body: dict,
        fmt: str,
        seed: int,
        est_audio_s: float,
        est_bytes: int,
        at: float,
    ) -> Job:
        """Write a new queued job down. JobError(DISK_LIMIT) when its estimated
        result would not fit under the limit with what is already held."""
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                held = self._conn.execute(
                    "SELECT COALESCE(SUM(CASE WHEN state='done' THEN result_bytes"
                    " ELSE est_bytes END), 0) FROM jobs WHERE state IN ('done','queued','running')"
                ).fetchone()[0]
                if held + est_bytes > self.limit_bytes:
                    raise JobError(
                        JobErrorKind.DISK_LIMIT,
                        f"job results hold {self._mb(held)} and this one needs about "
                        f"{self._mb(est_bytes)}; the limit is jobs_disk_limit_mb="
                        f"{self.limit_bytes / (1024 * 1024):g}. Fetch and let old jobs expire, "
                        "or raise the limit",
                    )
                self._conn.execute(
                    "INSERT INTO jobs (id, owner, state, body, format, seed, est_audio_s,"
                    " est_bytes, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (job_id, owner, json.dumps(body), fmt, seed, est_audio_s, est_bytes, at),
                )
                self._conn.execute(
                    "INSERT INTO events (job_id, at, from_state, to_state, detail)"
                    " VALUES (?, ?, NULL, 'queued', 'submitted')",
                    (job_id, at),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self, job_id: str, request_id: str, at: float) -> bool:
        """queued -> running: this process has handed the job to the pool."""
        return (
            self._move(
                job_id,
                JobState.RUNNING,
                (JobState.QUEUED,),
                f"request {request_id}",
                at,
                ", started_at=?, runs=runs+1, request_id=?, worker=NULL, audio_s=0",
                (at, request_id),
            )
            is not None
        )

    def note_worker(self, job_id: str, worker: int | None) -> None:
        """The worker that runs it (no state change)."""
        with self._mutex:
            self._conn.execute(
                "UPDATE jobs SET worker=? WHERE id=? AND state='running'", (worker, job_id)
            )

    def requeue(self, job_id: str, why: str, at: float) -> bool:
        """running -> queued: it will run again from the start."""
        return self._move(job_id, JobState.QUEUED, (JobState.RUNNING,), why, at) is not None

    def requeue_unfinished(self, at: float) -> list[str]:
        """At start: every job a previous server left running is queued again.
        Returns the ids of the jobs to run (queued now), oldest first."""
        with self._mutex:
            running = [
                r[0] for r in self._conn.execute("SELECT id FROM jobs WHERE state='running'")
            ]
        for job_id in running:
            self.requeue(job_id, "the server restarted while it ran", at)
        with self._mutex:
            return [
                r[0]
                for r in self._conn.execute(
                    "SELECT id FROM jobs WHERE state='queued' ORDER BY created_at, rowid"
                )
            ]

    def finish_done(
        self,
        job_id: str,
        *,
        result_path: str,
        result_bytes: int,
        audio_s: float,
        compute_s: float | None,
        worker: int | None,
        at: float,
        stop_reason: str | None = None,
    ) -> bool:
        """running -> done, once. False if the job is no longer running (cancelled)."""
        return (
            self._move(
                job_id,
                JobState.DONE,
                (JobState.RUNNING,),
                f"{result_bytes} bytes, {audio_s:.3f} s of audio",
                at,
                ", finished_at=?, result_path=?, result_bytes=?, audio_s=?, compute_s=?, worker=?,"
                " stop_reason=?",
                (at, result_path, result_bytes, audio_s, compute_s, worker, stop_reason),
            )
            is not None
        )

    def fail(
        self, job_id: str, code: str, message: str, at: float, worker: int | None = None
    ) -> bool:
        """queued | running -> failed, once."""
        return (
            self._move(
                job_id,
                JobState.FAILED,
                ACTIVE,
                f"{code}: {message}",
                at,
                ", finished_at=?, error_code=?, error=?, worker=COALESCE(?, worker)",
                (at, code, message, worker),
            )
            is not None
        )

    def cancel(self, job_id: str, at: float) -> JobState:
        """queued | running -> cancelled; returns the state it left.
        JobError NOT_FOUND, or CONFLICT when it had already finished."""
        left = self._move(
            job_id,
            JobState.CANCELLED,
            ACTIVE,
            "cancelled by its owner",
            at,
            ", finished_at=?, error_code='cancelled', error='cancelled by its owner'",
            (at,),
        )
        if left is not None:
            return left
        job = self.get(job_id)
        if job is None:
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id} (it may have expired)")
        raise JobError(JobErrorKind.CONFLICT, f"job {job_id} already {job.state.value}")

    def expire(self, before: float) -> list[str]:
        """Forget jobs that finished before `before`; returns their result paths
        (relative to the folder) for the caller to delete."""
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self._conn.execute(
                    "SELECT id, result_path FROM jobs WHERE state IN ('done','failed','cancelled')"
                    " AND finished_at < ?",
                    (before,),
                ).fetchall()
                for job_id, _ in rows:
                    self._conn.execute("DELETE FROM events WHERE job_id=?", (job_id,))
                    self._conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return [path for _, path in rows if path]

    def kept_results(self) -> set[str]:
        """The result paths that finished jobs point at."""
        with self._mutex:
            return {
                r[0]
                for r in self._conn.execute(
                    "SELECT result_path FROM jobs WHERE state='done' AND result_path IS NOT NULL"
                )
            }
