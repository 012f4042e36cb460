"""Who may call the server: API keys with roles, the page's login, the body-size limit.

    resolve_api_key(cfg)   --api-key, else $VIBEVOICE_POOL_API_KEY (read at launch)
    KeyRing / load_keys    the keys accepted, each a Caller (name, owner, role):
                           the one --api-key is an admin (owner "key:<hash>");
                           `--api-keys FILE` holds "name: [role:] key" lines
                           (owner "key:<name>"; an entry without a role is a user);
                           the server reads that file again when it changes
                           (live_keys.LiveKeys, which answers as a KeyRing does)
    roles                  admin: everything, worker actions (ADMIN_ROUTES),
                           /metrics, the presets; user: synthesis, its own jobs
                           and its own uploaded voices (api/voices.py checks those)
    ApiKeyMiddleware       every API route but /health and /ready needs
                           `Authorization: Bearer <key>`: 401 without one, 403
                           `admin_only` for a user on an admin route, and wrong
                           keys throttled per address (login_throttle.FailureLog:
                           429 `key_throttled`); the Caller goes to
                           scope["state"]["caller"] for the routes
    tenant_of(scope, keys) whom a live request waits its turn as: a named key's
                           owner, else "" (pool/fair_queue.py)
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
from typing import Callable, Protocol

from vibevoice_pool.api.errors import error_body, send_error, send_json
from vibevoice_pool.api.login_throttle import FailureLog, client_key

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
MIN_KEY_CHARS = 16  # a key in the file shorter than this is refused; --api-key: a warning
ADMIN, USER = "admin", "user"
ROLES = (ADMIN, USER)
DEFAULT_ROLE = USER  # a keys-file entry without a role: least privilege
# Routes only an admin key may call: (method, path pattern).
ADMIN_ROUTES = (
    ("GET", re.compile(r"^/metrics/?$")),
    ("POST", re.compile(r"^/v1/pool/workers/?$")),
    ("POST", re.compile(r"^/v1/pool/workers/[^/]+/restart/?$")),
    ("DELETE", re.compile(r"^/v1/pool/workers/[^/]+/?$")),
)


class KeyFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the line."""


def single_key_owner(key: str) -> str:
    """The owner of jobs made with the one --api-key (stable across restarts)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Caller:
    """Whom a request's key speaks for."""

    name: str
    owner: str  # what its jobs and uploaded voices belong to
    role: str = ADMIN

    @property
    def admin(self) -> bool:
        return self.role == ADMIN


KEYLESS = Caller("anyone", "", ADMIN)  # a server without keys: no roles


def caller_of(scope) -> Caller:
    """The Caller the key middleware found for this request (KEYLESS without keys)."""
    return (scope.get("state") or {}).get("caller") or KEYLESS


def tenant_of(scope, keys: Keys | None) -> str:
    """Whom a live request waits its turn as in the admission queue (pool/fair_queue.py):
    with --api-keys, the key's owner (the single --api-key beside them too); "" without
    them (no keys, or the single --api-key alone: one tenant, first in first out)."""
    return caller_of(scope).owner if keys is not None and keys.named else ""


@dataclass(frozen=True)
class KeyRing:
    """The keys the server accepts, each with its Caller."""

    entries: tuple[tuple[str, Caller], ...] = ()  # (key, caller)
    named: bool = False  # from --api-keys: each name owns its own jobs, even by id

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def first(self) -> str:
        return self.entries[0][0] if self.entries else ""

    def match(self, given: str) -> Caller | None:
        """The Caller of the key `given`, or None. Every key is compared."""
        found = None
        for key, caller in self.entries:
            if key_matches(key, given) and found is None:
                found = caller
        return found

    def caller(self, headers: list[tuple[bytes, bytes]]) -> Caller | None:
        return self.match(bearer_of(headers))

    def by_name(self, name: str | None) -> Caller | None:
        """The Caller of the key named `name` (a page login's user name), or None."""
        return next((c for _, c in self.entries if name and c.name == name), None)

    def owner_of(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        hit = self.caller(headers)
        return hit.owner if hit else None

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return bool(self.entries) and self.owner_of(headers) is not None


class Keys(Protocol):
    """What the routes ask of the keys in force: a KeyRing, or a LiveKeys (the
    --api-keys file, read again when it changes; live_keys.py)."""

    named: bool

    def __bool__(self) -> bool: ...

    def match(self, given: str) -> Caller | None: ...

    def caller(self, headers: list[tuple[bytes, bytes]]) -> Caller | None: ...

    def by_name(self, name: str | None) -> Caller | None: ...

    def allows(self, headers: list[tuple[bytes, bytes]]) -> bool: ...


def load_keys(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(name, key, role) of a keys file: 'name: [role:] key' a line, '#' comments,
    blank lines. role is admin or user; an entry without one is a user."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the keys file {p}: {e}") from None
    out: list[tuple[str, str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not KEY_NAME.match(name):
            raise KeyFileError(
                f"{p} line {n}: write 'name: key' or 'name: role: key' "
                "(name of letters, digits, _.@-; role admin or user)"
            )
        role, sep, rest = key.partition(":")
        if sep and role.strip().lower() in ROLES:
            role, key = role.strip().lower(), rest.strip()
        else:
            role = DEFAULT_ROLE
        if len(key) < MIN_KEY_CHARS:
            raise KeyFileError(f"{p} line {n}: the key of {name!r} is shorter than {MIN_KEY_CHARS}")
        if any(name == k for k, _, _ in out):
            raise KeyFileError(f"{p} line {n}: the name {name!r} is given twice")
        if any(key == v for _, v, _ in out):
            raise KeyFileError(f"{p} line {n}: the key of {name!r} is another name's key too")
        out.append((name, key, role))
    if not out:
        raise KeyFileError(f"the keys file {p} holds no keys")
    return out


def key_ring(api_key: str, keys_file: str = "") -> KeyRing:
    """The ring for --api-key (an admin) and --api-keys FILE (either, both or neither)."""
    return ring_of(api_key, load_keys(keys_file) if keys_file else [], named=bool(keys_file))


def ring_of(api_key: str, named_keys: list[tuple[str, str, str]], named: bool) -> KeyRing:
    """The ring of --api-key (an admin) and a keys file's (name, key, role) entries."""
    entries = []
    if api_key:
        entries.append((api_key, Caller("default", single_key_owner(api_key), ADMIN)))
    entries += [(key, Caller(name, f"key:{name}", role)) for name, key, role in named_keys]
    return KeyRing(tuple(entries), named=named)


def short_key_warning(api_key: str) -> str:
    """A line for the log when --api-key is shorter than MIN_KEY_CHARS ('' otherwise)."""
    if not api_key or len(api_key) >= MIN_KEY_CHARS:
        return ""
    return (
        f"The API key is {len(api_key)} characters long: it can be guessed. Use at least "
        f"{MIN_KEY_CHARS} random characters (python -c 'import secrets; "
        "print(secrets.token_urlsafe(24))')"
    )


def admin_only(method: str, path: str) -> bool:
    """Whether only an admin key may call this route (ADMIN_ROUTES)."""
    return any(method == m and rx.match(path) for m, rx in ADMIN_ROUTES)


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
    """401 for API paths without a right Bearer key, 403 for a user key on an admin
    route, 429 for an address past its failed-key budget (`failures`).

    `allow(path)` may let a path through on other grounds (the page's live audio
    streams carry an unguessable per-request token).
    """

    def __init__(
        self,
        app,
        key: str | Keys,
        on_refused: Callable[[str], None] | None = None,
        allow: Callable[[str], bool] | None = None,
        failures: FailureLog | None = None,
    ):
        self.app = app
        self.keys = key_ring(key) if isinstance(key, str) else key
        self.on_refused = on_refused
        self.allow = allow
        self.failures = failures if failures is not None else FailureLog()

    def _revoked(self, given: str) -> str | None:
        """The name of a key the keys file took away (LiveKeys), else None."""
        revoked = getattr(self.keys, "revoked_name", None)
        return revoked(given) if revoked is not None else None

    def _refuse(self, why: str) -> None:
        if self.on_refused is not None:
            self.on_refused(why)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_PATHS or not is_api_path(path):
            return await self.app(scope, receive, send)
        headers = scope.get("headers", [])
        given = bearer_of(headers)
        address = client_key((scope.get("client") or ("?", 0))[0])
        if given:
            wait = self.failures.retry_after(address, self.failures.clock())
            if wait is not None:
                self._refuse("key_throttled")
                return await send_error(
                    send,
                    429,
                    "key_throttled",
                    f"too many wrong API keys from this address; try again in {wait} s",
                    [(b"retry-after", str(wait).encode())],
                )
        caller = self.keys.match(given)
        if caller is not None:
            if not caller.admin and admin_only(scope.get("method", ""), path):
                self._refuse("admin_only")
                return await send_error(
                    send,
                    403,
                    "admin_only",
                    f"the key {caller.name!r} is a user key; this route needs an admin key "
                    "(role admin in the --api-keys file, or the --api-key)",
                )
            scope.setdefault("state", {})["caller"] = caller
            return await self.app(scope, receive, send)
        if self.allow is not None and self.allow(path):
            if given and not self._revoked(given):
                self.failures.record_failure(address)
            return await self.app(scope, receive, send)
        name = self._revoked(given)
        if name is not None:  # not a guess: a client still holding a key taken away
            self._refuse("key_revoked")
            return await send_error(
                send,
                401,
                "key_revoked",
                f"this API key (of {name!r}) was revoked from the server's keys file; "
                "ask its operator for a new one",
                [(b"www-authenticate", b"Bearer")],
            )
        if given:
            self.failures.record_failure(address)
        self._refuse("unauthorized")
        said = (
            "the API key sent is not one of this server's keys"
            if given
            else "this server needs an API key"
        )
        await send_json(
            send,
            401,
            error_body(
                401,
                "unauthorized",
                f"{said}: send the header 'Authorization: Bearer <key>' (the key given to "
                f"the server with --api-key or ${API_KEY_ENV})",
            ),
            [(b"www-authenticate", b"Bearer")],
        )


def page_login(
    key: str | Keys,
    on_login: Callable[[str, Caller], None] | None = None,
) -> Callable[[str, str], bool]:
    """Gradio's auth callable: an API key as the password, and any user name but
    another key's name. A user name that is a key's name is that key's own: the
    page then acts as that key's owner (its jobs are the ones the API lists).
    `on_login(user, caller)` hears each login let in (live_keys.PageSessions)."""
    keys = key_ring(key) if isinstance(key, str) else key

    def check(user: str, password: str) -> bool:
        caller = keys.match(password or "")
        named = keys.by_name(user)
        ok = caller is not None and (named is None or named == caller)
        if ok and on_login is not None:
            on_login(user, caller)
        return ok

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
