"""The connection guard (connections.py) with a fake clock and fake sockets:
deadlines, the caps per client and in all, what is evicted first; and the body
spool (spool.py) with fake ASGI messages. The same pieces face real sockets and
a real server in test_hostile.py and test_lockout.py."""

from __future__ import annotations

import asyncio

import pytest

from vibevoice_pool.api.connections import (
    BODY,
    BUSY,
    FD_RESERVE,
    IDLE,
    LINGER,
    LINGER_S,
    ConnectionGuard,
    client_of,
    connection_cap,
)
from vibevoice_pool.api.spool import BodySpool


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTransport:
    def __init__(self):
        self.written = b""
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:  # closes at once, whatever is still buffered
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed


def guard(clock, cap=4, per_client=64, streams=32, deadline=120.0) -> ConnectionGuard:
    g = ConnectionGuard(
        max_connections=cap,
        header_timeout_s=10,
        body_timeout_s=10,
        body_min_rate=1000,
        body_deadline_s=deadline,
        client_max_connections=per_client,
        client_max_streams=streams,
        clock=clock,
    )
    g._arm = lambda: None  # no event loop here: the test sweeps by hand
    return g


def status(t: FakeTransport) -> int:
    return int(t.written.split(b" ")[1]) if t.written else 0


def test_headers_past_their_deadline_get_408_and_are_closed():
    clock = Clock()
    g = guard(clock)
    slow, t_slow = object(), FakeTransport()
    quick, t_quick = object(), FakeTransport()
    silent, t_silent = object(), FakeTransport()
    assert g.opened(slow, t_slow) and g.opened(quick, t_quick) and g.opened(silent, t_silent)
    g.heard(slow)  # a few bytes of headers, never finished
    clock.t += 5
    g.phase(quick, BODY)
    g.phase(quick, BUSY)  # its request is in: no deadline while the app works
    clock.t += 5.5
    assert g.sweep() == 2
    assert t_slow.closed and t_slow.written.startswith(b"HTTP/1.1 408 ")
    assert t_silent.closed and t_silent.written == b""  # nothing asked, nothing answered
    assert not t_quick.closed and g.stats()["open"] == 1


def body_until_cut(g, clock, per_second: list[int], limit_s: int = 400) -> float:
    """Feed a body second by second; the seconds it lasted before the cut (or limit_s)."""
    p, t = object(), FakeTransport()
    g.opened(p, t)
    g.heard(p)
    g.phase(p, BODY)
    start = clock.t
    for n in per_second[:limit_s]:
        clock.t += 1
        g.body(p, n)
        g.sweep()
        if t.closed:
            assert status(t) == 408
            return clock.t - start
    return clock.t - start


def test_a_body_must_keep_the_minimum_rate_in_every_window():
    clock = Clock()
    g = guard(clock)
    # 500 bytes a second against a minimum of 1,000: cut at the end of the first window
    assert body_until_cut(g, clock, [500] * 60) == 10
    # at the minimum rate it is never cut (until its deadline, far away here)
    assert body_until_cut(g, clock, [1000] * 100) == 100
    # 50 MB at once, then a stall: what came before buys nothing (it used to buy 14 h)
    assert body_until_cut(g, clock, [50 << 20] + [0] * 100) <= 20
    # fast for a minute, then a byte a second: cut within two windows of slowing down
    assert 60 < body_until_cut(g, clock, [100_000] * 60 + [1] * 100) <= 80


def test_a_body_has_an_absolute_deadline():
    clock = Clock()
    g = guard(clock, deadline=30)
    # 10 MB declared, sent at twice the minimum rate: whole in 83 min, cut at 30 s
    assert body_until_cut(g, clock, [2000] * 6000) == 31


def test_idle_and_lingering_connections_end():
    clock = Clock()
    g = guard(clock)
    idle, t_idle = object(), FakeTransport()
    linger, t_linger = object(), FakeTransport()
    for p, t in ((idle, t_idle), (linger, t_linger)):
        g.opened(p, t)
        g.heard(p)
        g.phase(p, BUSY)
    g.phase(idle, IDLE)  # answered: keep-alive (stray CRLFs do not reset this)
    g.phase(linger, LINGER)  # answered before its body came; it keeps sending
    assert g.lingering(linger) and not g.lingering(idle)
    clock.t += LINGER_S + 0.5
    g.sweep()
    assert t_linger.closed and t_linger.written == b""  # its answer was already sent
    assert not t_idle.closed
    clock.t += 10
    g.sweep()
    assert t_idle.closed and t_idle.written == b""


def test_an_answer_the_client_does_not_read_is_cut_after_the_send_timeout():
    """A never-read stream held its connection and its request's audio for ever (busy
    has no deadline): once the transport pauses writing, it must drain in time."""
    clock = Clock()
    g = guard(clock)
    stuck, t_stuck = object(), FakeTransport()
    slow, t_slow = object(), FakeTransport()
    for p, t in ((stuck, t_stuck), (slow, t_slow)):
        g.opened(p, t)
        g.heard(p)
        g.phase(p, BODY)
        g.phase(p, BUSY)  # its answer is being streamed
        g.writing(p, paused=True)  # the socket's buffers are full
    for _ in range(59):
        clock.t += 1
        g.writing(slow, paused=False)  # it reads a little, then falls behind again
        g.writing(slow, paused=True)
        g.writing(stuck, paused=True)  # paused again says nothing new
        assert g.sweep() == 0
    clock.t += 2
    assert g.sweep() == 1
    # aborted: close() would wait for its buffers to drain, for ever
    assert t_stuck.aborted and t_stuck.written == b""  # its status line went long ago
    assert not t_slow.closed and g.stats()["timed_out"] == 1


def test_at_the_cap_the_oldest_header_sender_makes_room_and_busy_ones_stay():
    clock = Clock()
    g = guard(clock, cap=3)
    conns = [(object(), FakeTransport()) for _ in range(5)]
    for p, t in conns[:3]:
        assert g.opened(p, t)
        g.heard(p)
        clock.t += 1
    g.phase(conns[0][0], BUSY)
    assert g.opened(*conns[3])  # evicts conns[1], the oldest still sending headers
    assert conns[1][1].closed and not conns[0][1].closed
    for p, _ in conns[2:4]:
        g.phase(p, BUSY)
    # every connection busy: the new one is refused with 503
    assert not g.opened(*conns[4])
    assert status(conns[4][1]) == 503 and conns[4][1].closed
    g.phase(conns[2][0], IDLE)  # an idle keep-alive is evicted when nothing else is
    assert g.opened(object(), FakeTransport()) and conns[2][1].closed
    assert g.stats()["evicted"] == 2 and g.stats()["refused"] == 1


def test_a_client_at_its_cap_loses_its_own_oldest_and_no_one_else_s():
    clock = Clock()
    g = guard(clock, cap=100, per_client=4)
    other = [(object(), FakeTransport()) for _ in range(3)]
    for p, t in other:
        assert g.opened(p, t, "10.0.0.2")
    mine = [(object(), FakeTransport()) for _ in range(8)]
    for i, (p, t) in enumerate(mine[:4]):
        assert g.opened(p, t, "10.0.0.1")
        g.heard(p)
        g.phase(p, BODY if i == 0 else BUSY)
        clock.t += 1
    g.request(mine[3][0], "/ready")  # a health check: the last to go
    # a fifth: the oldest not in a request goes first (none), then the slow body
    assert g.opened(*mine[4], "10.0.0.1")
    assert mine[0][1].closed and status(mine[0][1]) == 429
    assert b"too_many_connections" in mine[0][1].written
    g.heard(mine[4][0])  # a new one sending its headers goes before the busy ones
    assert g.opened(*mine[5], "10.0.0.1")
    assert mine[4][1].closed
    # then the oldest request (closed without an answer: the app holds it)
    g.phase(mine[5][0], BUSY)
    assert g.opened(*mine[6], "10.0.0.1")
    assert mine[1][1].closed and mine[1][1].written == b""
    assert not mine[3][1].closed  # the health check stays
    assert not any(t.closed for _, t in other)
    assert g.stats()["most_of_one_client"] == 4 and g.stats()["clients"] == 2


def test_at_the_global_cap_the_heaviest_client_makes_room_even_when_busy():
    clock = Clock()
    g = guard(clock, cap=10, per_client=10)
    greedy = [(object(), FakeTransport()) for _ in range(9)]
    for p, t in greedy:
        assert g.opened(p, t, "10.0.0.1")
        g.heard(p)
        g.phase(p, BUSY)  # never-read streams, say
        clock.t += 1
    small, t_small = object(), FakeTransport()
    assert g.opened(small, t_small, "10.0.0.2")
    g.phase(small, BUSY)
    # full and all busy: another client still gets in, the greedy one loses its oldest
    newcomer, t_new = object(), FakeTransport()
    assert g.opened(newcomer, t_new, "10.0.0.3")
    assert greedy[0][1].closed and not t_small.closed
    # once no client holds more than the newcomer's would, a full busy server says 503
    g2 = guard(clock, cap=2, per_client=10)
    for addr in ("10.0.0.1", "10.0.0.2"):
        p = object()
        g2.opened(p, FakeTransport(), addr)
        g2.phase(p, BUSY)
    t3 = FakeTransport()
    assert not g2.opened(object(), t3, "10.0.0.3") and status(t3) == 503


def test_at_the_global_cap_a_crowd_of_one_connection_clients_of_one_network_makes_room():
    """Each IPv6 /64 is a client of its own, so one site's /48 holds 65,536 of them: at the
    cap, when no client holds more than another, their network is weighed instead."""
    clock = Clock()
    g = guard(clock, cap=6, per_client=10)
    crowd = []
    for i in range(5):  # five /64s of one /48, one busy connection each
        p, t = object(), FakeTransport()
        assert g.opened(p, t, f"2001:db8:1:{i:x}::1")
        g.phase(p, BUSY)
        crowd.append(t)
        clock.t += 1
    other, t_other = object(), FakeTransport()
    assert g.opened(other, t_other, "192.0.2.7")
    g.phase(other, BUSY)
    health, t_health = object(), FakeTransport()  # a health check from elsewhere gets in
    assert g.opened(health, t_health, "198.51.100.9")
    assert crowd[0].closed and status(crowd[0]) == 0 and not t_other.closed
    assert not any(t.closed for t in crowd[1:])
    g.phase(health, BUSY)
    # the crowd's own newcomer does not: its network already holds the most
    t_more = FakeTransport()
    assert not g.opened(object(), t_more, "2001:db8:1:ff::1") and status(t_more) == 503


def test_a_client_over_its_streams_is_refused_but_health_checks_and_others_pass():
    clock = Clock()
    g = guard(clock, per_client=10, streams=3, cap=100)
    protos = []
    for _ in range(4):
        p = object()
        g.opened(p, FakeTransport(), "10.0.0.1")
        protos.append(p)
    for p in protos[:3]:
        assert g.request(p, "/gradio_api/heartbeat/x")
        g.phase(p, BODY)
        g.phase(p, BUSY)
    assert not g.request(protos[3], "/gradio_api/heartbeat/y")
    assert g.request(protos[3], "/ready") and g.request(protos[3], "/health")
    other = object()
    g.opened(other, FakeTransport(), "10.0.0.2")
    assert g.request(other, "/v1/synthesize")
    g.phase(protos[0], IDLE)  # one answered: room for one more
    assert g.request(protos[3], "/gradio_api/heartbeat/y")
    assert g.stats()["streams_refused"] == 1


def test_refusals_are_reported_once_a_minute_not_once_each():
    clock = Clock()
    g = guard(clock, per_client=2, cap=100)
    for _ in range(50):
        g.opened(object(), FakeTransport(), "10.0.0.9")
        g.malformed()
    assert g.report() == ""  # not a minute yet
    clock.t += 61
    line = g.report()
    assert "48 evicted" in line and "50 malformed" in line and "(10.0.0.9)" in line, line
    assert g.report() == ""  # said once
    clock.t += 61
    assert g.report() == ""  # nothing new to say


def test_clients_are_addresses_and_ipv6_counts_by_64():
    assert client_of("127.0.0.1") != client_of("127.0.0.2")
    assert client_of("::ffff:10.1.2.3") == client_of("10.1.2.3") == "10.1.2.3"
    assert client_of("2001:db8::1") == client_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_of("2001:db8:0:1::1") != client_of("2001:db8::1")
    assert client_of(None) == client_of("") == "local"


def test_the_cap_leaves_file_handles_for_the_server():
    assert connection_cap(1000, nofile=1024) == 1024 - FD_RESERVE
    assert connection_cap(1000, nofile=1024, in_use=100) == 1024 - 100 - FD_RESERVE
    assert connection_cap(1000, nofile=1 << 20) == 1000


# ---- the body spool -----------------------------------------------------------


class Recorder:
    """An ASGI app that reads the whole body and notes when it was first called."""

    def __init__(self, log: list):
        self.log = log

    async def __call__(self, scope, receive, send):
        self.log.append("app")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.log.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run_spool(headers, chunks, spool_bytes=1024, max_bytes=10_000, leave=False, spool=None):
    log: list = []
    sent: list = []
    pending = list(chunks)

    async def receive():
        if pending:
            data = pending.pop(0)
            log.append(("chunk", len(data)))
            return {"type": "http.request", "body": data, "more_body": leave or bool(pending)}
        if leave:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    app = spool or BodySpool(Recorder(log), spool_bytes=spool_bytes, max_bytes=max_bytes)
    app.app = Recorder(log)
    scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": headers}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    return log, sent


def test_a_large_body_reaches_the_app_only_whole():
    chunks = [bytes([i]) * 1000 for i in range(8)]
    log, sent = run_spool([(b"content-length", b"8000")], chunks)
    assert [e for e in log if e == "app" or isinstance(e, tuple)][-1] == "app"  # after all
    assert log[-1] == b"".join(chunks) and sent[0]["status"] == 200
    # one of unknown length too (chunked)
    log, _ = run_spool([(b"transfer-encoding", b"chunked")], chunks)
    assert log.index("app") == 8 and log[-1] == b"".join(chunks)


def test_a_small_body_goes_straight_through_and_a_large_one_can_be_refused():
    log, _ = run_spool([(b"content-length", b"500")], [b"x" * 500])
    assert log[0] == "app"  # not held back
    log, sent = run_spool([(b"content-length", b"20000")], [b"x" * 1000])
    assert "app" not in log and sent[0]["status"] == 413 and log == []  # nothing read
    log, sent = run_spool([(b"transfer-encoding", b"chunked")], [b"x" * 6000] * 3)
    assert "app" not in log and sent[0]["status"] == 413


def test_a_client_that_leaves_mid_body_never_reaches_the_app():
    log, sent = run_spool([(b"content-length", b"8000")], [b"x" * 1000] * 3, leave=True)
    assert "app" not in log and sent == []


def test_the_bodies_spooled_at_once_have_a_budget():
    spool = BodySpool(None, spool_bytes=1024, max_bytes=100_000, total_bytes=20_000)
    spool.held = 15_000  # other bodies being taken in
    chunks = [b"x" * 1000] * 8
    log, sent = run_spool([(b"content-length", b"8000")], chunks, spool=spool)
    assert sent[0]["status"] == 503 and "app" not in log  # refused once it passed the budget
    log, sent = run_spool([(b"transfer-encoding", b"chunked")], chunks, spool=spool)
    assert sent[0]["status"] == 503 and "app" not in log  # refused once it passed the budget
    assert spool.held == 15_000
    spool.held = 0
    log, sent = run_spool([(b"content-length", b"8000")], chunks, spool=spool)
    assert sent[0]["status"] == 200 and spool.held == 0  # given back once answered
    log, sent = run_spool([(b"transfer-encoding", b"chunked")], chunks, spool=spool)
    assert sent[0]["status"] == 200 and spool.held == 0


def test_bodies_that_declare_much_and_send_little_leave_the_budget_to_others():
    """Declared lengths cost nothing to send: twenty bodies each declaring the whole
    budget and trickling a kilobyte used to hold it all, and every other large body
    (a voice upload with the key) got 503 for as long as they trickled."""
    spool = BodySpool(None, spool_bytes=1024, max_bytes=100_000, total_bytes=100_000)
    log: list = []
    spool.app = Recorder(log)

    def stalled_body():
        sent_once = False

        async def receive():
            nonlocal sent_once
            if not sent_once:
                sent_once = True
                return {"type": "http.request", "body": b"x" * 1000, "more_body": True}
            await asyncio.sleep(3600)  # a trickle that never ends (the guard cuts it)

        return receive

    async def scenario():
        async def nothing(_message):
            pass

        scope = {"type": "http", "method": "POST", "path": "/x"}
        declared = [(b"content-length", b"99000")]
        stalled = [
            asyncio.create_task(spool({**scope, "headers": declared}, stalled_body(), nothing))
            for _ in range(20)
        ]
        await asyncio.sleep(0.05)
        assert spool.held == 20 * 1000  # what came, not 20 x 99,000 declared
        chunks = [b"y" * 1000] * 8
        answers: list = []

        async def receive():
            more = len(chunks) > 1
            return {"type": "http.request", "body": chunks.pop(0), "more_body": more}

        async def send(message):
            answers.append(message)

        wanted = {**scope, "path": "/v1/voices", "headers": [(b"content-length", b"8000")]}
        await spool(wanted, receive, send)
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
        return answers

    answers = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert answers[0]["status"] == 200 and log[-1] == b"y" * 8000
    assert spool.held == 0  # the cancelled ones gave back what they held


@pytest.mark.parametrize("bad", [0, -1])
def test_caps_are_validated(bad):
    from vibevoice_pool.config import ConfigError, build

    with pytest.raises(ConfigError, match="client_max_connections"):
        build({"client_max_connections": bad})
    with pytest.raises(ConfigError, match="at most client_max_connections"):
        build({"client_max_connections": 4, "client_max_streams": 8})
