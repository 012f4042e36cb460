"""HTTP routes of durable jobs: a FastAPI router over a JobRunner (jobs.py).

    POST   /v1/jobs             the body of /v1/synthesize -> 202 {"id", ...} at once
    GET    /v1/jobs             the caller's jobs, newest first (?limit=&offset=&state=)
    GET    /v1/jobs/{id}        state, progress, worker, timings, error
    GET    /v1/jobs/{id}/audio  the result, with HTTP Range (206 Partial Content)
    DELETE /v1/jobs/{id}        cancel a queued or running job

Owner of a job: the `X-Browser-Id` header or `vvp_browser` cookie
("browser:<id>"), else the Bearer key, hashed ("key:<sha256 prefix>"), else
"anonymous". The list shows the caller's own jobs; a job's id (128 random
bits) is what fetches it. The API key, when set, is checked by the app's
middleware (auth.py), as for every /v1 route.
Errors are OpenAI-shaped (errors.py): PoolError by its kind, JobError by
JOB_STATUS. Handlers are plain functions: FastAPI runs them off the loop.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.routing import Mount

from vibevoice_pool import encoders
from vibevoice_pool.api import SynthesizeBody
from vibevoice_pool.errors import FileAnswer, error_response, plain_error
from vibevoice_pool.jobs import JobRunner
from vibevoice_pool.jobs_store import Job, JobError, JobErrorKind, JobState
from workers.messages import PoolError

BROWSER_HEADER = "x-browser-id"
BROWSER_COOKIE = "vvp_browser"
MAX_PAGE = 100
MAX_OFFSET = 2**63 - 1

JOB_STATUS = {
    JobErrorKind.NOT_FOUND: 404,
    JobErrorKind.NOT_READY: 409,
    JobErrorKind.CONFLICT: 409,
    JobErrorKind.DISK_LIMIT: 507,
    JobErrorKind.STORAGE: 500,
    JobErrorKind.DATA_DIR: 503,
}


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def owner_of(request: Request) -> str:
    """Who a request speaks for: a browser id, else the API key, else anonymous."""
    browser = (request.headers.get(BROWSER_HEADER) or request.cookies.get(BROWSER_COOKIE) or "")[
        :128
    ].strip()
    if browser:
        return f"browser:{browser}"
    key = _bearer(request)
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]
    return "anonymous"


def job_error(err: JobError) -> JSONResponse:
    return plain_error(JOB_STATUS.get(err.kind, 500), err.kind.value, err.message)


def view(runner: JobRunner, job: Job) -> dict:
    out = runner.describe(job)
    out["url"] = f"/v1/jobs/{job.id}"
    if job.state is JobState.DONE:
        out["result"]["url"] = f"/v1/jobs/{job.id}/audio"
    return out


def jobs_router(front, runner: JobRunner) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    @router.post("", status_code=202)
    def create_job(body: SynthesizeBody, request: Request):
        try:
            job = runner.submit(owner_of(request), body.model_dump())
        except PoolError as e:
            return error_response(e)
        except JobError as e:
            return job_error(e)
        return JSONResponse(view(runner, job), 202, headers={"Location": f"/v1/jobs/{job.id}"})

    @router.get("")
    def list_jobs(
        request: Request,
        limit: int = Query(20, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),  # SQLite's integers are 64-bit
        state: JobState | None = None,
    ):
        jobs, more = runner.store.list(owner_of(request), limit=limit, offset=offset, state=state)
        return {
            "object": "list",
            "data": [view(runner, j) for j in jobs],
            "has_more": more,
            "next_offset": offset + len(jobs) if more else None,
        }

    @router.get("/{job_id}")
    def get_job(job_id: str):
        try:
            return view(runner, runner.get(job_id))
        except JobError as e:
            return job_error(e)

    @router.api_route("/{job_id}/audio", methods=["GET", "HEAD"])
    def job_audio(job_id: str):
        try:
            job = runner.get(job_id)
            path = runner.result_file(job)
        except JobError as e:
            return job_error(e)
        headers = {
            "X-Job-Id": job.id,
            "X-Request-Id": job.request_id or "",
            "X-Seed": str(job.seed),
            "X-Audio-Seconds": f"{job.audio_s:.3f}",
        }
        if job.worker is not None:
            headers["X-Worker"] = str(job.worker)
        return FileAnswer(  # answers Range with 206, a bad range with 416 (OpenAI-shaped)
            path,
            media_type=encoders.content_type(job.format),
            filename=f"vibevoice-{job.id}.{job.format}",
            content_disposition_type="inline",
            headers=headers,
        )

    @router.delete("/{job_id}")
    def cancel_job(job_id: str):
        try:
            return view(runner, runner.cancel(job_id))
        except JobError as e:
            return job_error(e)

    return router


def install(app: FastAPI, front, runner: JobRunner) -> None:
    """Add the jobs routes to `app`, ahead of any page mounted at "/" (a Mount
    there would otherwise answer /v1/jobs first)."""
    before = list(app.router.routes)
    app.include_router(jobs_router(front, runner))
    added = app.router.routes[len(before) :]
    first_mount = next((i for i, r in enumerate(before) if isinstance(r, Mount)), len(before))
    app.router.routes[:] = before[:first_mount] + added + before[first_mount:]
