"""/openapi.json that says what the routes really answer.

FastAPI declares every route as 200 (or its status) plus 422 JSON. This server
answers 400 for every validation error (never 422), 401 without the key, 403
for a refused cross-site write, 404 for an unknown id, 413 for a body over the
limit, 429/503/504 when the pool cannot take or finish a request, and audio
(not JSON) from the synthesis routes. document() rewrites each operation so:
  - 422 goes, 400 comes (every route: a foreign Host is one too, bad_host);
  - 401 on every route but /health and /ready (when a key is set);
  - 403 on the state-changing methods (cross_site; admin_needs_json on the
    worker routes too); 404 where the path names a thing;
    413 where there is a body; 408 everywhere (the connection guard);
  - 429 login_throttled on the page login, if it is in the schema; 429
    key_throttled wherever a key is asked for (wrong keys from one address);
  - 403 admin_only on the admin routes (auth.ADMIN_ROUTES), forbidden on the
    voice writes (another key's voice, a preset);
  - the X-Owner-Token and Location headers of POST /v1/jobs;
  - the per-route statuses of ROUTE_ERRORS (404 voice_not_found where a body
    names a voice, 415 unsupported_audio where it carries a voice sample);
  - audio media types on the synthesis routes and job audio (206 too);
and every error is the one Error schema of OpenAI's shape.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from vibevoice_pool.api.auth import admin_only  # 403 admin_only for a user key
from vibevoice_pool.api.login_throttle import LOGIN_PATHS  # 429 login_throttled
from vibevoice_pool.api.origin import ADMIN_PREFIX  # 403 admin_needs_json without a key
from vibevoice_pool.encoders import CONTENT_TYPES

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}
WHY = {
    "400": "Bad input: the message says what to fix",
    "401": "An API key is set and was not sent (Authorization: Bearer <key>)",
    "403": "Refused: a cross-site write, a user key on an admin route, another key's voice",
    "408": "The request was sent too slowly (the connection guard closed it)",
    "404": "No such thing (a job, a worker, a voice the request names)",
    "409": "Not in a state for this (the job is not done, or already ended; an "
    "Idempotency-Key sent before with another body)",
    "410": "The job failed or was cancelled: it has no audio, and never will",
    "413": "The body is over the server's limit",
    "415": "A voice sample that is no wav, mp3, flac or ogg file",
    "416": "The Range is past the end of the file",
    "429": "The queue (or the voice decoder) is full, or this address has as many requests "
    "in progress as it may: retry after Retry-After seconds",
    "431": "The request line and headers are over the server's limit",
    "500": "The engine failed on this request",
    "502": "The request took down workers twice and was given up",
    "503": "No worker is ready (or the server is stopping): retry after Retry-After",
    "504": "The request ran past its time limit",
    "507": "Out of memory (GPU), the jobs disk limit, or a full data or voices disk",
}
SYNTH_FAILURES = ("429", "500", "502", "503", "504", "507")
# 404 voice_not_found: a voice named in the body that the server does not hold;
# 415 unsupported_audio: a voice sample (speakers[].audio, an upload) that is no sound file
ROUTE_ERRORS = {
    ("/ready", "get"): ("503",),
    ("/v1/synthesize", "post"): ("404", "415", *SYNTH_FAILURES),
    ("/v1/audio/speech", "post"): ("404", *SYNTH_FAILURES),
    ("/v1/jobs", "post"): ("404", "409", "415", "429", "503", "507"),  # 429: decodes, owners
    ("/v1/voices", "post"): ("415", "429", "507"),
    ("/v1/voices/{name}", "delete"): ("507",),
    ("/metrics", "get"): ("403",),
    ("/v1/jobs/{job_id}", "delete"): ("409", "507"),
    ("/v1/jobs/{job_id}/cancel", "post"): ("507",),
    ("/v1/jobs/{job_id}/audio", "get"): ("409", "410", "416"),
    ("/v1/jobs/{job_id}/audio", "head"): ("409", "410", "416"),
}
AUDIO = {
    ctype: {"schema": {"type": "string", "format": "binary"}} for ctype in CONTENT_TYPES.values()
}
AUDIO_ROUTES = {
    ("/v1/synthesize", "post"): ("200",),
    ("/v1/audio/speech", "post"): ("200",),
    ("/v1/jobs/{job_id}/audio", "get"): ("200", "206"),
    ("/v1/jobs/{job_id}/audio", "head"): ("200", "206"),
}
SPEECH_EVENT = {  # the JSON of one event of stream_format "sse" (openai_api._sse)
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["speech.audio.delta", "speech.audio.done", "error"]},
        "audio": {"type": "string", "description": "base64 of the next bytes of the file"},
        "usage": {
            "type": "object",
            "required": ["input_tokens", "output_tokens", "total_tokens"],
            "properties": {
                "input_tokens": {"type": "integer"},
                "output_tokens": {"type": "integer", "description": "audio tokens, 7.5 a second"},
                "total_tokens": {"type": "integer"},
                "audio_seconds": {"type": "number"},
            },
        },
        "error": {"type": "object"},
    },
}
SSE = {  # OpenAPI 3.1: the schema of text/event-stream describes one event
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": SPEECH_EVENT,
                },
            },
        }
    }
}
GUARD_CODES = {  # the error codes the guards answer with, per status (origin.py, ...)
    "400": ("bad_host",),  # a Host this server does not serve (every route)
    "401": ("unauthorized", "key_revoked"),  # auth.py: no key, a wrong one, a revoked one
    "403": ("cross_site",),  # a write a browser marks as from another site
    "408": ("timeout",),  # connections.py: headers or body sent too slowly
    "429": ("too_many_streams",),  # connections.py: the address's requests in progress
    "431": ("headers_too_large",),  # protocol.py: past max_header_kb
}
OWNER_TOKEN = {
    "description": "Only to a caller without a key or owner token: the token that owns "
    "this job (send it back as X-Owner-Token; also set as the vvp_owner cookie)",
    "schema": {"type": "string"},
}
LOCATION = {"description": "The job's URL", "schema": {"type": "string"}}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Send it again on a retry: the job this key made is answered, not a "
    "second one (16-200 visible ASCII characters, a UUID say)",
    "schema": {"type": "string", "pattern": "^[!-~]{16,200}$"},
}
OPEN = ("/health", "/ready")
WRITES = ("post", "put", "patch", "delete")


def _error(status: str, codes: tuple[str, ...] = ()) -> dict:
    """One error response; `codes` are the error.code values it may carry."""
    json_ = {"schema": {"$ref": "#/components/schemas/Error"}}
    description = WHY.get(status, "Error")
    if codes:
        description += " (error.code: " + ", ".join(codes) + ")"
        json_["examples"] = {
            code: {
                "value": {"error": {"message": "...", "type": "error", "param": None, "code": code}}
            }
            for code in codes
        }
    return {"description": description, "content": {"application/json": json_}}


ROUTE_CODES = {  # error codes of a route's own statuses, where a client may act on them
    ("/v1/synthesize", "post", "404"): ("voice_not_found",),
    ("/v1/synthesize", "post", "415"): ("unsupported_audio",),
    ("/v1/audio/speech", "post", "404"): ("voice_not_found",),
    ("/v1/synthesize", "post", "429"): ("overloaded", "owner_queue_full"),
    ("/v1/audio/speech", "post", "429"): ("overloaded", "owner_queue_full"),
    ("/v1/jobs", "post", "404"): ("voice_not_found",),
    ("/v1/jobs", "post", "415"): ("unsupported_audio",),
    ("/v1/voices", "post", "415"): ("unsupported_audio",),
    ("/v1/jobs", "post", "429"): ("overloaded", "owner_limit"),
    ("/v1/jobs", "post", "507"): ("disk_limit", "disk_full"),
    ("/v1/jobs", "post", "409"): ("idempotency_key_reused",),
    ("/v1/jobs/{job_id}", "delete", "507"): ("disk_full",),
    ("/v1/voices", "post", "507"): ("disk_full",),
    ("/v1/voices/{name}", "delete", "507"): ("disk_full",),
    ("/v1/jobs/{job_id}/cancel", "post", "507"): ("disk_full",),
}


def _guard_codes(path: str, method: str, status: str) -> tuple[str, ...]:
    codes = GUARD_CODES.get(status, ())
    if status == "403" and method not in WRITES:
        codes = ()  # cross_site is for writes only
    codes += ROUTE_CODES.get((path, method, status), ())
    if status == "403" and path.startswith(ADMIN_PREFIX):
        codes += ("admin_needs_json",)
    if status == "403" and admin_only(method.upper(), path.replace("{worker_id}", "0")):
        codes += ("admin_only",)
    if status == "403" and path.startswith("/v1/voices") and method in WRITES:
        codes += ("forbidden",)
    if status == "429" and path in LOGIN_PATHS:
        codes = ("login_throttled", *codes)
    elif status == "429" and path not in OPEN:
        codes += ("key_throttled",)
    return codes


def _document_operation(path: str, method: str, op: dict) -> None:
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    wanted = ["400", "408", "429", "431"]  # the connection guard's, on every route
    if path not in OPEN:
        wanted.append("401")
    if method in WRITES:
        wanted.append("403")
    if "{" in path:
        wanted.append("404")
    if "requestBody" in op:
        wanted.append("413")
    wanted += ROUTE_ERRORS.get((path, method), ())
    for status in wanted:
        codes = _guard_codes(path, method, status)
        if status in responses and not codes:
            continue
        responses[status] = _error(status, codes)
    if (path, method) == ("/v1/jobs", "post"):
        op.setdefault("parameters", []).append(IDEMPOTENCY_KEY)
        accepted = responses.setdefault("202", {"description": "The job, queued"})
        accepted.setdefault("headers", {}).update(
            {"X-Owner-Token": OWNER_TOKEN, "Location": LOCATION}
        )
    for status in AUDIO_ROUTES.get((path, method), ()):
        content = dict(AUDIO)
        if path == "/v1/audio/speech":
            content |= SSE
        description = "The audio" if status == "200" else "Part of the audio (Range)"
        responses[status] = {"description": description, "content": content}


def document(app: FastAPI) -> dict:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            if isinstance(op, dict) and "responses" in op:
                _document_operation(path, method, op)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    return schema


def install(app: FastAPI) -> None:
    """Serve document(app) at /openapi.json (built once, on the first request,
    when every route, the jobs' too, is in place)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi
