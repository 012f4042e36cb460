"""An attacker for test_lockout.py, run as its own process: `python flood.py MODE
PORT N SECONDS`. It raises its open-file limit, opens N connections to
127.0.0.1:PORT from 127.0.0.1, and for SECONDS keeps them up, opening new ones
in place of those the server closed (every TOP_UP_S):

    streams  each sends `GET /gradio_api/heartbeat/<n>` and never reads
    bodies   each sends the headers of `POST /v1/synthesize` with
             Content-Length: 10,000,000, then BODY_RATE bytes a second

It prints a JSON line once its first N connections are opened ({"up": N}; SECONDS
count from then), and one at the end: connections opened, and how many were up at
each top-up.
"""

from __future__ import annotations

import errno
import json
import resource
import select
import socket
import sys
import time

TOP_UP_S = 5.0
BODY_RATE = 2048


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def request(mode: str, n: int) -> bytes:
    if mode == "streams":
        return f"GET /gradio_api/heartbeat/flood{n} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    return (
        b"POST /v1/synthesize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )


def connect(port: int, mode: str, n: int) -> socket.socket | None:
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        return None
    return s


def closed_ones(socks) -> list[socket.socket]:
    """Those the server closed (seen without reading: POLLRDHUP)."""
    poll = select.poll()  # (select() stops at file handle 1,024)
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poll.register(fd, select.POLLRDHUP)
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return [by_fd[fd] for fd, ev in poll.poll(0) if ev & gone]


def send(s: socket.socket, data: bytes) -> bool:
    try:
        s.send(data)
        return True
    except (BlockingIOError, InterruptedError):
        return True
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.ENOTCONN)


def main() -> None:
    mode, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    raise_nofile()
    socks: dict[socket.socket, bool] = {}  # socket -> its request sent
    opened, counts, serial = 0, [], 0
    end = None
    next_top_up = 0.0
    filler = b" " * BODY_RATE
    while end is None or time.monotonic() < end:
        now = time.monotonic()
        if now >= next_top_up:
            for s in closed_ones(socks):
                s.close()
                del socks[s]
            counts.append(len(socks))
            while len(socks) < n:
                s = connect(port, mode, serial)
                if s is None:
                    break
                socks[s] = False
                opened += 1
                serial += 1
            next_top_up = now + TOP_UP_S
            if end is None:  # the flood is up: the test's probes start now
                print(json.dumps({"up": len(socks)}), flush=True)
                end = now + seconds
        waiting = {s.fileno(): s for s, sent in socks.items() if not sent}
        poll = select.poll()
        for fd in waiting:
            poll.register(fd, select.POLLOUT)
        for fd, _ in poll.poll(50) if waiting else ():
            socks[waiting[fd]] = send(waiting[fd], request(mode, fd))
        if mode == "bodies":
            for s, sent in list(socks.items()):
                if sent and not send(s, filler):
                    socks[s] = True  # closed: the next top-up replaces it
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        else:
            time.sleep(0.05)
    print(json.dumps({"opened": opened, "up": counts}), flush=True)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
