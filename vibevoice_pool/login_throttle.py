"""Throttling of the page's login (Gradio's POST /login), per client address.

Each address has a sliding window of its failed logins (window_s):
    fewer than slow_after (3)  answered at once
    slow_after or more         answered after a delay: 0.25 s, doubling with
                               each failure, up to max_delay_s (2 s)
    lock_after (8) or more     429 with Retry-After (the seconds until enough
                               failures leave the window), without asking
                               Gradio; a correct key is refused too until then
With the defaults (window_s 300) an address tries at most 8 passwords in 5
minutes.
A successful login clears the address. The address is the socket's peer (the
server does not trust X-Forwarded-For: behind a proxy every client shares the
proxy's address, and the proxy should throttle logins itself).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from typing import Callable

from vibevoice_pool.origin import send_error

LOGIN_PATHS = ("/login", "/login/")
MAX_ADDRESSES = 10_000  # addresses remembered at once; the least recent go first


class LoginThrottle:
    def __init__(
        self,
        app,
        *,
        window_s: float = 300.0,
        slow_after: int = 3,
        lock_after: int = 8,
        max_delay_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
        on_refused: Callable[[str], None] | None = None,
    ):
        self.app = app
        self.window_s = window_s
        self.slow_after = slow_after
        self.lock_after = lock_after
        self.max_delay_s = max_delay_s
        self.clock = clock
        self.sleep = sleep
        self.on_refused = on_refused
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

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds until `address` may try again, or None when it may now."""
        seen = self._recent(address, now)
        over = len(seen) + self.pending.get(address, 0) - self.lock_after
        if over < 0:
            return None
        if over >= len(seen):  # only attempts still being checked: a moment
            return 1
        # the failure whose expiry brings the count under lock_after
        ends = seen[over] + self.window_s
        return max(1, math.ceil(ends - now))

    def _record(self, address: str, ok: bool) -> None:
        if ok:
            self.failures.pop(address, None)
            return
        seen = self.failures.setdefault(address, deque())
        seen.append(self.clock())
        self.failures.move_to_end(address)
        while len(self.failures) > MAX_ADDRESSES:
            self.failures.popitem(last=False)

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in LOGIN_PATHS
        ):
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("?", 0))[0]
        now = self.clock()
        wait = self.retry_after(address, now)
        if wait is not None:
            if self.on_refused is not None:
                self.on_refused("login_throttled")
            return await send_error(
                send,
                429,
                "login_throttled",
                f"too many failed logins from this address; try again in {wait} s",
                [(b"retry-after", str(wait).encode())],
            )
        delay = self.delay_for(len(self._recent(address, now)) + self.pending.get(address, 0))
        self.pending[address] = self.pending.get(address, 0) + 1
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
            left = self.pending[address] - 1
            if left:
                self.pending[address] = left
            else:
                del self.pending[address]
            if status == 200:
                self._record(address, True)
            elif status >= 400:
                self._record(address, False)  # 400 from Gradio: wrong key
