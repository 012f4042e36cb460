"""The JSON view of a job (GET /v1/jobs/{id}, the list, the page's Jobs tab)."""

from __future__ import annotations

from vibevoice_pool import encoders
from vibevoice_pool.jobs.records import Job, JobState


def shown_state(job: Job) -> JobState:
    """Its state as its owner sees it: a running job is still queued until a worker
    begins it (it waits in the pool's admission queue), and again while it waits to
    resume (preempted, moved, its worker lost: the store's worker is then cleared)."""
    if job.state is JobState.RUNNING and (job.started_at is None or job.worker is None):
        return JobState.QUEUED
    return job.state


def job_view(
    job: Job,
    made: float,
    worker: int | None,
    *,
    now: float,
    ttl_s: float,
    note: dict | None = None,
    eta: float | None = None,
) -> dict:
    """`made`: seconds of audio made so far; `worker`: who runs it now; `note`: why
    a job a worker began waits again (places.py), `eta`: seconds left, when known."""
    state = JobState.QUEUED if note is not None else shown_state(job)
    if note is None and worker is not None and state is JobState.QUEUED and job.started_at:
        state = JobState.RUNNING  # begun again: the store hears it at the runner's next tick
    est = job.est_audio_s
    frac = 1.0 if job.state is JobState.DONE else min(1.0, made / est) if est > 0 else 0.0
    end = job.finished_at or now
    return {
        "id": job.id,
        "object": "job",
        "state": state.value,
        "progress": {
            "audio_s": round(made, 3),
            "estimate_s": round(est, 3),
            "fraction": round(frac, 4),
            "eta_s": round(eta, 1) if eta is not None and state is JobState.RUNNING else None,
        },
        "worker": None if state is JobState.QUEUED else worker,
        "waiting": note,  # while it waits again: {"reason", "since", "worker" it is sent to}
        "request_id": job.request_id,
        "runs": job.runs,
        "seed": job.seed,
        "format": job.format,
        "timings": {
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            # wall-clock times (they outlive the process); a clock stepped back reads 0
            "waited_s": round(max(0.0, (job.started_at or end) - job.created_at), 3),
            "ran_s": round(max(0.0, end - job.started_at), 3) if job.started_at else None,
            "compute_s": job.compute_s,
        },
        "error": {"code": job.error_code, "message": job.error} if job.error_code else None,
        "stop_reason": job.stop_reason,  # a StopReason value (eos, runaway_cap...) once done
        "result": (
            {
                "bytes": job.result_bytes,
                "audio_s": round(job.audio_s, 3),
                "content_type": encoders.content_type(job.format),
                "expires_at": (job.finished_at or now) + ttl_s,
            }
            if job.result_path and job.state in (JobState.DONE, JobState.CANCELLED)
            else None  # a cancelled job's result: the audio it made before its cancel
        ),
    }
