"""A job's result on disk: written once its audio is made, and which file answers
GET /v1/jobs/{id}/audio.

    write(store, job_id, fmt, audio)   results/<id>.<fmt>, encoded from the job's audio
                                       (a JobAudio: on disk and its tail in memory) as it
                                       is read (disk.write_result): its path in the folder
                                       and size; JobError DISK_LIMIT, DISK_FULL or
                                       STORAGE, saying what to do
    keep_partial(store, job, audio, ..) a cancelled job's audio, made before its cancel,
                                       as its result (the store's keep_partial)
    keep_saved(store, progress, job)   the same from its progress on disk (it was queued
                                       to resume, or the server died before its run ended)
    result_file(store, job)            the file of a done job, or of a cancelled one that
                                       kept its audio; else the JobError that says why not
                                       (one no longer its written size: STORAGE, damaged)

The store names the file in the job's row (result_path); a file no row names is
swept at the next start (disk.sweep_orphans).
"""

from __future__ import annotations

import logging
from pathlib import Path

from vibevoice_pool.jobs.disk import is_disk_full, write_result
from vibevoice_pool.jobs.job_audio import JobAudio
from vibevoice_pool.jobs.records import Job, JobError, JobErrorKind, JobState, say
from vibevoice_pool.jobs.store import RESULTS_DIR
from workers.wire.messages import SAMPLE_RATE

log = logging.getLogger("vibevoice_pool")


def write(store, job_id: str, fmt: str, audio: JobAudio) -> tuple[str, int]:
    """Encode a job's audio into its result file; (its path in the folder, its size)."""
    rel = f"{RESULTS_DIR}/{job_id}.{fmt}"
    path = store.folder / rel
    try:
        return rel, write_result(store, path, audio, fmt)
    except OSError as e:
        kind = JobErrorKind.DISK_FULL if is_disk_full(e) else JobErrorKind.STORAGE
        raise JobError(
            kind,
            f"the audio was made but could not be written to {path.parent}: "
            f"{e.strerror or e}. Free disk space or repair the data folder, "
            "then submit the job again",
        ) from e


def attach(store, job_id: str, rel: str, size: int, audio_s: float, worker) -> bool:
    """Name a written file as a cancelled job's result; the file goes if it cannot be."""
    try:
        kept = store.keep_partial(job_id, rel, size, audio_s, worker)
    except JobError as e:  # a full disk: the file would be an orphan
        say(log.warning, job_id, ": its audio is not kept: %s", e.message)
        kept = False
    if not kept:  # deleted meanwhile, or not writable
        (store.folder / rel).unlink(missing_ok=True)
    return kept


def keep_partial(store, job_id: str, fmt: str, audio: JobAudio, worker: int | None) -> float:
    """Keep the audio a cancelled job made as its result; the seconds kept (0: none
    made, or it could not be written, which is logged: the job stays cancelled)."""
    if not audio.made:
        return 0.0
    try:
        rel, size = write(store, job_id, fmt, audio)
    except JobError as e:
        say(log.warning, job_id, ": the audio it made before its cancel is lost: %s", e.message)
        return 0.0
    audio_s = audio.made / SAMPLE_RATE
    if not attach(store, job_id, rel, size, audio_s, worker):
        return 0.0
    say(log.info, job_id, ": the %.1f s of audio it made before its cancel are kept", audio_s)
    return audio_s


def keep_saved(store, progress, job_id: str) -> float:
    """The progress saved of a job that no run holds (progress.py): a cancelled job's
    audio is kept as its result, then the files go (any job's); the seconds kept."""
    job = store.get(job_id)
    kept = 0.0
    if job is not None and job.state is JobState.CANCELLED and not job.result_path:
        kept = keep_partial(store, job_id, job.format, progress.saved(job_id), job.worker)
    progress.drop(job_id)
    return kept


def result_file(store, job: Job) -> Path:
    """The result of a done job (or a cancelled one's audio). JobError NOT_READY,
    NO_AUDIO (it never comes), NOT_FOUND (gone), STORAGE (not the size it was written at)."""
    if job.state is JobState.FAILED or (job.state is JobState.CANCELLED and not job.result_path):
        why = f" ({job.error})" if job.error else ""
        made = " before it made any audio" if job.state is JobState.CANCELLED else ""
        msg = f"job {job.id} {job.state.value}{made}{why}: it has no audio; submit it again"
        raise JobError(JobErrorKind.NO_AUDIO, msg)
    if job.state not in (JobState.DONE, JobState.CANCELLED) or not job.result_path:
        msg = f"job {job.id} is {job.state.value}; its audio exists once it is done"
        raise JobError(JobErrorKind.NOT_READY, msg)
    path = store.folder / job.result_path
    try:
        size = path.stat().st_size if path.is_file() else -1
    except OSError:
        size = -1
    if size < 0:
        raise JobError(JobErrorKind.NOT_FOUND, f"the result of job {job.id} is gone from disk")
    if size != job.result_bytes:  # cut short or overwritten since it was written
        log.warning(
            "job %s: its result %s is %d bytes, not %d", job.id, path, size, job.result_bytes
        )
        msg = f"the result of job {job.id} is damaged on disk ({size} of {job.result_bytes} bytes)"
        raise JobError(JobErrorKind.STORAGE, msg + "; submit it again")
    return path
