"""The HTTP API: a FastAPI app over a Pool, assembled from one router per part.
The Gradio page mounts on the same app, last.

    POST /v1/synthesize        multi-speaker JSON in, audio out (or streamed)
    POST /v1/audio/speech      OpenAI-compatible (openai.py)
    GET/POST/DELETE /v1/voices the voice presets (voices.py)
    /v1/jobs                   durable jobs (jobs.py), when the server runs them
    GET  /v1/pool              the status board as JSON
    POST /v1/pool/workers/{id}/restart
    POST/DELETE /v1/pool/workers  live scaling (scaling.py)
    GET  /metrics              Prometheus (metrics.py)
    GET  /health               the process answers
    GET  /ready                200 when at least one worker is ready and beating, else 503

The request model they share is speech.py.
Every error is a typed PoolError rendered in OpenAI's shape (errors.py).
With an API key every route but /health and /ready needs it (auth.py).
Blocking work (decoding uploads, encoding audio) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from vibevoice_pool import __version__
from vibevoice_pool.api.auth import ApiKeyMiddleware, BodyLimitMiddleware, tenant_of
from vibevoice_pool.api.errors import error_response, plain_error
from vibevoice_pool.api.metrics import Activity
from vibevoice_pool.api.speech import (
    Front,
    SynthesizeBody,
    describe_invalid,
    run_to_response,
    stream_response,
)
from vibevoice_pool.api.spool import BodySpool
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool")


def create_app(front: Front) -> FastAPI:
    """The API app: every router built first and included in one place; the
    framework's errors, /openapi.json and the middlewares around them. The
    page (server.build_app) is mounted on it after, at "/", last."""
    from vibevoice_pool.api import errors, metrics, openapi_doc, scaling
    from vibevoice_pool.api import openai as openai_api
    from vibevoice_pool.api import voices as voices_api

    app = FastAPI(title="vibevoice-pool", version=__version__)
    app.state.front = front
    app.state.on_stopping = []  # called as the server starts to stop (server.py)
    if front.activity is None:
        front.activity = Activity.attach(front.pool)
    activity = front.activity

    routers = [
        native_router(front),
        openai_api.router(front),
        voices_api.router(front),
        scaling.pool_router(front.pool),
        metrics.router(front.pool, activity, front.jobs, front.keys),
    ]
    if front.jobs is not None:
        from vibevoice_pool.api.jobs import jobs_router

        routers.append(jobs_router(front, front.jobs))
    elif front.jobs_unavailable:
        from vibevoice_pool.api.jobs import unavailable_router

        routers.append(unavailable_router(front.jobs_unavailable, activity.refused))
    for router in routers:
        # The routes themselves, not include_router's lazy wrapper: the 405 and 404
        # answers (errors.UnknownRoutes) and /openapi.json read app.router.routes.
        app.router.routes.extend(router.routes)

    @app.exception_handler(m.PoolError)
    async def _pool_error(_: Request, err: m.PoolError):
        front.refused(err)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        activity.refused(m.ErrorKind.BAD_INPUT.value)
        message = describe_invalid(
            err.errors(), request.url.path, request.headers.get("content-type")
        )
        return plain_error(400, "bad_input", message)

    errors.install(app, activity.refused)  # the framework's own errors, 404 and 405 too
    openapi_doc.install(app)  # /openapi.json declares the real statuses and media types
    _middlewares(app, front)
    return app


def native_router(front: Front) -> APIRouter:
    """/health, /ready, /v1/pool, a worker's restart and /v1/synthesize."""
    pool = front.pool
    router = APIRouter()

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/ready")
    async def ready():
        n = pool.ready_workers()
        body = {"ready": n > 0, "ready_workers": n, "workers": len(pool.live_slots())}
        return JSONResponse(body, 200 if n else 503)

    @router.get("/v1/pool")
    async def pool_status():
        return pool.status()

    @router.post("/v1/pool/workers/{worker_id}/restart")
    async def restart_worker(worker_id: int):
        if worker_id not in pool.live_slots():
            return plain_error(404, "not_found", f"no worker {worker_id}; see /v1/pool")
        pool.restart_worker(worker_id)
        return {"restarting": worker_id}

    @router.post("/v1/synthesize")
    async def synthesize(body: SynthesizeBody, request: Request):
        # Uploads are decoded off the loop; a request of preset voices is built on it.
        if any(sp.audio for sp in body.speakers):
            req = await asyncio.to_thread(front.build_request, body)
        else:
            req = front.build_request(body)
        handle = pool.submit(req, tenant_of(request.scope, front.keys))
        if body.stream:
            return await stream_response(request, handle, body.format)
        return await run_to_response(request, handle, body.format)

    return router


class _JsonCors(CORSMiddleware):
    """Starlette's CORS, its refused preflight in the API's error shape (its own is a
    line of plain text)."""

    def preflight_response(self, request_headers):
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        message = answer.body.decode()  # "Disallowed CORS origin, headers": what it refused
        headers = {k: v for k, v in answer.headers.items() if k.lower().startswith("access-")}
        return plain_error(400, "cors_refused", message, headers)


def _middlewares(app: FastAPI, front: Front) -> None:
    """Outermost last: CORS (only when configured), then the key, then the body limit,
    then the spool that holds large bodies on disk until they are whole (spool.py)."""
    app.add_middleware(
        BodySpool,
        spool_bytes=front.cfg.body_spool_kb * 1024,
        max_bytes=front.max_body_bytes,
        total_bytes=int(front.cfg.spool_limit_mb * (1 << 20)),
        activity=front.activity,
    )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=front.max_body_bytes, on_refused=front.activity.refused
    )
    if front.keys or front.cfg.api_key:

        def live_stream(path: str) -> bool:
            tokens = front.stream_tokens
            return tokens is not None and tokens.allows(path)

        app.add_middleware(
            ApiKeyMiddleware,
            key=front.keys or front.cfg.api_key,
            on_refused=front.activity.refused,
            allow=live_stream,
        )
    if front.cors_origins:
        app.add_middleware(
            _JsonCors,
            allow_origins=list(front.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            # Any request header, echoed back: the origins are the boundary, not the
            # headers. The openai package in a browser sends its X-Stainless-* headers
            # (and OpenAI-Organization, OpenAI-Project) on every call, and a keyless page
            # keeps its jobs by X-Owner-Token (the cookie is SameSite=strict).
            allow_headers=["*"],
            expose_headers=[
                "X-Request-Id",
                "X-Seed",
                "X-Worker",
                "X-Audio-Seconds",
                "X-Stop-Reason",
                "X-Voice",
                "X-Model",
                "X-Owner-Token",
                "X-Job-Id",
                "Location",
                "Retry-After",
                "Content-Range",
            ],
        )
