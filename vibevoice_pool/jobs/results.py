"""A job's result on disk: which file answers GET /v1/jobs/{id}/audio.

    result_file(store, job)   the file of a done job, or the JobError that says why
                              there is none (NOT_READY, NO_AUDIO, NOT_FOUND)

The runner (runner.py) writes results/<id>.<fmt> (disk.write_result); the store
names it in the job's row (result_path).
"""

from __future__ import annotations

from pathlib import Path

from vibevoice_pool.jobs.records import Job, JobError, JobErrorKind, JobState


def result_file(store, job: Job) -> Path:
    """The result of a done job. JobError NOT_READY, NO_AUDIO (it never comes), NOT_FOUND."""
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        why = f" ({job.error})" if job.error else ""
        msg = f"job {job.id} {job.state.value}{why}: it has no audio; submit it again"
        raise JobError(JobErrorKind.NO_AUDIO, msg)
    if job.state is not JobState.DONE or not job.result_path:
        msg = f"job {job.id} is {job.state.value}; its audio exists once it is done"
        raise JobError(JobErrorKind.NOT_READY, msg)
    path = store.folder / job.result_path
    if not path.is_file():
        raise JobError(JobErrorKind.NOT_FOUND, f"the result of job {job.id} is gone from disk")
    return path
