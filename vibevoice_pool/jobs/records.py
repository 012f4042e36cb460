"""What a durable job is: its states, its row, the errors a job request meets.

Shared by the store (store.py), the runner and the HTTP routes; no I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.RUNNING)
# The states as shown (jobs/view.py) in SQL: a running job waits in the pool's
# admission queue until a worker begins it (the store's note_worker sets started_at and
# worker), and shows as queued until then, and again while it waits to resume (worker NULL).
_BEGUN = "started_at IS NOT NULL AND worker IS NOT NULL"
SHOWN_STATE_SQL = {
    JobState.QUEUED: f" AND (state='queued' OR (state='running' AND NOT ({_BEGUN})))",
    JobState.RUNNING: f" AND state='running' AND {_BEGUN}",
}
TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class JobErrorKind(str, enum.Enum):
    """What went wrong with a job request; the values are the API's error codes."""

    NOT_FOUND = "not_found"  # no such job (or it expired)
    NOT_READY = "not_ready"  # the audio of a job that has not finished
    NO_AUDIO = "no_audio"  # the audio of a job that failed or was cancelled: never coming
    CONFLICT = "conflict"  # cancelling a job that already finished
    KEY_REUSED = "idempotency_key_reused"  # an Idempotency-Key sent again with another body
    DISK_LIMIT = "disk_limit"  # the results would pass jobs_disk_limit_mb
    OWNER_LIMIT = "owner_limit"  # one owner's jobs or space would pass its share
    DISK_FULL = "disk_full"  # the disk under the data folder is full
    STORAGE = "storage_error"  # the result could not be written (I/O error)
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


COLUMNS = ", ".join(f.name for f in Job.__dataclass_fields__.values())


def job_from_row(row: tuple) -> Job:
    return Job(row[0], row[1], JobState(row[2]), *row[3:])


def say(emit, job_id: str, message: str, *args, request_id: str | None = None) -> None:
    """A line about a job, "job <id><message>" through `emit` (log.info, log.warning...),
    with its `job_id` as a field of JSON logs, and its `request_id` where the line
    names the pool request that runs it."""
    fields = {"job_id": job_id}
    if request_id is not None:
        fields["request_id"] = request_id
    emit("job %s" + message, job_id, *args, extra=fields, stacklevel=2)
