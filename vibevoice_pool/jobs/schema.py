"""The SQLite schema of the job store, and its upgrade from older versions.

A data folder written by an older server opens as it is: `migrate` creates
what is missing and adds the columns later versions brought (ALTER TABLE ADD
COLUMN, nullable, so old rows read as NULL). PRAGMA user_version records the
version the file now has. A file that is already current is not written at
all, so a server starts on a full disk. A file a newer version wrote (a higher
user_version) is refused as it is (NewerStore), never written: this version
cannot know what that one's rows mean, and setting its version back would make
the newer one skip its own upgrade later.

Space: the file is made with auto_vacuum=INCREMENTAL (a file from before is
converted by one VACUUM when it is upgraded), so the pages that expired jobs
and dropped bodies free can be given back to the disk (JobStore.reclaim).
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    state          TEXT NOT NULL
                   CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    body           TEXT NOT NULL,             -- the /v1/synthesize body, seed fixed
    format         TEXT NOT NULL,
    seed           INTEGER NOT NULL,
    est_audio_s    REAL NOT NULL,
    est_bytes      INTEGER NOT NULL,          -- reserved against the disk limit
    created_at     REAL NOT NULL,
    started_at     REAL,                      -- the latest run
    finished_at    REAL,
    runs           INTEGER NOT NULL DEFAULT 0,
    request_id     TEXT,                      -- the pool request of the latest run
    worker         INTEGER,
    audio_s        REAL NOT NULL DEFAULT 0,
    compute_s      REAL,
    result_path    TEXT,                      -- relative to the data folder
    result_bytes   INTEGER NOT NULL DEFAULT 0,
    error_code     TEXT,
    error          TEXT,
    finished_count INTEGER NOT NULL DEFAULT 0 CHECK (finished_count <= 1),
    stop_reason    TEXT,                      -- version 2: why the model stopped
    body_bytes     INTEGER,                   -- version 3: the body's size while it is kept
    idem_key       TEXT,                      -- version 4: the client's Idempotency-Key
    idem_fp        TEXT                       -- version 4: its body's fingerprint
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at DESC);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner_state ON jobs (owner, state);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT NOT NULL,
    at         REAL NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""

# Columns added after version 1: (name, SQL type). Each must be nullable.
ADDED_COLUMNS = (
    ("stop_reason", "TEXT"),
    ("body_bytes", "INTEGER"),
    ("idem_key", "TEXT"),
    ("idem_fp", "TEXT"),
)
# made once its columns are there (after ADD COLUMN in an older file)
_KEYED = "CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (owner, idem_key)"


INCREMENTAL = 2  # PRAGMA auto_vacuum's value


def connect(path, journal_limit: int) -> sqlite3.Connection:
    """The store's connection to the file at `path`: WAL, every commit synced, the
    file checked whole (check_intact) and brought to SCHEMA_VERSION (migrate).
    sqlite3.Error or NewerStore (the connection closed) when it cannot be used."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a finished transition survives power loss
        conn.execute(f"PRAGMA journal_size_limit={journal_limit}")
        check_intact(conn)  # damage found now, not by a query while it serves
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def check_intact(conn: sqlite3.Connection) -> None:
    """sqlite3.DatabaseError (SQLITE_CORRUPT) when the file's pages do not hold together
    (PRAGMA quick_check: a file cut short or overwritten in part, which opens but fails
    in the middle of a query later); before anything is written to it."""
    found = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    if found != "ok":
        err = sqlite3.DatabaseError(f"database disk image is malformed: {found}")
        err.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
        raise err


class NewerStore(Exception):
    """The file was written by a newer version of the server (its schema `version`)."""

    def __init__(self, version: int):
        super().__init__(
            f"was written by a newer vibevoice-pool (job store version {version}; this "
            f"version reads up to {SCHEMA_VERSION}); it is left as it is: run the newer "
            "version on it, or give this one another --data-dir (or the copy of the data "
            "folder kept from before the upgrade)"
        )
        self.version = version


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database on `conn` to SCHEMA_VERSION (a new file or an older one).
    NewerStore, with nothing written, for a file of a newer version."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise NewerStore(found)
    have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    if found == SCHEMA_VERSION and have.issuperset(name for name, _ in ADDED_COLUMNS):
        return  # current: nothing to write (a current file short of a column is mended)
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
        conn.execute(f"PRAGMA auto_vacuum={INCREMENTAL}")  # a new file takes it at once
        if conn.execute("PRAGMA page_count").fetchone()[0] > 0:
            conn.execute("VACUUM")  # an older file: rebuilt once to take it
    conn.executescript(_SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}  # a new file's too
    for name, sql_type in ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
    conn.execute(_KEYED)  # NULL keys never collide
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
