"""JobStore: durable jobs, written down in SQLite before they run.

Owns the data folder (`--data-dir`):

    <data>/jobs.db        SQLite in WAL mode: the jobs table and the events table
    <data>/jobs.lock      held (flock) by the one server that uses this folder
    <data>/results/       one finished result per job, written by jobs/runner.py
    <data>/bodies/        the bodies over 256 KB of active jobs (disk.py)

Every state change is one compare-and-set UPDATE (`... WHERE id=? AND state IN
(...)`) in the same transaction as its row in `events`, so two racing callers
(the runner finishing a job, a user cancelling it) cannot both win:

    queued -> running -> done | failed | cancelled
      ^          |        (queued -> failed | cancelled as well)
      +----------+  requeue: at start, at shutdown, when the pool says "later"

`finished_count` counts the transitions into a terminal state; a CHECK keeps
it at most 1, so the database itself refuses a second finish. Finished jobs
expire after job_ttl_s; a cancelled one may keep the audio it made (keep_partial). No pool, no HTTP; times passed in.

Disk (Limits, disk.py): results, expected results and the bodies of active
jobs count against jobs_disk_limit_mb (a body goes when its job ends); one
owner holds at most owner_max_active active jobs and owner_disk_mb (OWNER_LIMIT).
Freed pages go back to the disk (reclaim). A full disk is DISK_FULL, never a 500.
Fairness (next_queued): the owner with the fewest running jobs goes first,
then the one served least recently, oldest first within; owners at the cap wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from pathlib import Path

from .disk import (
    BIG_BODY,
    DROPPED_BODY,
    HELD_SQL,
    JOURNAL_LIMIT,
    Limits,
    check_room,
    drop_body,
    folder_bytes,
    lock_folder,
    open_error,
    read_body,
    reclaim_space,
    storage_error,
    write_body,
)
from .records import (  # noqa: F401 (re-exported: the store's users import them from here)
    ACTIVE,
    COLUMNS,
    SHOWN_STATE_SQL,
    TERMINAL,
    Job,
    JobError,
    JobErrorKind,
    JobState,
    job_from_row,
)
from .schema import NewerStore, connect

DB_NAME = "jobs.db"
LOCK_NAME = "jobs.lock"
RESULTS_DIR = "results"


class JobStore:
    """The jobs table. Thread-safe: one connection behind one lock."""

    def __init__(
        self, folder: Path, conn: sqlite3.Connection, lock_fd: int, limits: Limits = Limits()
    ):
        self.folder = folder
        self.results = folder / RESULTS_DIR
        self.limits = limits
        self.limit_bytes = limits.disk_bytes
        self._conn = conn
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        disk_limit_mb: float = 10240.0,
        owner_disk_mb: float = 2560.0,
        owner_max_active: int = 200,
    ) -> JobStore:
        """Open (or create) the store in `folder`, taking its lock. JobError
        DATA_DIR if another server holds it, it cannot be written or a newer
        version wrote it, DISK_FULL when its disk is too full to open it, STORAGE
        when its file is damaged (disk.open_error)."""
        folder = Path(folder).expanduser()
        limits = Limits(int(disk_limit_mb * 2**20), int(owner_disk_mb * 2**20), owner_max_active)
        lock_fd = lock_folder(folder, RESULTS_DIR, LOCK_NAME)
        try:
            conn = connect(folder / DB_NAME, JOURNAL_LIMIT)
        except NewerStore as e:
            os.close(lock_fd)
            raise JobError(JobErrorKind.DATA_DIR, f"{folder / DB_NAME} {e}") from None
        except sqlite3.Error as e:
            os.close(lock_fd)
            raise open_error(e, folder / DB_NAME) from e
        return cls(folder, conn, lock_fd, limits)

    def close(self) -> None:
        with self._mutex:
            if self._lock_fd < 0:
                return
            self._conn.close()
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # ---- reading -------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._read():
            row = self._conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return job_from_row(row) if row else None

    def body(self, job_id: str) -> dict:
        with self._read():
            row = self._conn.execute("SELECT body FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id}")
        try:
            return read_body(self.folder, row[0])
        except (OSError, ValueError) as e:  # its file gone or damaged: it can never run
            raise JobError(
                JobErrorKind.STORAGE, f"the stored request of job {job_id} cannot be read: {e}"
            ) from None

    def list(
        self, owner: str, *, limit: int = 20, offset: int = 0, state: JobState | None = None
    ) -> tuple[list[Job], bool]:
        """An owner's jobs, newest first; and whether more follow."""
        sql = f"SELECT {COLUMNS} FROM jobs WHERE owner=?"
        args: list = [owner]
        if state is not None:  # as shown: running once a worker has begun it
            sql += SHOWN_STATE_SQL.get(JobState(state), " AND state=?")
            args += [] if JobState(state) in SHOWN_STATE_SQL else [JobState(state).value]
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
        args += [limit + 1, offset]
        with self._read():
            rows = self._conn.execute(sql, args).fetchall()
        return [job_from_row(r) for r in rows[:limit]], len(rows) > limit

    def next_queued(self, max_running: int | None = None) -> Job | None:
        """The next job to run (see Fairness in the module doc); owners with
        `max_running` jobs running already are passed over."""
        cap = max_running if max_running is not None else 2**62
        with self._read():
            row = self._conn.execute(
                "SELECT q.owner,"
                " (SELECT COUNT(*) FROM jobs r WHERE r.owner=q.owner AND r.state='running') AS n,"
                " (SELECT MAX(started_at) FROM jobs s WHERE s.owner=q.owner) AS served"
                " FROM jobs q WHERE q.state='queued' GROUP BY q.owner HAVING n < ?"
                " ORDER BY n, COALESCE(served, 0), MIN(q.created_at) LIMIT 1",
                (cap,),
            ).fetchone()
            if row is None:
                return None
            job = self._conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE owner=? AND state='queued'"
                " ORDER BY created_at, rowid LIMIT 1",
                (row[0],),
            ).fetchone()
        return job_from_row(job) if job else None

    def running_ids(self, also_queued: bool = False) -> set[str]:
        states = "('running', 'queued')" if also_queued else "('running')"
        with self._read():
            rows = self._conn.execute(f"SELECT id FROM jobs WHERE state IN {states}").fetchall()
        return {r[0] for r in rows}

    def events(self, job_id: str) -> list[tuple[str | None, str, str]]:
        """(from, to, detail) of every transition of a job, in order."""
        with self._read():
            return self._conn.execute(
                "SELECT from_state, to_state, detail FROM events WHERE job_id=? ORDER BY seq",
                (job_id,),
            ).fetchall()

    # ---- disk ----------------------------------------------------------

    def result_bytes(self) -> int:
        """Bytes of the results on disk (finished jobs)."""
        with self._read():
            return self._conn.execute(
                "SELECT COALESCE(SUM(result_bytes), 0) FROM jobs WHERE state IN ('done','cancelled')"
            ).fetchone()[0]

    def reserved_bytes(self, owner: str | None = None) -> int:
        """What the jobs hold or will write (see Disk in the module doc), of one owner or all."""
        with self._read():
            if owner is None:
                return self._conn.execute(f"SELECT {HELD_SQL} FROM jobs").fetchone()[0]
            return self._conn.execute(
                f"SELECT {HELD_SQL} FROM jobs WHERE owner=?", (owner,)
            ).fetchone()[0]

    def disk_bytes(self) -> int:
        """What the data folder's files take now (disk.folder_bytes)."""
        return folder_bytes(self.folder, DB_NAME, self.results)

    def reclaim(self, force: bool = False) -> bool:
        """Give freed pages back to the disk and cut the journal back, when there is
        enough to give (or `force`). False when the disk refused even that."""
        with self._mutex:
            return reclaim_space(self._conn, self.folder / (DB_NAME + "-wal"), force)

    @contextlib.contextmanager
    def _read(self):
        """A read under the mutex; SQLite's errors become JobError, as a write's do."""
        with self._mutex:
            try:
                yield
            except sqlite3.Error as e:
                raise storage_error(e, self.folder) from e

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction under the mutex; SQLite's errors become JobError
        (DISK_FULL when the disk is full, STORAGE otherwise)."""
        with self._mutex:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise storage_error(e, self.folder) from e
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise storage_error(e, self.folder) from e
                raise

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
        finish = ""
        if to in TERMINAL:  # counted once; the body is no longer needed
            finish = f", finished_count = finished_count + 1, body='{DROPPED_BODY}', body_bytes=0"
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT state FROM jobs WHERE id=? AND state IN ({marks})",
                (job_id, *[s.value for s in allowed]),
            ).fetchone()
            if row is None:
                return None
            cur = conn.execute(
                f"UPDATE jobs SET state=?{finish}{sets} WHERE id=? AND state=?",
                (to.value, *args, job_id, row[0]),
            )
            assert cur.rowcount == 1  # the transaction holds the write lock
            conn.execute(
                "INSERT INTO events (job_id, at, from_state, to_state, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, at, row[0], to.value, detail),
            )
        if to in TERMINAL:
            drop_body(self.folder, job_id)
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
        idem: tuple[str, str] | None = None,
    ) -> Job:
        """Write a new queued job down. JobError DISK_LIMIT when it would not fit
        under the limit with what is already held, OWNER_LIMIT past its owner's
        share, DISK_FULL when the disk refuses it. `idem`: the client's Idempotency-Key
        and its body's fingerprint; a key this owner sent before gives back the job it
        made (another id than job_id), or KEY_REUSED with another body."""
        text = json.dumps(body)
        size = len(text.encode())
        with self._tx() as conn:
            row = None
            if idem is not None:  # the same key again: that job, if the body is the same
                row = conn.execute(
                    "SELECT id, idem_fp FROM jobs WHERE owner=? AND idem_key=?", (owner, idem[0])
                ).fetchone()
            if row is not None:
                if row[1] != idem[1]:
                    raise JobError(
                        JobErrorKind.KEY_REUSED,
                        f"Idempotency-Key {idem[0]!r} was sent with another body (job "
                        f"{row[0]}); use a new key for a new job",
                    )
                job_id = row[0]  # answered below, out of the transaction
            else:
                check_room(conn, self.limits, owner, est_bytes, size)
                row = (job_id, owner, text, size, fmt, seed, est_audio_s, est_bytes, at)
                self._insert(conn, row, idem or (None, None))
        job = self.get(job_id)
        assert job is not None
        return job

    def _insert(self, conn: sqlite3.Connection, row: tuple, idem: tuple) -> None:
        """A new queued job's row, its body in a file of its own when big."""
        job_id, text, size = row[0], row[2], row[3]
        stored = write_body(self.folder, job_id, text) if size > BIG_BODY else text
        try:
            conn.execute(
                "INSERT INTO jobs (id, owner, body, body_bytes, format, seed, est_audio_s,"
                " est_bytes, created_at, idem_key, idem_fp, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                (job_id, row[1], stored, *row[3:], *idem),
            )
            conn.execute(
                "INSERT INTO events (job_id, at, from_state, to_state, detail)"
                " VALUES (?, ?, NULL, 'queued', 'submitted')",
                (job_id, row[8]),
            )
        except BaseException:
            drop_body(self.folder, job_id)
            raise

    def claim(self, job_id: str, request_id: str, at: float) -> bool:
        """queued -> running: this process has handed the job to the pool."""
        sets = ", started_at=NULL, runs=runs+1, request_id=?, worker=NULL, audio_s=0"
        why, queued = f"request {request_id}", (JobState.QUEUED,)
        left = self._move(job_id, JobState.RUNNING, queued, why, at, sets, (request_id,))
        return left is not None

    def note_worker(self, job_id: str, worker: int | None, at: float) -> None:
        """A worker has begun it (no state change; until then it shows as queued); no
        worker: it gave its place up and waits for one (shows as queued; started_at stays)."""
        sql = "UPDATE jobs SET worker=?, started_at=COALESCE(started_at, ?) WHERE id=?"
        with self._tx() as conn:
            conn.execute(sql + " AND state='running'", (worker, at, job_id))

    def requeue(self, job_id: str, why: str, at: float) -> bool:
        """running -> queued: it will run again from the start."""
        return self._move(job_id, JobState.QUEUED, (JobState.RUNNING,), why, at) is not None

    def requeue_unfinished(self, at: float) -> list[str]:
        """At start: every job a previous server left running is queued again.
        Returns the ids of the jobs to run (queued now), oldest first."""
        with self._read():
            running = [
                r[0] for r in self._conn.execute("SELECT id FROM jobs WHERE state='running'")
            ]
        for job_id in running:
            self.requeue(job_id, "the server restarted while it ran", at)
        with self._read():
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

    def keep_partial(
        self, job_id: str, result_path: str, result_bytes: int, audio_s: float, worker: int | None
    ) -> bool:
        """A cancelled job's result: the audio it made before its cancel (no state change).
        False when it is no longer a cancelled job without one (deleted, expired)."""
        sql = "UPDATE jobs SET result_path=?, result_bytes=?, audio_s=?, worker=COALESCE(?, worker)"
        sql += " WHERE id=? AND state='cancelled' AND result_path IS NULL"
        with self._tx() as conn:
            cur = conn.execute(sql, (result_path, result_bytes, audio_s, worker, job_id))
        return cur.rowcount == 1

    def delete(self, job_id: str) -> Job:
        """Forget a finished job (its row, its events, its result file); the job as
        it was. JobError NOT_FOUND, or CONFLICT while it is queued or running."""
        job = self.get(job_id)
        if job is None:
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id} (it may have expired)")
        with self._tx() as conn:
            gone = conn.execute(
                "DELETE FROM jobs WHERE id=? AND state IN ('done','failed','cancelled')", (job_id,)
            ).rowcount
            if not gone:
                raise JobError(JobErrorKind.CONFLICT, f"job {job_id} is {job.state.value}")
            conn.execute("DELETE FROM events WHERE job_id=?", (job_id,))
        drop_body(self.folder, job_id)
        if job.result_path:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / job.result_path).unlink()
        return job

    def expire(self, before: float) -> list[str]:
        """Forget jobs that finished before `before`; returns their result paths
        (relative to the folder) for the caller to delete."""
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id, result_path FROM jobs WHERE state IN ('done','failed','cancelled')"
                " AND finished_at < ?",
                (before,),
            ).fetchall()
            for job_id, _ in rows:
                conn.execute("DELETE FROM events WHERE job_id=?", (job_id,))
                conn.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return [path for _, path in rows if path]

    def kept_results(self) -> set[str]:
        """The result paths that finished jobs point at (a cancelled job's: what it made)."""
        with self._read():
            return {
                r[0]
                for r in self._conn.execute(
                    "SELECT result_path FROM jobs WHERE result_path IS NOT NULL"
                    " AND state IN ('done','cancelled')"
                )
            }
