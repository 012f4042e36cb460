"""Every error the HTTP API answers, in OpenAI's error shape:

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

400 bad input, 401 no key, 403 refused, 404 no such route or thing (a voice a
request names: voice_not_found), 405 wrong method (with Allow), 413 too large,
415 a voice sample that is no audio file (unsupported_audio), 416 a Range past
the end, 429 overloaded (Retry-After), 503 no worker ready, 504 timed out; the
server-side kinds 5xx.

A typed PoolError becomes its status by kind (error_response). install() makes
the framework's own errors take the same shape: FastAPI's body parsing
(invalid UTF-8, JSON nested too deep, a number of thousands of digits),
Starlette's multipart limits, an unknown route or method (also where the page
mounted at "/" would answer them: UnknownRoutes), and anything unforeseen (500,
logged). FileAnswer does the same for Range errors of files.
"""

from __future__ import annotations

import json
import os
import sys
from email.utils import parsedate_to_datetime

import anyio
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from vibevoice_pool.audio import NotAudio, TooLarge
from vibevoice_pool.voices.library import VoiceNotFound, VoiceUnreadable
from workers.wire.messages import ErrorKind, PoolError

STATUS = {
    ErrorKind.BAD_INPUT: 400,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.CANCELLED: 499,
    ErrorKind.OUT_OF_MEMORY: 507,
    ErrorKind.WORKER_LOST: 502,
    ErrorKind.ENGINE_ERROR: 500,
}
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    416: "invalid_request_error",
    429: "rate_limit_error",
}
CODES = {  # the code of a framework error, by status
    400: "bad_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    412: "precondition_failed",
    416: "range_not_satisfiable",
    429: "overloaded",
    503: "unavailable",
}
RETRY_AFTER_S = 5
JSON_HINT = 'send a JSON object such as {"script": "Speaker 1: Hello"}'
# Where an unknown route is answered in this shape; the page owns every other path.
API_PATHS = ("/v1/", "/metrics", "/health", "/ready", "/docs", "/redoc", "/openapi.json")


def status_for(err: PoolError) -> int:
    if isinstance(err, TooLarge):
        return 413
    if isinstance(err, VoiceNotFound):  # a named voice that is not there: a missing thing
        return 404
    if isinstance(err, VoiceUnreadable):  # a broken file on the server: not the client's
        return 500
    if isinstance(err, NotAudio):  # bytes in no format the route takes
        return 415
    return STATUS.get(err.kind, 500)


def error_code(err: PoolError) -> str:
    """error.code: the subclass's own (voice_not_found, unsupported_audio), else the kind."""
    return getattr(err, "code", None) or err.kind.value


def error_type(status: int) -> str:
    return TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, code: str, message: str) -> dict:
    """OpenAI's error shape, `param` included (OpenAI's SDK reads it; always null here:
    the message names the field)."""
    return {"error": {"message": message, "type": error_type(status), "param": None, "code": code}}


def error_response(err: PoolError) -> JSONResponse:
    status = status_for(err)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(error_body(status, error_code(err), err.message), status, headers=headers)


def plain_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status, headers=headers)


def body_parse_message(cause: BaseException | None, detail: str) -> str:
    """What was wrong with a body FastAPI could not parse, and what to send instead."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start}); {JSON_HINT}"
    if isinstance(cause, RecursionError):
        return f"the JSON body is nested too deeply; {JSON_HINT}"
    if isinstance(cause, ValueError):  # int() past sys.get_int_max_str_digits()
        limit = sys.get_int_max_str_digits()
        return f"a number in the JSON body has more than {limit} digits; {JSON_HINT}"
    return f"{detail}; {JSON_HINT}" if detail else JSON_HINT


def http_error(err: StarletteHTTPException) -> JSONResponse:
    """A framework HTTPException (or our own) in OpenAI's shape, its headers kept."""
    status = err.status_code
    detail = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
    if status == 400 and err.__cause__ is not None:
        message = body_parse_message(err.__cause__, detail)
    elif status == 404:
        message = "no such route; see /docs for the API"
    elif status == 405:
        allowed = (err.headers or {}).get("Allow", "")
        message = f"method not allowed here; use {allowed or 'another method'}"
    else:
        message = detail
    code = CODES.get(status, "server_error" if status >= 500 else "bad_input")
    return plain_error(status, code, message, headers=dict(err.headers or {}) or None)


def install(app, on_refused=None) -> None:
    """The framework's errors in OpenAI's shape (see the module docstring)."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, err: StarletteHTTPException):
        if on_refused is not None and err.status_code < 500:
            on_refused(CODES.get(err.status_code, "bad_input"))
        return http_error(err)

    @app.exception_handler(Exception)
    async def _unforeseen(_, err: Exception):
        # Starlette raises it again after this answer: uvicorn logs the traceback.
        return plain_error(
            500, "internal_error", f"the server failed on this request ({type(err).__name__})"
        )

    app.add_middleware(UnknownRoutes, owner=app)


async def send_json(send, status: int, body: dict, headers=()) -> None:
    """A JSON answer straight from ASGI middleware."""
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": head + list(headers or ())}
    )
    await send({"type": "http.response.body", "body": data})


async def send_error(send, status: int, code: str, message: str, headers=()) -> None:
    """An OpenAI-shaped JSON error straight from ASGI middleware."""
    await send_json(send, status, error_body(status, code, message), headers)


class UnknownRoutes:
    """404 and 405 in OpenAI's shape even where the page mounted at "/" would
    answer them (the page's mount takes every path no API route took, so an
    API path with the wrong method would otherwise be the page's 404).

    Only a 404 or 405 answer is looked at, and only when no API route fully
    matched the request (an API route's own 404, such as an unknown job, stays).
    """

    def __init__(self, inner, owner):
        self.inner = inner
        self.owner = owner  # the app whose routes to match, read at request time

    def _verdict(self, scope) -> tuple[int, str] | None:
        allowed: set[str] = set()
        for route in self.owner.router.routes:
            if isinstance(route, Mount) and route.path == "":
                continue  # the page
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return None
            if match is Match.PARTIAL:
                allowed |= set(getattr(route, "methods", None) or ())
        if allowed:
            return 405, ", ".join(sorted(allowed))
        path = scope.get("path", "")
        if path == "/v1" or path.startswith(API_PATHS):
            return 404, ""
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        replaced = False

        async def guarded(message):
            nonlocal replaced
            if replaced:
                return  # the body of the answer we replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                verdict = self._verdict(scope)
                if verdict is not None:
                    replaced = True
                    status, allow = verdict
                    if status == 405:
                        message = (
                            f"{scope['method']} is not allowed on {scope['path']}; use {allow}"
                        )
                        await send_json(
                            send,
                            405,
                            error_body(405, "method_not_allowed", message),
                            [(b"allow", allow.encode())],
                        )
                    else:
                        message = f"no route {scope['path'][:200]!r}; see /docs for the API"
                        await send_json(send, 404, error_body(404, "not_found", message))
                    return
            await send(message)

        await self.inner(scope, receive, guarded)


class FileAnswer(FileResponse):
    """A FileResponse whose Range errors (400 malformed, 416 past the end) are in
    OpenAI's shape, with Content-Range kept. As RFC 9110 14.2 asks (starlette does
    otherwise), a Range in a unit other than bytes is ignored (200, the whole file),
    and ranges past the end beside ones that are not are dropped (206 with the rest);
    416 is for a Range none of whose ranges is in the file. GET and HEAD evaluate the
    preconditions (RFC 9110 13.2.2, which starlette leaves out): an If-Match no ETag
    matches is 412, an If-None-Match that matches (or an If-Modified-Since the file
    is not newer than) is 304 with no body, before any Range."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        unit, equals, spec = http_range.partition("=")
        if equals and unit.strip().lower() != "bytes":
            return []  # a unit this server does not know: the whole file
        if equals and spec.count(",") < cls.max_ranges:
            ranges = cls._parse_ranges(spec, file_size)
            kept = [(start, end) for start, end in ranges if 0 <= start < file_size]
            if kept and len(kept) < len(ranges):
                http_range = "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in kept)
        return super()._parse_range_header(http_range, file_size)

    def _precondition(self, request: Headers) -> int | None:
        """412 or 304 when a precondition of the request fails, else None."""
        etag, modified = self.headers["etag"], parsedate_to_datetime(self.headers["last-modified"])

        def listed(field: str, weak: bool) -> bool:
            tags = [t.strip() for t in field.split(",")]
            if weak:
                return "*" in tags or etag in [t.removeprefix("W/") for t in tags]
            return "*" in tags or etag in tags

        def date(field: str | None):
            try:
                return parsedate_to_datetime(field) if field else None
            except (TypeError, ValueError):
                return None  # an invalid date is ignored (13.1.3, 13.1.4)

        if "if-match" in request:
            if not listed(request["if-match"], weak=False):
                return 412
        elif (since := date(request.get("if-unmodified-since"))) and modified > since:
            return 412
        if "if-none-match" in request:
            return 304 if listed(request["if-none-match"], weak=True) else None
        since = date(request.get("if-modified-since"))
        return 304 if since and modified <= since else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"].upper() in ("GET", "HEAD"):
            if self.stat_result is None:
                self.stat_result = await anyio.to_thread.run_sync(os.stat, self.path)
                self.set_stat_headers(self.stat_result)
            failed = self._precondition(Headers(scope=scope))
            if failed == 412:
                message = "the file does not match the request's If-Match or If-Unmodified-Since"
                return await send_json(send, 412, error_body(412, CODES[412], message))
            if failed == 304:
                dropped = (b"content-length", b"content-type", b"content-disposition")
                headers = [(k, v) for k, v in self.raw_headers if k.lower() not in dropped]
                await send({"type": "http.response.start", "status": 304, "headers": headers})
                return await send({"type": "http.response.body", "body": b""})
        held: dict | None = None

        async def guarded(message):
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in (400, 416):
                held = message
                return
            if held is None:
                return await send(message)
            if message["type"] != "http.response.body":
                return
            status = held["status"]
            extra = [(k, v) for k, v in held.get("headers", []) if k.lower() == b"content-range"]
            text = (message.get("body") or b"").decode("utf-8", "replace").strip()
            if status == 416:
                size = extra[0][1].decode().rsplit("/", 1)[-1] if extra else "?"
                body = error_body(
                    416,
                    CODES[416],
                    f"the Range asks for bytes past the end; the file has {size} bytes",
                )
            else:
                body = error_body(400, "bad_input", f"the Range header is malformed: {text}")
            held = None
            await send_json(send, status, body, extra)

        await super().__call__(scope, receive, guarded)
