"""Browser-origin safety: which Host names are served, and which writes a browser may send.

A server on loopback is still reachable from any web page the same person has
open: a page can POST a form to 127.0.0.1 (a cross-site write), and a
DNS-rebinding page can read the answers under its own host name. So, before
anything else (ASGI, outermost):

    Host       must be one of allowed_hosts(): the loopback names, the address
               bound, `--allowed-hosts` (a leading '*.' matches subdomains,
               '*' alone anything); otherwise 400 (bad_host).
    writes     POST/PUT/PATCH/DELETE (and WebSocket opens) that a browser marks
               as coming from another site (Sec-Fetch-Site cross-site or
               same-site, or an Origin that is not this server nor a
               configured CORS origin) get 403 (cross_site), unless a valid
               API key is sent (a page on another site cannot send one).
    admin      the worker routes (/v1/pool/workers...) change the pool: on a
               server without a key they need `Content-Type: application/json`
               (a body such as {}), which no plain form or image can send; else
               403. With a key, the key is what they need (401 without it).

Clients that are not browsers (curl, the openai package, gradio_client) send no
Origin and no Sec-Fetch-Site, and pass. The page's own requests are same-origin.
"""

from __future__ import annotations

import socket
from typing import Callable
from urllib.parse import urlsplit

from vibevoice_pool.api.errors import send_error

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ADMIN_PREFIX = "/v1/pool/workers"
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # Sec-Fetch-Site values let through
SHARE_HOSTS = ("*.gradio.live",)  # Gradio's share links forward their own Host


def _machine_names() -> set[str]:
    """The names and addresses this machine answers on (for a wildcard bind)."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(a.address.split("%", 1)[0].lower())
    except Exception:  # no psutil or no interfaces: the names above and the flag remain
        pass
    return names


def allowed_hosts(bind: str, listed: str, share: bool = False) -> frozenset[str]:
    """The Host names to serve: loopback, the bound address (every local name and
    address when bound to all interfaces), and the comma-separated `listed`."""
    hosts = set(LOOPBACK_HOSTS)
    bind = (bind or "").strip().lower()
    if bind in WILDCARD_BINDS:
        hosts |= _machine_names()
    else:
        hosts.add(bind)
    hosts |= {h.strip().lower() for h in listed.split(",") if h.strip()}
    if share:
        hosts |= set(SHARE_HOSTS)
    return frozenset(hosts)


def host_name(value: str) -> str:
    """The name of a Host header value, without its port: '[::1]:80' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a bare name, or a bare IPv6 address


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    name = host_name(host).rstrip(".")
    if not name:
        return False
    if "*" in allowed or name in allowed:
        return True
    return any(a.startswith("*.") and name.endswith(a[1:]) for a in allowed)


def _origin_authority(origin: str) -> str | None:
    """'https://a.example:8443' -> 'a.example:8443'; None for 'null' or junk."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = 443 if parts.scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError:
        return None
    return f"{parts.hostname}:{port}"


def _host_authority(host: str, scheme: str) -> str:
    """'[::1]:7860' -> '::1:7860'; the scheme's default port when none is given."""
    h = host.strip().lower()
    if h.startswith("["):
        name, _, rest = h[1:].partition("]")
        port = rest[1:]
    elif h.count(":") == 1:
        name, port = h.split(":")
    else:
        name, port = h, ""
    if not port.isdigit():
        port = "443" if scheme in ("https", "wss") else "80"
    return f"{name}:{int(port)}"


def is_cross_site(headers: dict[str, str], scheme: str, cors_origins: tuple[str, ...]) -> bool:
    """Whether a browser marked this request as coming from another site.

    Sec-Fetch-Site is the browser's own verdict; with only an Origin, it must be
    this server (scheme-less: host and port) or a configured CORS origin.
    """
    origin = headers.get("origin")
    if origin is not None and origin.strip() in cors_origins:
        return False
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in SAME_ORIGIN_FETCH
    if origin is None:
        return False  # not a browser, or a browser too old to say: nothing to compare
    theirs = _origin_authority(origin)
    return theirs is None or theirs != _host_authority(headers.get("host", ""), scheme)


class BrowserGuard:
    """The Host allow-list, the cross-site write refusal and the admin rule (module doc).

    `key_ok(headers)` says whether the request carries a valid API key (always
    False when the server has none); `keyed` whether the server has one (then
    the admin rule is the key itself).
    """

    def __init__(
        self,
        app,
        allowed: frozenset[str],
        key_ok: Callable[[list[tuple[bytes, bytes]]], bool],
        cors_origins: tuple[str, ...] = (),
        on_refused: Callable[[str], None] | None = None,
        keyed: bool = False,
    ):
        self.app = app
        self.keyed = keyed
        self.allowed = allowed
        self.key_ok = key_ok
        self.cors_origins = tuple(cors_origins)
        self.on_refused = on_refused

    def verdict(self, scope) -> tuple[int, str, str] | None:
        """(status, code, message) to refuse with, or None to let it through."""
        raw = scope.get("headers", [])
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed):
            return (
                400,
                "bad_host",
                f"this server does not answer to the host name {host_name(host)!r}; "
                "use its address (127.0.0.1 or localhost), or start it with "
                "--allowed-hosts NAME to serve that name",
            )
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        if method not in UNSAFE_METHODS and method != "WEBSOCKET":
            return None
        if self.key_ok(raw):
            return None
        if is_cross_site(headers, scope.get("scheme", "http"), self.cors_origins):
            return (
                403,
                "cross_site",
                "a page of another site may not change this server; send the request "
                "from the server's own page, from a program (no Origin header), or "
                "with the API key ('Authorization: Bearer <key>')",
            )
        if self.keyed:
            return None  # the API routes need the key anyway (auth.ApiKeyMiddleware)
        path = scope.get("path", "")
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if path.startswith(ADMIN_PREFIX) and ctype != "application/json":
            return (
                403,
                "admin_needs_json",
                "worker actions need a JSON body (Content-Type: application/json, "
                "e.g. {}) or the API key, so that no web page can trigger them",
            )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self.verdict(scope)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, code, message = refusal
        if self.on_refused is not None:
            self.on_refused(code)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(send, status, code, message)
