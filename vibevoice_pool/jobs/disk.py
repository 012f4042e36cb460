"""The job store's disk rules: what a job holds, the limits, a full disk told apart.

Limits          jobs_disk_limit_mb, jobs_owner_disk_mb, jobs_owner_max_active
check_room      DISK_LIMIT or OWNER_LIMIT for a new job that would pass them
HELD_SQL        what rows hold: a done (or cancelled) job its result, a queued or running
                one its expected result, and every kept body its size
is_disk_full    SQLITE_FULL or ENOSPC/EDQUOT/EFBIG (by code, never by message)
size_limited    a store file at the process's file size limit (SQLite says only
                "disk I/O error" for EFBIG)
storage_error   the JobError for a failed write: DISK_FULL or STORAGE
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import resource
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .records import JobError, JobErrorKind

log = logging.getLogger("vibevoice_pool")


@dataclass(frozen=True)
class Limits:
    """The disk and per-owner limits (settings jobs_disk_limit_mb, jobs_owner_disk_mb,
    jobs_owner_max_active)."""

    disk_bytes: int = 10240 * 2**20
    owner_disk_bytes: int = 2560 * 2**20
    owner_max_active: int = 200


# What a row holds on disk: its result once done, its expected result while it
# waits or runs, and its body while it is kept (old rows: the body's length).
HELD_SQL = (
    "COALESCE(SUM(CASE WHEN state IN ('done','cancelled') THEN result_bytes"
    " WHEN state IN ('queued','running') THEN est_bytes ELSE 0 END"
    " + COALESCE(body_bytes, LENGTH(body))), 0)"
)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def check_room(conn: sqlite3.Connection, lim: Limits, owner: str, est_bytes: int, size: int):
    """Raise DISK_LIMIT or OWNER_LIMIT when a new job of `owner` (its expected result
    est_bytes, its body `size` bytes) would pass the limits with what is held."""
    # a small body is written twice for a moment (the journal, then the database);
    # a big one goes to a file of its own, once
    need = est_bytes + size + (size if size <= BIG_BODY else 0)
    held = conn.execute(f"SELECT {HELD_SQL} FROM jobs").fetchone()[0]
    if held + need > lim.disk_bytes:
        raise JobError(
            JobErrorKind.DISK_LIMIT,
            f"jobs hold {_mb(held)} and this one needs about {_mb(need)} (its result and "
            f"its body); the limit is jobs_disk_limit_mb={lim.disk_bytes / 2**20:g}. Fetch "
            "and let old jobs expire, or raise the limit",
        )
    active, mine = conn.execute(
        f"SELECT COALESCE(SUM(state IN ('queued','running')), 0), {HELD_SQL} FROM jobs"
        " WHERE owner=?",
        (owner,),
    ).fetchone()
    if active >= lim.owner_max_active:
        raise JobError(
            JobErrorKind.OWNER_LIMIT,
            f"you have {active} jobs queued or running; the limit is "
            f"jobs_owner_max_active={lim.owner_max_active}. Wait for some to finish",
        )
    if mine + est_bytes + size > lim.owner_disk_bytes:
        raise JobError(
            JobErrorKind.OWNER_LIMIT,
            f"your jobs hold {_mb(mine)} and this one needs about {_mb(est_bytes + size)}; "
            f"one owner may hold jobs_owner_disk_mb={lim.owner_disk_bytes / 2**20:g}. Fetch "
            "or cancel some jobs first",
        )


RECLAIM_PAGES = 256  # free pages (1 MB) worth giving back to the disk
JOURNAL_LIMIT = 4 * 2**20  # the write-ahead log is cut back to this after a checkpoint
DROPPED_BODY = "{}"
LOW_SPACE = 2**20  # less free space than this under the data folder counts as full
BIG_BODY = 256 * 1024  # a body past this is kept in a file of its own
BODIES_DIR = "bodies"
PROGRESS_DIR = "progress"  # running jobs' saved audio and history (progress.py)
BODY_FILE_KEY = "$file"  # the database's body of a job whose body is a file


def is_disk_full(e: BaseException) -> bool:
    """SQLite's SQLITE_FULL, or ENOSPC/EDQUOT from the file system, or EFBIG (a
    file at the process's file size limit, RLIMIT_FSIZE, or the file system's)."""
    if isinstance(e, sqlite3.Error):
        return (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


SIZE_LIMIT_SLACK = 2**20  # a store file this close to the file size limit has reached it


def size_limited(folder: Path) -> int:
    """The process's file size limit (RLIMIT_FSIZE) in bytes when one of the store's
    files in `folder` has (nearly) reached it, else 0. SQLite reports a write past the
    limit (EFBIG) as a bare "disk I/O error"; this tells it apart."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.is_file() and entry.stat().st_size + SIZE_LIMIT_SLACK > soft:
                return soft
    return 0


def out_of_space(folder: Path) -> bool:
    """Whether the disk under `folder` has (almost) nothing left: what SQLite's
    "disk I/O error" means when it cannot even make its shared-memory file."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def storage_error(e: BaseException, folder: Path) -> JobError:
    limit = size_limited(folder) if isinstance(e, sqlite3.Error) else 0
    if limit:
        return JobError(
            JobErrorKind.DISK_FULL,
            f"the job store in {folder} reached this process's file size limit "
            f"(ulimit -f, {limit} bytes); new jobs wait until it is raised "
            "(live synthesis still works)",
        )
    if is_disk_full(e) or out_of_space(folder):
        return JobError(
            JobErrorKind.DISK_FULL,
            f"the disk of the data folder {folder} is full; new jobs wait until space is "
            "freed (live synthesis still works)",
        )
    if is_damaged(e):
        return damaged(e, folder / "jobs.db")
    return JobError(JobErrorKind.STORAGE, f"the job store in {folder} failed: {e}")


def damaged(e: BaseException, db: Path) -> JobError:
    """STORAGE for a damaged database file, with what the operator does about it."""
    return JobError(
        JobErrorKind.STORAGE,
        f"the job store {db} is damaged ({e}) and was left as it is; stop the server "
        f"and move the file aside (the next start makes a new, empty one), or recover "
        f"its jobs into a new file (sqlite3 {db.name} .recover), then start again",
    )


def is_damaged(e: BaseException) -> bool:
    """SQLite's SQLITE_CORRUPT or SQLITE_NOTADB: the file is not (or no longer) a sound
    database: cut short, overwritten, or not a database at all."""
    code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
    return isinstance(e, sqlite3.Error) and code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def open_error(e: sqlite3.Error, db: Path) -> JobError:
    """Why the database file `db` could not be opened: DISK_FULL (its disk is full),
    STORAGE (the file is damaged: the server serves without jobs; the file is left as it
    is for the operator), DATA_DIR (it cannot be used: the server does not start)."""
    if is_disk_full(e) or out_of_space(db.parent) or size_limited(db.parent):
        return storage_error(e, db.parent)
    if is_damaged(e):
        return damaged(e, db)
    return JobError(JobErrorKind.DATA_DIR, f"cannot open {db}: {e}")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def lock_folder(folder: Path, results: str, lock_name: str) -> int:
    """Make the folder (and its results folder) and take its lock; the lock's fd.
    JobError DATA_DIR when another server holds it or it cannot be made,
    DISK_FULL when the disk is full."""
    try:
        (folder / results).mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if is_disk_full(e):
            raise storage_error(e, folder) from e
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
    with contextlib.suppress(OSError):  # the pid is a courtesy: a full disk may refuse it
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
    return lock_fd


def write_atomic(path: Path, data, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a reader sees all of it or none of it:
    a temporary file beside it, fsync, rename over, fsync the folder. `data`: bytes,
    or a function that writes them to the (seekable, binary) file it is given."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "w+b", closefd=True) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def folder_bytes(folder: Path, db_name: str, results: Path) -> int:
    """What the data folder's files take: the database, its journal, the results,
    the body files and the running jobs' saved progress."""
    total = file_size(folder / db_name) + file_size(folder / (db_name + "-wal"))
    for sub in (results, folder / BODIES_DIR, folder / PROGRESS_DIR):
        with contextlib.suppress(FileNotFoundError):
            total += sum(file_size(p) for p in sub.iterdir() if p.is_file())
    return total


def reclaim_space(conn: sqlite3.Connection, wal: Path, force: bool) -> bool:
    """Incremental vacuum when RECLAIM_PAGES are free (or any, with `force`), and a
    checkpoint that truncates the journal; False when SQLite refused."""
    try:
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= RECLAIM_PAGES or (force and free):
            conn.executescript("PRAGMA incremental_vacuum;")  # steps it to the end
        if force or free >= RECLAIM_PAGES or file_size(wal) > JOURNAL_LIMIT:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error:
        return False
    return True


def _body_path(folder: Path, job_id: str) -> Path:
    return folder / BODIES_DIR / f"{job_id}.json"


def write_body(folder: Path, job_id: str, text: str) -> str:
    """Write a big body to its file; what the database keeps in its place.
    JobError DISK_FULL (or STORAGE) when it cannot be written (nothing is left)."""
    path = _body_path(folder, job_id)
    try:
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, text.encode())
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise storage_error(e, folder) from e
    return json.dumps({BODY_FILE_KEY: f"{BODIES_DIR}/{path.name}"})


def kept_secret(path: Path, size: int) -> bytes:
    """The secret kept at `path`: `size` random bytes as hex, made when missing (whole
    or not at all: write_atomic, mode 0600). A file shorter than that (empty: a server
    killed as it wrote one before writes were atomic) is replaced with a warning: a key
    that short would let anyone sign. OSError when it cannot be written."""
    with contextlib.suppress(FileNotFoundError):
        secret = path.read_bytes().strip()
        if len(secret) >= 2 * size:
            return secret
        log.warning("%s holds %d of %d characters: replaced", path, len(secret), 2 * size)
    secret = secrets.token_hex(size).encode()
    write_atomic(path, secret, mode=0o600)
    return secret


def read_body(folder: Path, stored: str) -> dict:
    body = json.loads(stored)
    if isinstance(body, dict) and BODY_FILE_KEY in body:
        body = json.loads((folder / body[BODY_FILE_KEY]).read_text(encoding="utf-8"))
    return body


def drop_body(folder: Path, job_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _body_path(folder, job_id).unlink()


def sweep_bodies(folder: Path, active: set[str]) -> None:
    """At start: body files (and their temporary files) of jobs no longer active."""
    with contextlib.suppress(FileNotFoundError):
        for path in (folder / BODIES_DIR).iterdir():
            if path.name.removesuffix(".json") not in active:
                with contextlib.suppress(OSError):
                    path.unlink()


def sweep_orphans(store) -> None:
    """At start: delete temporary files, results no done job names, ended jobs' bodies."""
    sweep_bodies(store.folder, store.running_ids(also_queued=True))
    kept = store.kept_results()
    for path in store.results.iterdir():
        if f"{store.results.name}/{path.name}" not in kept and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()


def write_result(store, path: Path, audio, fmt: str) -> int:
    """Encode a job's audio (a JobAudio: read from disk a block at a time, then its tail)
    straight into its file, written atomically within the store's disk limit; its size
    in bytes."""
    from vibevoice_pool import encoders

    size = 0

    def encode(f) -> None:
        nonlocal size
        encoders.write_whole(f, audio.pieces(), audio.made, fmt)
        size = f.seek(0, os.SEEK_END)
        held = store.result_bytes()
        if held + size > store.limit_bytes:  # the temporary file goes
            raise JobError(
                JobErrorKind.DISK_LIMIT,
                f"the result ({size} bytes) would pass jobs_disk_limit_mb="
                f"{store.limit_bytes / (1024 * 1024):g} ({held} bytes held)",
            )

    write_atomic(path, encode)
    return size
