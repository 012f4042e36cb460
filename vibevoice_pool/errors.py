"""How a typed PoolError becomes an HTTP answer, in OpenAI's error shape:

    {"error": {"message": "...", "type": "...", "code": "<ErrorKind value>"}}

400 bad input, 401 no key, 413 too large, 429 overloaded (Retry-After),
503 no worker ready, 504 timed out; the server-side kinds are 5xx.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from vibevoice_pool.audio import TooLarge
from workers.messages import ErrorKind, PoolError

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
    413: "invalid_request_error",
    429: "rate_limit_error",
}
RETRY_AFTER_S = 5


def status_for(err: PoolError) -> int:
    return 413 if isinstance(err, TooLarge) else STATUS.get(err.kind, 500)


def error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "code": code}}


def error_response(err: PoolError) -> JSONResponse:
    status = status_for(err)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(error_body(status, err.kind.value, err.message), status, headers=headers)


def plain_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status, headers=headers)
