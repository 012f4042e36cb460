"""Connection hygiene under uvicorn: file handles, header and body deadlines, a cap.

uvicorn has a keep-alive timeout and `limit_concurrency` (a 503 once the
request is read), but nothing bounds how long a client may take to send its
headers or its body, and it keeps accepting until the process runs out of file
handles, after which nobody (not /ready either) gets in. So the HTTP protocol
is wrapped here (uvicorn's httptools protocol, through `Config(http=...)`):

    raise_nofile()         soft RLIMIT_NOFILE -> the hard limit, at launch
    ConnectionGuard        one per server: every open connection and its phase
      headers  since the connection (or the previous response): header_timeout_s
      body     since the headers: body_timeout_s + bytes received / body_min_rate
      busy     the app holds the request: no deadline here (request_timeout_s)
      idle     keep-alive between requests: uvicorn's timeout_keep_alive
    guarded_protocol(guard) the protocol class uvicorn builds per connection

A connection past its deadline gets 408 and is closed (a sweep every
SWEEP_S); one that never sent a byte is closed without an answer. At the cap
(max_connections, lowered to fit the file-handle limit less the handles held
at start and FD_RESERVE) a new connection evicts the oldest one still sending
its headers, or else the oldest idle one; when every connection is busy the
new one gets 503.
Slow clients therefore cost at most a socket each, for a bounded time, and a
new client always gets in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vibevoice_pool.api.errors import error_body

log = logging.getLogger("vibevoice_pool")

FD_RESERVE = 128  # file handles kept for workers, logs, the jobs database, results
SWEEP_S = 1.0

HEADERS, BODY, BUSY, IDLE = "headers", "body", "busy", "idle"


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("Could not raise the open-file limit from %d: %s", soft, e)
            return soft, soft
        log.info("Open-file limit raised from %d to %d (the hard limit)", soft, target)
        return soft, target
    log.info("Open-file limit: %d (already the hard limit)", soft)
    return soft, soft


def open_fds() -> int:
    """File handles this process holds now (0 where /proc cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_cap(max_connections: int, nofile: int | None = None, in_use: int = 0) -> int:
    """max_connections, lowered so that connections never take the handles the
    server already holds (`in_use`) nor the FD_RESERVE it may still open."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, min(max_connections, nofile - in_use - FD_RESERVE))


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps(error_body(status, code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    if status == 503:
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


TIMED_OUT = _raw_response(
    408,
    "Request Timeout",
    "timeout",
    "the request was sent too slowly (headers past the header deadline, or a body under "
    "the minimum rate); send it again at a normal pace",
)
FULL = _raw_response(
    503,
    "Service Unavailable",
    "overloaded",
    "the server holds as many connections as it may, all busy; retry in a moment",
)


@dataclass
class _Conn:
    transport: asyncio.Transport
    phase: str
    since: float
    got: int = 0  # body bytes received in the body phase
    spoke: bool = False  # any byte received (a silent one is closed without a 408)


class ConnectionGuard:
    """Every open connection, its phase and its deadline (see the module doc)."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout_s: float,
        body_timeout_s: float,
        body_min_rate: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cap = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.body_min_rate = body_min_rate
        self.clock = clock
        self.conns: dict[object, _Conn] = {}  # in the order they opened
        self.timed_out = 0
        self.evicted = 0
        self.refused = 0
        self._sweeper: asyncio.TimerHandle | None = None

    # ---- the protocol's events ------------------------------------------------

    def opened(self, proto, transport) -> bool:
        """A new connection; False when it was refused (503, closed)."""
        now = self.clock()
        if len(self.conns) >= self.cap:
            self._drop_closed()  # (upgraded ones leave without telling)
        if len(self.conns) >= self.cap and not self._evict_one():
            self.refused += 1
            transport.write(FULL)
            transport.close()
            return False
        self.conns[proto] = _Conn(transport, HEADERS, now)
        self._arm()
        return True

    def closed(self, proto) -> None:
        self.conns.pop(proto, None)

    def phase(self, proto, phase: str) -> None:
        c = self.conns.get(proto)
        if c is not None and c.phase != phase:
            c.phase, c.since, c.got = phase, self.clock(), 0

    def heard(self, proto) -> None:
        c = self.conns.get(proto)
        if c is not None:
            c.spoke = True

    def body(self, proto, n: int) -> None:
        c = self.conns.get(proto)
        if c is not None and c.phase == BODY:
            c.got += n

    # ---- deadlines -------------------------------------------------------------

    def late(self, c: _Conn, now: float) -> bool:
        if c.phase == HEADERS:
            return now - c.since > self.header_timeout_s
        if c.phase == BODY:
            return now - c.since > self.body_timeout_s + c.got / self.body_min_rate
        return False

    def sweep(self) -> int:
        """Close every connection past its deadline with 408; returns how many."""
        now = self.clock()
        self._drop_closed()
        late = [(p, c) for p, c in self.conns.items() if self.late(c, now)]
        for proto, c in late:
            self.conns.pop(proto, None)
            self.timed_out += 1
            if c.spoke:
                c.transport.write(TIMED_OUT)
            c.transport.close()
        return len(late)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for its headers (else the
        longest idle one) to make room; False when all are busy."""
        for wanted in (HEADERS, IDLE):
            oldest = None
            for proto, c in self.conns.items():
                if c.phase == wanted and (oldest is None or c.since < oldest[1].since):
                    oldest = (proto, c)
            if oldest is not None:
                self.conns.pop(oldest[0], None)
                self.evicted += 1
                if wanted == HEADERS and oldest[1].spoke:
                    oldest[1].transport.write(TIMED_OUT)
                oldest[1].transport.close()
                return True
        return False

    def _drop_closed(self) -> None:
        gone = [p for p, c in self.conns.items() if c.transport.is_closing()]
        for p in gone:
            self.conns.pop(p, None)

    def _arm(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_S, self._tick)

    def _tick(self) -> None:
        self._sweeper = None
        try:
            self.sweep()
        except Exception:  # a sweep must never stop the loop's next one
            log.exception("connection sweep failed")
        if self.conns:
            self._arm()

    def stats(self) -> dict:
        phases: dict[str, int] = {}
        for c in self.conns.values():
            phases[c.phase] = phases.get(c.phase, 0) + 1
        return {
            "open": len(self.conns),
            "cap": self.cap,
            "phases": phases,
            "timed_out": self.timed_out,
            "evicted": self.evicted,
            "refused": self.refused,
        }


def guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's httptools protocol, reporting each phase to `guard`."""

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if not guard.opened(self, transport):
                self.connections.discard(self)

        def connection_lost(self, exc) -> None:
            guard.closed(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            guard.heard(self)
            super().data_received(data)

        def on_message_begin(self) -> None:
            guard.phase(self, HEADERS)
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            guard.phase(self, BODY)

        def on_body(self, body: bytes) -> None:
            guard.body(self, len(body))
            super().on_body(body)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            guard.phase(self, BUSY)

        def on_response_complete(self) -> None:
            super().on_response_complete()  # starts a pipelined request, if one waits
            busy = self.cycle is not None and not self.cycle.response_complete
            guard.phase(self, BUSY if busy else IDLE)

        def handle_websocket_upgrade(self) -> None:
            guard.phase(self, BUSY)  # the WebSocket protocol owns it from here
            super().handle_websocket_upgrade()

    return GuardedProtocol
