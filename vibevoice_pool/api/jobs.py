"""HTTP routes of durable jobs: a FastAPI router over a JobRunner (jobs/runner.py).

    POST   /v1/jobs             the body of /v1/synthesize -> 202 {"id", ...} at once
    GET    /v1/jobs             the caller's jobs, newest first (?limit=&offset=&state=)
    GET    /v1/jobs/{id}        state, progress, worker, timings, error
    GET    /v1/jobs/{id}/audio  the result, with HTTP Range (206 Partial Content)
    POST   /v1/jobs/{id}/cancel stop it and keep its record: 200 and its view once its
                                row has left its worker (up to CANCEL_WAIT_S), with the
                                audio it made as its result; a job that had ended answers
                                200 and its view as it ended (done, failed, or cancelled
                                before): the state is the truth
    DELETE /v1/jobs/{id}        cancel it if it is queued or running, then forget it
                                (its result too): answers its last view; 404 after

Owner of a job (owner_of): the API key sent ("key:<hash>" for --api-key,
"key:<name>" for a named key of --api-keys); else the owner token of
`X-Owner-Token` or the `vvp_owner` cookie ("token:<hash>"), and only a token
this server minted (OwnerTokens: a random part and its HMAC under a secret
kept in the data folder). A keyless caller without a valid token gets a new one
from POST /v1/jobs, in the X-Owner-Token header and the cookie (HttpOnly,
SameSite=Strict, Secure when served over https): keep it to list those jobs
later. A token the server did not mint owns nothing: it is replaced on POST
and lists no jobs. The list shows only the caller's jobs (none without an
owner). A job's id (a UUID4: 122 random bits) is a capability: it reads and
cancels that job, except with named keys, where a job answers only its own
name (404 to the others). The API key, when set, is checked by the app's
middleware (auth.py), as for every /v1 route. The page's Jobs tab has owners
of its own ("browser:<id>", ui/jobs.py) that no header reaches.
Retries (Idempotency-Key, 16-200 visible ASCII characters, a UUID say): a POST
with a key its owner sent before answers the job that key made, whatever its
state (202, its view now); with another body, 409 idempotency_key_reused. A
keyless caller without a token is given the token the key derives
(OwnerTokens.for_key), so a retry after a lost answer finds its job too. A key
is free again once its job has expired or been deleted.
Errors are OpenAI-shaped (errors.py): PoolError by its kind, JobError by
JOB_STATUS (507 for a full data disk or the data limit, 429 past an owner's
limits). Handlers are plain functions: FastAPI runs them off the loop.
unavailable_router: every /v1/jobs route answers 503 jobs_unavailable (the
data disk was full at start, or the job store's file is damaged: the answer says which).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from vibevoice_pool import encoders
from vibevoice_pool.api.auth import Keys, caller_of
from vibevoice_pool.api.errors import FileAnswer, error_response, plain_error
from vibevoice_pool.api.speech import SynthesizeBody
from vibevoice_pool.jobs.disk import kept_secret
from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import Job, JobError, JobErrorKind, JobState
from workers.wire.messages import ErrorKind, PoolError

OWNER_HEADER = "x-owner-token"
OWNER_COOKIE = "vvp_owner"
OWNER_TOKEN = re.compile(r"^[A-Za-z0-9_-]{54}$")  # 32 random characters + 22 of HMAC
TOKEN_SECRET_FILE = "owner.secret"
MAX_PAGE = 100
log = logging.getLogger("vibevoice_pool")
MAX_OFFSET = 2**63 - 1
CANCEL_WAIT_S = 10.0  # how long POST .../cancel waits for the job's row to leave its worker

JOB_STATUS = {
    JobErrorKind.NOT_FOUND: 404,
    JobErrorKind.NOT_READY: 409,
    JobErrorKind.NO_AUDIO: 410,
    JobErrorKind.CONFLICT: 409,
    JobErrorKind.KEY_REUSED: 409,
    JobErrorKind.DISK_LIMIT: 507,
    JobErrorKind.DISK_FULL: 507,
    JobErrorKind.OWNER_LIMIT: 429,
    JobErrorKind.STORAGE: 500,
    JobErrorKind.DATA_DIR: 503,
}


class OwnerTokens:
    """Mints owner tokens and tells them from tokens a client made up."""

    def __init__(self, secret: bytes):
        self._secret = secret

    @classmethod
    def in_folder(cls, folder) -> OwnerTokens:
        """With the secret kept in `folder` (made once), so tokens outlive a restart;
        a folder that cannot keep it (a full disk) gives a secret for this run only."""
        try:
            return cls(kept_secret(folder / TOKEN_SECRET_FILE, 32))
        except OSError as e:
            log.warning("Jobs: owner tokens last only until a restart (%s)", e)
            return cls(secrets.token_hex(32).encode())

    def _sign(self, part: str) -> str:
        mac = hmac.new(self._secret, part.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode()[:22]

    def mint(self) -> str:
        part = secrets.token_urlsafe(24)  # 32 characters, 192 bits
        return part + self._sign(part)

    def for_key(self, key: str) -> str:
        """The token an Idempotency-Key stands for, for a caller that has none: the
        same key, the same owner (a retry whose first answer was lost)."""
        mac = hmac.new(self._secret, b"idempotency-key:" + key.encode(), hashlib.sha256)
        part = base64.urlsafe_b64encode(mac.digest()).decode()[:32]
        return part + self._sign(part)

    def valid(self, token: str) -> bool:
        if not OWNER_TOKEN.match(token):
            return False
        return hmac.compare_digest(token[32:], self._sign(token[:32]))


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{16,200}$")


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, or None; BAD_INPUT when it is not one."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip()
    if not IDEMPOTENCY_KEY.match(key):
        raise PoolError(
            ErrorKind.BAD_INPUT,
            "Idempotency-Key must be 16-200 visible ASCII characters (a UUID, say)",
        )
    return key


def fingerprint(fields: dict) -> str:
    """What makes two submissions the same job: the body as sent, every field."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def token_owner(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def owner_of(request: Request, tokens: OwnerTokens) -> str | None:
    """Who a request speaks for (see the module doc); None for a keyless caller
    without a token this server minted."""
    caller = caller_of(request.scope)
    if caller.owner:
        return caller.owner
    token = (request.headers.get(OWNER_HEADER) or request.cookies.get(OWNER_COOKIE) or "").strip()
    if token and tokens.valid(token):
        return token_owner(token)
    return None


# an owner at its limit waits for one of its jobs to end: minutes, not seconds
OWNER_RETRY_AFTER_S = 30


def job_error(err: JobError) -> JSONResponse:
    status = JOB_STATUS.get(err.kind, 500)
    headers = {"Retry-After": str(OWNER_RETRY_AFTER_S)} if status == 429 else None
    return plain_error(status, err.kind.value, err.message, headers)


def view(runner: JobRunner, job: Job) -> dict:
    out = runner.describe(job)
    out["url"] = f"/v1/jobs/{job.id}"
    if out["result"]:  # done, or cancelled with the audio it made
        out["result"]["url"] = f"/v1/jobs/{job.id}/audio"
    return out


def jobs_router(front, runner: JobRunner) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    keys: Keys | None = getattr(front, "keys", None)
    tokens = OwnerTokens.in_folder(runner.store.folder)

    def refuse(err: JobError | PoolError) -> JSONResponse:
        """The error's answer, counted in /metrics' refusals by its code (a 409
        idempotency_key_reused, a 507 disk_full...), as the other routes' are."""
        activity = getattr(front, "activity", None)  # none in tests of the router alone
        if isinstance(err, PoolError):
            if activity is not None:
                front.refused(err)
            return error_response(err)
        if activity is not None:
            activity.refused(err.kind.value)
            if err.kind is JobErrorKind.DISK_FULL:
                activity.no_room("data", str(runner.store.folder))
        return job_error(err)

    def own(job_id: str, request: Request) -> Job:
        """The job, if this caller may see it (named keys: only its own)."""
        job = runner.get(job_id)
        if keys is not None and keys.named and job.owner != owner_of(request, tokens):
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id} (it may have expired)")
        return job

    @router.post("", status_code=202)
    def create_job(body: SynthesizeBody, request: Request):
        minted = None
        try:
            key = idempotency_key(request)
            owner = owner_of(request, tokens)
            if owner is None:  # none, or one this server did not mint: a new one
                minted = tokens.for_key(key) if key else tokens.mint()
                owner = token_owner(minted)
            fields = body.model_dump()
            idem = (key, fingerprint(fields)) if key else None
            job = runner.submit(owner, fields, idem)
        except (PoolError, JobError) as e:
            return refuse(e)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if minted:
            headers["X-Owner-Token"] = minted
        resp = JSONResponse(view(runner, job), 202, headers=headers)
        if minted:
            resp.set_cookie(
                OWNER_COOKIE,
                minted,
                max_age=int(runner.ttl_s),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return resp

    @router.get("")
    def list_jobs(
        request: Request,
        limit: int = Query(20, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),  # SQLite's integers are 64-bit
        state: JobState | None = None,
    ):
        owner = owner_of(request, tokens)
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
        except (JobError, PoolError) as e:
            return refuse(e)

    # One route a method: api_route(methods=[GET, HEAD]) gave both one operationId
    @router.head("/{job_id}/audio", operation_id="job_audio_head")
    @router.get("/{job_id}/audio", operation_id="job_audio")
    def job_audio(job_id: str, request: Request):
        try:
            job = own(job_id, request)
            path = runner.result_file(job)
        except (JobError, PoolError) as e:
            return refuse(e)
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

    @router.post("/{job_id}/cancel")
    def cancel_job(job_id: str, request: Request):
        """Stop a queued or running job and keep its record (state `cancelled`) and the
        audio it made (its `result`); answers its view once its row has left its worker.
        Idempotent: a job that had ended (done, failed, cancelled) answers 200 and its
        view as it is."""
        try:
            job = own(job_id, request)
            if not job.finished:
                try:
                    runner.cancel(job.id, wait_s=CANCEL_WAIT_S)
                except JobError as e:  # CONFLICT: it ended meanwhile, and that end stands
                    if e.kind is not JobErrorKind.CONFLICT:
                        raise
            return view(runner, runner.get(job.id))
        except (JobError, PoolError) as e:
            return refuse(e)

    @router.delete("/{job_id}")
    def delete_job(job_id: str, request: Request):
        try:
            job = own(job_id, request)
            if not job.finished:
                with contextlib.suppress(JobError):  # it may finish meanwhile: forget it anyway
                    runner.cancel(job.id)
            last = view(runner, runner.get(job.id))
            runner.store.delete(job.id)
        except (JobError, PoolError) as e:
            return refuse(e)
        return {**last, "deleted": True}

    return router


def unavailable_router(why: str, on_refused=None) -> APIRouter:
    """/v1/jobs when the server started without jobs: 503 on every route, saying why
    (each counted by `on_refused`, /metrics' refusals)."""
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
    message = f"jobs are unavailable on this server: {why}"

    @router.api_route("", methods=["GET", "POST"], include_in_schema=False)
    @router.api_route(
        "/{rest:path}", methods=["GET", "HEAD", "POST", "DELETE"], include_in_schema=False
    )
    def unavailable(rest: str = ""):
        if on_refused is not None:
            on_refused("jobs_unavailable")
        return plain_error(503, "jobs_unavailable", message)

    return router
