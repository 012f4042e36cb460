"""Connection hygiene under uvicorn: file handles, deadlines, and caps per client.

uvicorn has a keep-alive timeout and `limit_concurrency` (a 503 once the
request is read), but nothing bounds how long a client may take to send its
headers or its body, nor how many connections and requests one client holds:
one address with a thousand never-read streams or slow bodies would lock every
other client out, health checks included. So the HTTP protocol is wrapped
(protocol.py, through uvicorn's `Config(http=...)`) and reports each
connection's phase to the one ConnectionGuard of the server, here:

    raise_nofile()      soft RLIMIT_NOFILE -> the hard limit, at launch
    client_of(address)  the client a connection counts for: its IPv4 address,
                        or its IPv6 /64 (one host holds a whole /64)
    ConnectionGuard     every open connection: its client, phase and deadline
      headers  since the connection (or the previous answer): header_timeout_s
      body     since the headers: complete within body_deadline_s, whatever its
               size, and at least body_min_rate bytes/s over every window of
               body_timeout_s (a stalled body is cut however much it sent)
      busy     the app holds the request: no deadline here (request_timeout_s)
      stalled  in any phase, an answer the client does not read: once the socket's
               buffers are full (the transport paused writing), it must drain within
               send_timeout_s, else the connection is closed (a never-read stream
               held its request's audio, and its place, for ever)
      idle     keep-alive between requests: uvicorn's timeout_keep_alive, and
               header_timeout_s here (bytes that start no request do not reset it)
      linger   answered before its body arrived (400, 401, 403, 413...): the rest
               of the body must come within LINGER_S (it is dropped), else closed;
               and a connection the guard refused, closed after LINGER_S

The caps, in the order a connection meets them:
- a client at client_max_connections closes its own oldest connection to open
  one more (those not in the app first, then slow bodies, then requests);
- at max_connections (lowered to fit the file-handle limit), the client holding
  the most connections loses its oldest one, when it holds more than the new
  connection's client; else the oldest one waiting for its headers, or idle,
  goes; when every connection is busy the new one gets 503;
- a request that would give its client more than client_max_streams requests in
  the app at once (bodies arriving, answers being made or streamed) gets 429.
  /health and /ready are exempt, and are the last a client loses.
Slow or greedy clients therefore cost a bounded number of sockets for a bounded
time, and a client under its share always gets in.
"""

from __future__ import annotations

import asyncio
import functools
import http
import ipaddress
import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

from vibevoice_pool.api.errors import error_body

log = logging.getLogger("vibevoice_pool")

FD_RESERVE = 128  # file handles kept for workers, logs, the jobs database, results
SWEEP_S = 1.0
REPORT_S = 60.0  # at most one log line of refusals this often
LINGER_S = 2.0  # an answered connection still sending its body: dropped bytes, then closed

HEADERS, BODY, BUSY, IDLE, LINGER = "headers", "body", "busy", "idle", "linger"
HEALTH_PATHS = frozenset({"/health", "/ready"})


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


def client_of(address: str | None) -> str:
    """The client a peer address counts for: an IPv4 address (also when mapped
    into IPv6) as itself, an IPv6 address by its /64, anything else as 'local'."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return "local"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@functools.lru_cache(maxsize=4096)
def network_of(client: str) -> str:
    """The network a client (client_of) belongs to, weighed when the table is full and
    no one client holds more than another: an IPv4 /24, an IPv6 /48 (one site's
    allocation: its 65,536 /64s, each a client of its own, are one network here)."""
    if client == "local":
        return client
    net = ipaddress.ip_network(client, strict=False)
    return str(net.supernet(new_prefix=24 if net.version == 4 else 48))


def raw_error(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer in the API's error shape, written straight to a socket
    (the app never saw the request, or no longer holds it); it closes the connection."""
    body = json.dumps(error_body(status, code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n"
    )
    if status in (429, 503):
        head += "retry-after: 1\r\n"
    return head.encode() + b"\r\n" + body


TIMED_OUT = raw_error(
    408,
    "timeout",
    "the request was sent too slowly (headers past the header deadline, or a body under "
    "the minimum rate or past its deadline); send it again at a normal pace",
)
FULL = raw_error(
    503,
    "overloaded",
    "the server holds as many connections as it may, all busy; retry in a moment",
)
CLIENT_FULL = raw_error(
    429,
    "too_many_connections",
    "this address holds more connections than its share; this one, its oldest, was "
    "closed to let a newer one in",
)
TOO_MANY_STREAMS = raw_error(
    429,
    "too_many_streams",
    "this address has as many requests in progress as it may; finish or close some "
    "(streams that are never read count too) and retry",
)


@dataclass
class _Conn:
    transport: asyncio.Transport
    client: str
    phase: str
    since: float  # when the phase began
    opened: float
    got: int = 0  # body bytes received in the body phase
    mark: tuple[float, int] = (0.0, 0)  # start of the body's rate window: (time, got)
    spoke: bool = False  # any byte received (a silent one is closed without a 408)
    health: bool = False  # the request in progress is /health or /ready
    stalled: float | None = None  # since when its answer waits for the client to read

    @property
    def in_app(self) -> bool:
        return self.phase in (BODY, BUSY)


class ConnectionGuard:
    """Every open connection, its client, phase and deadline (see the module doc)."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout_s: float,
        body_timeout_s: float,
        body_min_rate: float,
        body_deadline_s: float = 120.0,
        send_timeout_s: float = 60.0,
        client_max_connections: int = 64,
        client_max_streams: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cap = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.body_min_rate = body_min_rate
        self.body_deadline_s = body_deadline_s
        self.send_timeout_s = send_timeout_s
        self.client_cap = client_max_connections
        self.client_streams = client_max_streams
        self.clock = clock
        self.conns: dict[object, _Conn] = {}  # in the order they opened
        self.by_client: dict[str, dict[object, None]] = {}  # each in the order they opened
        self.counts = {
            "timed_out": 0,
            "evicted": 0,
            "refused": 0,
            "streams_refused": 0,
            "malformed": 0,
        }
        self._reported = (clock(), dict(self.counts))  # the last REPORT_S line: when, counts
        self._sweeper: asyncio.TimerHandle | None = None

    # ---- the protocol's events ------------------------------------------------

    def opened(self, proto, transport, client: str = "local") -> bool:
        """A new connection; False when it was refused (503, closed)."""
        now = self.clock()
        mine = self.by_client.get(client, {})
        if len(mine) >= self.client_cap:
            self._drop_closed(mine)
            mine = self.by_client.get(client, {})
        while len(mine) >= self.client_cap and mine:
            self._evict(self._victim(client), CLIENT_FULL)
        if len(self.conns) >= self.cap:
            self._drop_closed()  # (upgraded ones leave without telling)
        if len(self.conns) >= self.cap and not self._make_room(client):
            self.counts["refused"] += 1
            transport.write(FULL)
            transport.close()
            return False
        self.conns[proto] = _Conn(transport, client, HEADERS, now, now)
        self.by_client.setdefault(client, {})[proto] = None
        self._arm()
        return True

    def closed(self, proto) -> None:
        c = self.conns.pop(proto, None)
        if c is not None:
            self._forget(proto, c)

    def phase(self, proto, phase: str) -> None:
        c = self.conns.get(proto)
        if c is not None and c.phase != phase:
            now = self.clock()
            c.phase, c.since, c.got, c.mark = phase, now, 0, (now, 0)
            if phase in (IDLE, LINGER):
                c.health = False

    def request(self, proto, path: str) -> bool:
        """A request's headers are in: False when its client already has
        client_max_streams requests in the app (the protocol answers 429)."""
        c = self.conns.get(proto)
        if c is None:
            return True
        c.health = path in HEALTH_PATHS
        if c.health:
            return True
        peers = self.by_client.get(c.client, {})
        in_app = sum(
            1 for p in peers if p is not proto and self.conns[p].in_app and not self.conns[p].health
        )
        if in_app >= self.client_streams:
            self.counts["streams_refused"] += 1
            return False
        return True

    def malformed(self) -> None:
        """A request that is not HTTP (answered 400 by the protocol)."""
        self.counts["malformed"] += 1

    def report(self) -> str:
        """One line of what the guard did since the last one, every REPORT_S at most
        (one per refusal would let a flood fill the log); '' when nothing."""
        now = self.clock()
        since, before = self._reported
        if now - since < REPORT_S:
            return ""
        done = {k: v - before[k] for k, v in self.counts.items() if v > before[k]}
        self._reported = (now, dict(self.counts))
        if not done:
            return ""
        top = max(self.by_client.items(), key=lambda kv: len(kv[1]), default=("", {}))
        what = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in done.items())
        return (
            f"Connections in the last {now - since:.0f} s: {what}; {len(self.conns)} open, "
            f"the most from one client {len(top[1])} ({top[0] or 'none'})"
        )

    def heard(self, proto) -> None:
        c = self.conns.get(proto)
        if c is not None:
            c.spoke = True

    def body(self, proto, n: int) -> None:
        c = self.conns.get(proto)
        if c is not None and c.phase == BODY:
            c.got += n

    def writing(self, proto, paused: bool) -> None:
        """The transport paused writing (the client reads slower than the answer
        comes, its buffers are full) or resumed (it read)."""
        c = self.conns.get(proto)
        if c is None:
            return
        if not paused:
            c.stalled = None
        elif c.stalled is None:
            c.stalled = self.clock()

    def lingering(self, proto) -> bool:
        c = self.conns.get(proto)
        return c is not None and c.phase == LINGER

    # ---- deadlines -------------------------------------------------------------

    def late(self, c: _Conn, now: float) -> bool:
        if c.stalled is not None and now - c.stalled > self.send_timeout_s:
            return True
        if c.phase == HEADERS or c.phase == IDLE:
            return now - c.since > self.header_timeout_s
        if c.phase == LINGER:
            return now - c.since > LINGER_S
        if c.phase == BODY:
            if now - c.since > self.body_deadline_s:
                return True
            t0, got0 = c.mark
            if now - t0 >= self.body_timeout_s:
                if c.got - got0 < self.body_min_rate * (now - t0):
                    return True
                c.mark = (now, c.got)  # this window kept the rate: a new one begins
        return False

    def sweep(self) -> int:
        """Close every connection past its deadline (408 to those that asked and
        were not answered); returns how many."""
        now = self.clock()
        self._drop_closed()
        late = [(p, c) for p, c in self.conns.items() if self.late(c, now)]
        for proto, c in late:
            self.counts["timed_out"] += 1
            self._close(proto, c, TIMED_OUT)
        return len(late)

    # ---- making room -------------------------------------------------------------

    def _rank(self, c: _Conn) -> tuple[int, float]:
        """Which of a client's connections goes first: not in the app (waiting for
        headers, idle, lingering), then bodies, then requests, health checks last;
        the oldest first within each."""
        if c.health:
            return 3, c.since
        return {BODY: 1, BUSY: 2}.get(c.phase, 0), c.since

    def _victim(self, client: str) -> object:
        mine = self.by_client[client]
        return min(mine, key=lambda p: self._rank(self.conns[p]))

    def _make_room(self, client: str) -> bool:
        """At the global cap: the heaviest client loses its oldest connection when it
        holds more than the newcomer's client; else the heaviest network (network_of),
        when it holds more than the newcomer's network; else the oldest connection waiting
        for its headers, or idle, goes. False when none can go."""
        heaviest = max(self.by_client, key=lambda k: len(self.by_client[k]), default=None)
        if heaviest is not None:
            theirs = len(self.by_client[heaviest])
            if theirs > len(self.by_client.get(client, {})) + 1:
                self._evict(self._victim(heaviest), CLIENT_FULL)
                return True
        # many clients of one connection each: weigh their networks the same way
        nets: dict[str, list] = {}
        for k, mine in self.by_client.items():
            nets.setdefault(network_of(k), []).extend(mine)
        crowd = max(nets.values(), key=len, default=[])
        if len(crowd) > len(nets.get(network_of(client), ())) + 1:
            self._evict(min(crowd, key=lambda p: self._rank(self.conns[p])), CLIENT_FULL)
            return True
        for wanted in (HEADERS, IDLE, LINGER):
            oldest = None
            for proto, c in self.conns.items():
                if c.phase == wanted and (oldest is None or c.since < oldest[1].since):
                    oldest = (proto, c)
            if oldest is not None:
                self._evict(oldest[0], TIMED_OUT)
                return True
        return False

    def _evict(self, proto, answer: bytes) -> None:
        self.counts["evicted"] += 1
        self._close(proto, self.conns[proto], answer)

    def _close(self, proto, c: _Conn, answer: bytes) -> None:
        """Forget it and close it; `answer` goes to a connection that asked and has no
        answer yet (its headers begun, or its body arriving). One whose client stopped
        reading is aborted: close() would wait for its full buffers to drain, for ever,
        keeping the socket, and the app blocked in its send holding the request."""
        self.conns.pop(proto, None)
        self._forget(proto, c)
        if c.stalled is not None:
            c.transport.abort()
            return
        if (c.phase == HEADERS and c.spoke) or c.phase == BODY:
            c.transport.write(answer)
        c.transport.close()

    def _forget(self, proto, c: _Conn) -> None:
        mine = self.by_client.get(c.client)
        if mine is not None:
            mine.pop(proto, None)
            if not mine:
                del self.by_client[c.client]

    def _drop_closed(self, among=None) -> None:
        """Forget the connections closed without telling (all, or those `among`)."""
        protos = self.conns if among is None else list(among)
        gone = [p for p in protos if self.conns[p].transport.is_closing()]
        for p in gone:
            self._forget(p, self.conns.pop(p))

    def _arm(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_S, self._tick)

    def _tick(self) -> None:
        self._sweeper = None
        try:
            self.sweep()
            line = self.report()
            if line:
                log.warning("%s", line)
        except Exception:  # a sweep must never stop the loop's next one
            log.exception("connection sweep failed")
        if self.conns:
            self._arm()

    def stats(self) -> dict:
        phases: dict[str, int] = {}
        for c in self.conns.values():
            phases[c.phase] = phases.get(c.phase, 0) + 1
        top = max((len(v) for v in self.by_client.values()), default=0)
        return {
            "open": len(self.conns),
            "cap": self.cap,
            "clients": len(self.by_client),
            "most_of_one_client": top,
            "phases": phases,
            **self.counts,
        }
