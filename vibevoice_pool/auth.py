"""Who may call the server: the API key, the page's login, and the body-size limit.

    resolve_api_key(cfg)   --api-key, else $VIBEVOICE_POOL_API_KEY (read at launch)
    ApiKeyMiddleware       every API route but /health and /ready needs
                           `Authorization: Bearer <key>`; 401 otherwise
    page_login(key)        the Gradio page's login check (any user name, the key
                           as password); Gradio guards its own routes with it
    BodyLimitMiddleware    a request body over the limit is answered 413 before
                           it is read (Content-Length) or as soon as it passes
                           the limit (chunked)

Both middlewares are plain ASGI, so streamed responses and disconnect
detection pass through untouched. Errors are in OpenAI's shape (errors.py).
"""

from __future__ import annotations

import hmac
import os
from typing import Callable

from vibevoice_pool.errors import error_body

API_KEY_ENV = "VIBEVOICE_POOL_API_KEY"
OPEN_PATHS = ("/health", "/ready")
# Paths the API key guards. Everything else belongs to the Gradio page, which
# guards itself with its login (its routes answer 401 without the session).
API_PREFIXES = ("/v1/", "/metrics", "/docs", "/redoc", "/openapi.json", "/ui/stream/")


def resolve_api_key(configured: str, environ=None) -> str:
    """The key to require: the setting, else the environment variable; '' for none."""
    env = os.environ if environ is None else environ
    return (configured or env.get(API_KEY_ENV, "")).strip()


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


def key_matches(key: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def bearer_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """401 for API paths without the right Bearer key.

    `allow(path)` may let a path through on other grounds (the page's live audio
    streams carry an unguessable per-request token).
    """

    def __init__(
        self,
        app,
        key: str,
        on_refused: Callable[[str], None] | None = None,
        allow: Callable[[str], bool] | None = None,
    ):
        self.app = app
        self.key = key
        self.on_refused = on_refused
        self.allow = allow

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_PATHS or not is_api_path(path):
            return await self.app(scope, receive, send)
        if key_matches(self.key, bearer_of(scope.get("headers", []))):
            return await self.app(scope, receive, send)
        if self.allow is not None and self.allow(path):
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused("unauthorized")
        await _send_json(
            send,
            401,
            error_body(
                401,
                "unauthorized",
                "this server needs an API key: send the header 'Authorization: Bearer <key>' "
                "(the key given to the server with --api-key or $" + API_KEY_ENV + ")",
            ),
            [(b"www-authenticate", b"Bearer")],
        )


def page_login(key: str) -> Callable[[str, str], bool]:
    """Gradio's auth callable: any user name, the API key as the password."""

    def check(_user: str, password: str) -> bool:
        return key_matches(key, password or "")

    return check


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes` on API paths (Gradio has its own limit)."""

    def __init__(self, app, max_bytes: int, on_refused: Callable[[str], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused

    def _message(self) -> dict:
        n = self.max_bytes
        limit = f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"
        return error_body(
            413,
            "too_large",
            f"the request body is over {limit}, the server's limit; send shorter voice "
            "samples or fewer of them",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                if self.on_refused is not None:
                    self.on_refused("too_large")
                return await _send_json(send, 413, self._message())
        seen = 0
        over = False
        started = False

        async def limited_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # the answer is our 413, not whatever the app made of a cut body
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            if self.on_refused is not None:
                self.on_refused("too_large")
            await _send_json(send, 413, self._message())
