"""Who may call the server: the API key, the page's login, and the body-size limit.

    resolve_api_key(cfg)   --api-key, else $VIBEVOICE_POOL_API_KEY (read at launch)
    KeyRing / load_keys    the keys accepted: that one key (owner "key:<hash>"),
                           and the named keys of `--api-keys FILE` ("name: key"
                           lines; owner "key:<name>"); jobs belong to the owner
    ApiKeyMiddleware       every API route but /health and /ready needs
                           `Authorization: Bearer <key>`; 401 otherwise
    page_login(keys)       the Gradio page's login check (any user name, a key
                           as password); Gradio guards its own routes with it
    BodyLimitMiddleware    a request body over the limit is answered 413 before
                           it is read (Content-Length) or as soon as it passes
                           the limit (chunked)

Both middlewares are plain ASGI, so streamed responses and disconnect
detection pass through untouched. Errors are in OpenAI's shape (errors.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vibevoice_pool.api.errors import error_body, send_json

API_KEY_ENV = "VIBEVOICE_POOL_API_KEY"
OPEN_PATHS = ("/health", "/ready")
# Paths the API key guards. Everything else belongs to the Gradio page, which
# guards itself with its login (its routes answer 401 without the session).
API_PREFIXES = ("/v1/", "/metrics", "/docs", "/redoc", "/openapi.json", "/ui/stream/")


def resolve_api_key(configured: str, environ=None) -> str:
    """The key to require: the setting, else the environment variable; '' for none."""
    env = os.environ if environ is None else environ
    return (configured or env.get(API_KEY_ENV, "")).strip()


KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_KEY_CHARS = 16  # a key in the file shorter than this is refused at launch


class KeyFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the line."""


def single_key_owner(key: str) -> str:
    """The owner of jobs made with the one --api-key (stable across restarts)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class KeyRing:
    """The keys the server accepts, each with the owner its jobs belong to."""

    entries: tuple[tuple[str, str, str], ...] = ()  # (name, key, owner)
    named: bool = False  # from --api-keys: each name owns its own jobs, even by id

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def first(self) -> str:
        return self.entries[0][1] if self.entries else ""

    def match(self, given: str) -> tuple[str, str] | None:
        """(name, owner) of the key `given`, or None. Every key is compared."""
        found = None
        for name, key, owner in self.entries:
            if key_matches(key, given) and found is None:
                found = (name, owner)
        return found

    def owner_of(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        hit = self.match(bearer_of(headers))
        return hit[1] if hit else None

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return bool(self.entries) and self.owner_of(headers) is not None


def load_keys(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, key) pairs of a keys file: 'name: key' a line, '#' comments, blank lines."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the keys file {p}: {e}") from None
    out: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not KEY_NAME.match(name):
            raise KeyFileError(f"{p} line {n}: write 'name: key' (name of letters, digits, _.@-)")
        if len(key) < MIN_KEY_CHARS:
            raise KeyFileError(f"{p} line {n}: the key of {name!r} is shorter than {MIN_KEY_CHARS}")
        if any(name == k for k, _ in out):
            raise KeyFileError(f"{p} line {n}: the name {name!r} is given twice")
        if any(key == v for _, v in out):
            raise KeyFileError(f"{p} line {n}: the key of {name!r} is another name's key too")
        out.append((name, key))
    if not out:
        raise KeyFileError(f"the keys file {p} holds no keys")
    return out


def key_ring(api_key: str, keys_file: str = "") -> KeyRing:
    """The ring for --api-key and --api-keys FILE (either, both or neither)."""
    entries = []
    if api_key:
        entries.append(("default", api_key, single_key_owner(api_key)))
    if keys_file:
        entries += [(name, key, f"key:{name}") for name, key in load_keys(keys_file)]
    return KeyRing(tuple(entries), named=bool(keys_file))


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


class ApiKeyMiddleware:
    """401 for API paths without the right Bearer key.

    `allow(path)` may let a path through on other grounds (the page's live audio
    streams carry an unguessable per-request token).
    """

    def __init__(
        self,
        app,
        key: str | KeyRing,
        on_refused: Callable[[str], None] | None = None,
        allow: Callable[[str], bool] | None = None,
    ):
        self.app = app
        self.keys = key if isinstance(key, KeyRing) else key_ring(key)
        self.on_refused = on_refused
        self.allow = allow

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_PATHS or not is_api_path(path):
            return await self.app(scope, receive, send)
        if self.keys.allows(scope.get("headers", [])):
            return await self.app(scope, receive, send)
        if self.allow is not None and self.allow(path):
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused("unauthorized")
        await send_json(
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


def page_login(key: str | KeyRing) -> Callable[[str, str], bool]:
    """Gradio's auth callable: any user name, an API key as the password."""
    keys = key if isinstance(key, KeyRing) else key_ring(key)

    def check(_user: str, password: str) -> bool:
        return keys.match(password or "") is not None

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
                return await send_json(send, 413, self._message())
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
            await send_json(send, 413, self._message())
