"""Throttling of key guesses per client address: the page's login (Gradio's POST
/login) here, the API's Bearer keys in auth.ApiKeyMiddleware. FailureLog counts;
LoginThrottle is the login's middleware over it.

Each address has a sliding window of its failures (window_s):
    fewer than slow_after (3)  answered at once
    slow_after or more         answered after a delay: 0.25 s, doubling with
                               each failure, up to max_delay_s (2 s)
    lock_after (8) or more     429 with Retry-After (the seconds until enough
                               failures leave the window), without asking
                               Gradio; a correct key is refused too until then
With the defaults (window_s 300) an address tries at most 8 passwords in 5
minutes. A success does not wipe the count (failures only age out of the
window): with roles, a user key must not buy more guesses at the admin key.

The address is the socket's peer (the server does not trust X-Forwarded-For:
behind a proxy every client shares the proxy's address, and the proxy should
throttle logins itself), grouped so that it cannot be changed at will: all of
127.0.0.0/8 is one address (any local process may bind any of them), an IPv6
address counts as its /64. Across all addresses, global_lock_after (100)
failures in the window lock every address that has failed itself in the
window; an address without a failure of its own is never locked by the
others (the operator is not locked out by an attacker), so many addresses at
once guess at most global_lock_after keys, plus one per fresh address, per window.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import OrderedDict, deque
from typing import Callable

from vibevoice_pool.api.errors import send_error

LOGIN_PATHS = ("/login", "/login/")
MAX_ADDRESSES = 10_000  # addresses remembered at once; the least recent go first
ALL = "*"  # the key of every address together


def client_key(host: str) -> str:
    """The address a login failure counts against (see the module doc)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FailureLog:
    """Failed key guesses per address (see the module doc); the clock is injected."""

    def __init__(
        self,
        *,
        window_s: float = 300.0,
        slow_after: int = 3,
        lock_after: int = 8,
        global_lock_after: int = 100,
        max_delay_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window_s = window_s
        self.slow_after = slow_after
        self.lock_after = lock_after
        self.global_lock_after = global_lock_after
        self.max_delay_s = max_delay_s
        self.clock = clock
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        # attempts being checked now count as failures until they answer, so a
        # burst of parallel guesses cannot slip past the lock together
        self.pending: dict[str, int] = {}

    def _recent(self, address: str, now: float) -> deque[float]:
        seen = self.failures.get(address)
        if seen is None:
            return deque()
        while seen and now - seen[0] >= self.window_s:
            seen.popleft()
        if not seen:
            del self.failures[address]
        return seen

    def delay_for(self, failures: int) -> float:
        if failures < self.slow_after:
            return 0.0
        return min(self.max_delay_s, 0.25 * 2 ** (failures - self.slow_after))

    def _wait(self, key: str, limit: int, now: float) -> int | None:
        seen = self._recent(key, now)
        over = len(seen) + self.pending.get(key, 0) - limit
        if over < 0:
            return None
        if over >= len(seen):  # only attempts still being checked: a moment
            return 1
        # the failure whose expiry brings the count under the limit
        return max(1, math.ceil(seen[over] + self.window_s - now))

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds until `address` may try again, or None when it may now."""
        mine = self._wait(address, self.lock_after, now)
        failed_here = len(self._recent(address, now)) + self.pending.get(address, 0)
        everyone = self._wait(ALL, self.global_lock_after, now) if failed_here else None
        waits = [w for w in (mine, everyone) if w is not None]
        return max(waits) if waits else None

    def record_failure(self, address: str) -> None:
        for key in (address, ALL):
            seen = self.failures.setdefault(key, deque())
            seen.append(self.clock())
            self.failures.move_to_end(key)
        while len(self.failures) > MAX_ADDRESSES:
            self.failures.popitem(last=False)

    def _count(self, key: str, step: int) -> None:
        left = self.pending.get(key, 0) + step
        if left:
            self.pending[key] = left
        else:
            self.pending.pop(key, None)


class LoginThrottle(FailureLog):
    """The page login's middleware: POST /login answered after delay_for, or 429."""

    def __init__(
        self,
        app,
        *,
        sleep: Callable[[float], object] = asyncio.sleep,
        on_refused: Callable[[str], None] | None = None,
        **counting,
    ):
        super().__init__(**counting)
        self.app = app
        self.sleep = sleep
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in LOGIN_PATHS
        ):
            return await self.app(scope, receive, send)
        address = client_key((scope.get("client") or ("?", 0))[0])
        now = self.clock()
        wait = self.retry_after(address, now)
        if wait is not None:
            if self.on_refused is not None:
                self.on_refused("login_throttled")
            return await send_error(
                send,
                429,
                "login_throttled",
                f"too many failed logins; try again in {wait} s",
                [(b"retry-after", str(wait).encode())],
            )
        delay = self.delay_for(len(self._recent(address, now)) + self.pending.get(address, 0))
        self._count(address, 1)
        self._count(ALL, 1)
        status = 0

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if delay:
                await self.sleep(delay)
            await self.app(scope, receive, watching_send)
        finally:
            self._count(address, -1)
            self._count(ALL, -1)
            if status >= 400:
                self.record_failure(address)  # 400 from Gradio: wrong key
