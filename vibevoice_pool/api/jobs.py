"""HTTP routes of durable jobs: a FastAPI router over a JobRunner (jobs/runner.py).

    POST   /v1/jobs             the body of /v1/synthesize -> 202 {"id", ...} at once
    GET    /v1/jobs             the caller's jobs, newest first (?limit=&offset=&state=)
    GET    /v1/jobs/{id}        state, progress, worker, timings, error
    GET    /v1/jobs/{id}/audio  the result, with HTTP Range (206 Partial Content)
    DELETE /v1/jobs/{id}        cancel a queued or running job

Owner of a job (owner_of): the `X-Browser-Id` header or `vvp_browser` cookie
("browser:<id>", the page's Jobs tab); else the API key sent ("key:<hash>"
for --api-key, "key:<name>" for a named key of --api-keys); else the owner
token of `X-Owner-Token` or the `vvp_owner` cookie ("token:<hash>"). A keyless
caller that has none gets one from POST /v1/jobs, in the X-Owner-Token header
and the cookie: keep it to list those jobs later. The list shows only the
caller's jobs (none without an owner). A job's id (a UUID4: 122 random bits)
is a capability: it reads and cancels that job, except with named keys,
where a job answers only its own name (404 to the others). The API key, when set, is
checked by the app's middleware (auth.py), as for every /v1 route.
Errors are OpenAI-shaped (errors.py): PoolError by its kind, JobError by
JOB_STATUS. Handlers are plain functions: FastAPI runs them off the loop.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from vibevoice_pool import encoders
from vibevoice_pool.api.auth import KeyRing
from vibevoice_pool.api.errors import FileAnswer, error_response, plain_error
from vibevoice_pool.api.speech import SynthesizeBody
from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import Job, JobError, JobErrorKind, JobState
from workers.wire.messages import ErrorKind, PoolError

BROWSER_HEADER = "x-browser-id"
BROWSER_COOKIE = "vvp_browser"
OWNER_HEADER = "x-owner-token"
OWNER_COOKIE = "vvp_owner"
OWNER_TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,128}$")  # at least 128 bits of base64url
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


def new_owner_token() -> str:
    return secrets.token_urlsafe(24)


def token_owner(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def owner_of(request: Request, keys: KeyRing | None = None) -> str | None:
    """Who a request speaks for (see the module doc); None for a keyless caller
    without an owner token. A malformed token is BAD_INPUT."""
    browser = (request.headers.get(BROWSER_HEADER) or request.cookies.get(BROWSER_COOKIE) or "")[
        :128
    ].strip()
    if browser:
        return f"browser:{browser}"
    if keys:
        owner = keys.owner_of(request.headers.raw)
        if owner is not None:
            return owner
    token = (request.headers.get(OWNER_HEADER) or request.cookies.get(OWNER_COOKIE) or "").strip()
    if not token:
        return None
    if not OWNER_TOKEN.match(token):
        raise PoolError(
            ErrorKind.BAD_INPUT,
            "X-Owner-Token must be the token a POST /v1/jobs answer gave (22-128 characters "
            "of A-Z a-z 0-9 _ -); leave it out to get a new one",
        )
    return token_owner(token)


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

    keys: KeyRing | None = getattr(front, "keys", None)

    def own(job_id: str, request: Request) -> Job:
        """The job, if this caller may see it (named keys: only its own)."""
        job = runner.get(job_id)
        if keys is not None and keys.named and job.owner != owner_of(request, keys):
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id} (it may have expired)")
        return job

    @router.post("", status_code=202)
    def create_job(body: SynthesizeBody, request: Request):
        minted = None
        try:
            owner = owner_of(request, keys)
            if owner is None:
                minted = new_owner_token()
                owner = token_owner(minted)
            job = runner.submit(owner, body.model_dump())
        except PoolError as e:
            return error_response(e)
        except JobError as e:
            return job_error(e)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if minted:
            headers["X-Owner-Token"] = minted
        resp = JSONResponse(view(runner, job), 202, headers=headers)
        if minted:
            resp.set_cookie(
                OWNER_COOKIE, minted, max_age=int(runner.ttl_s), httponly=True, samesite="strict"
            )
        return resp

    @router.get("")
    def list_jobs(
        request: Request,
        limit: int = Query(20, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),  # SQLite's integers are 64-bit
        state: JobState | None = None,
    ):
        try:
            owner = owner_of(request, keys)
        except PoolError as e:
            return error_response(e)
        if owner is None:  # no owner token yet: no jobs of its own
            jobs, more = [], False
        else:
            jobs, more = runner.store.list(owner, limit=limit, offset=offset, state=state)
        return {
            "object": "list",
            "data": [view(runner, j) for j in jobs],
            "has_more": more,
            "next_offset": offset + len(jobs) if more else None,
        }

    @router.get("/{job_id}")
    def get_job(job_id: str, request: Request):
        try:
            return view(runner, own(job_id, request))
        except JobError as e:
            return job_error(e)
        except PoolError as e:
            return error_response(e)

    @router.api_route("/{job_id}/audio", methods=["GET", "HEAD"])
    def job_audio(job_id: str, request: Request):
        try:
            job = own(job_id, request)
            path = runner.result_file(job)
        except JobError as e:
            return job_error(e)
        except PoolError as e:
            return error_response(e)
        headers = {
            "X-Job-Id": job.id,
            "X-Request-Id": job.request_id or "",
            "X-Seed": str(job.seed),
            "X-Audio-Seconds": f"{job.audio_s:.3f}",
        }
        if job.worker is not None:
            headers["X-Worker"] = str(job.worker)
        if job.stop_reason:
            headers["X-Stop-Reason"] = job.stop_reason
        return FileAnswer(  # answers Range with 206, a bad range with 416 (OpenAI-shaped)
            path,
            media_type=encoders.content_type(job.format),
            filename=f"vibevoice-{job.id}.{job.format}",
            content_disposition_type="inline",
            headers=headers,
        )

    @router.delete("/{job_id}")
    def cancel_job(job_id: str, request: Request):
        try:
            return view(runner, runner.cancel(own(job_id, request).id))
        except JobError as e:
            return job_error(e)
        except PoolError as e:
            return error_response(e)

    return router
