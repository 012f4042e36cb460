"""One worker's request queue, parent side: a pipe the dispatcher writes itself.

Owns: the write end of the pipe a worker reads its Synthesize, Cancel and
Shutdown from, and an outbox for what the pipe cannot take right now.

A multiprocessing.Queue hands every message to a feeder thread, which must
get the GIL before it pickles and writes: a thread switch on the hot path of
every dispatch. Here the caller pickles and writes itself, without ever
blocking: the write end is non-blocking, and what the pipe does not take (a
worker that is busy, stopped or slow to read) goes to an outbox, in order,
that a sender thread writes as the pipe drains. While the outbox holds
anything, every later message joins it, so order is kept.

The framing is multiprocessing.Connection's, so the worker reads with an
ordinary Connection (`poll`, `recv`). A worker that is gone makes writes fail
with EPIPE: the message is dropped, as a Queue's feeder would drop it; the
supervisor's death handling requeues what that worker held.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import struct
import threading
from multiprocessing.reduction import ForkingPickler

log = logging.getLogger("vibevoice_pool")

F_SETPIPE_SZ = 1031  # Linux: ask for a bigger pipe (a voice sample is ~0.3 MB)
PIPE_BYTES = 1 << 20  # the unprivileged maximum by default


def frame(msg) -> bytes:
    """`msg` pickled and framed as Connection.send would write it."""
    data = ForkingPickler.dumps(msg)
    n = len(data)
    head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
    return head + bytes(data)


class RequestChannel:
    def __init__(self, ctx):
        self.reader, writer = ctx.Pipe(duplex=False)  # reader: give it to the worker
        self._writer = writer  # kept so the fd lives as long as we do
        self._fd = writer.fileno()
        os.set_blocking(self._fd, False)
        try:
            fcntl.fcntl(self._fd, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # a smaller pipe only means more goes through the outbox
        self._lock = threading.Lock()
        self._outbox: collections.deque[memoryview] = collections.deque()
        self._has_mail = threading.Condition(self._lock)
        self._closed = False
        self._broken = False
        self._sender: threading.Thread | None = None
        self.deferred = 0  # messages that went through the outbox (for tests and the record)

    def put(self, msg) -> None:
        """Send `msg`; never blocks on the worker. ValueError once closed."""
        data = memoryview(frame(msg))
        with self._lock:
            if self._closed:
                raise ValueError("the request channel is closed")
            if self._broken:
                return  # the worker is gone; the supervisor requeues its work
            if not self._outbox:
                data = self._write_some(data)
                if data is None:
                    return
            self.deferred += 1
            self._outbox.append(data)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, daemon=True)
                self._sender.name = "request-channel"
                self._sender.start()
            self._has_mail.notify()

    def reader_sent(self) -> None:
        """The worker has its copy of the read end: drop ours, so that writes to a
        worker that died fail with EPIPE instead of filling a pipe nobody reads."""
        self.reader.close()

    def close(self) -> None:
        """Drop what was not sent and close the write end (the worker sees EOF)."""
        with self._lock:
            self._closed = True
            self._outbox.clear()
            self._has_mail.notify()
        sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(timeout=1.0)
        self._writer.close()

    def pending(self) -> int:
        with self._lock:
            return len(self._outbox)

    # ---- internals -----------------------------------------------------

    def _write_some(self, data: memoryview) -> memoryview | None:
        """Write what the pipe takes now; the rest (None: nothing left)."""
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            return data
        except OSError as e:  # EPIPE: the worker is gone; anything else: so is the pipe
            if e.errno != errno.EPIPE:
                log.warning("a request pipe failed (%s); what it held is dropped", e)
            self._broken = True
            self._outbox.clear()
            return None
        return data[n:] if n < len(data) else None

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._outbox and not self._closed:
                    self._has_mail.wait()
                if self._closed:
                    return
                rest = self._write_some(self._outbox[0])
                if rest is None:
                    if self._outbox:  # _write_some may have cleared it (EPIPE)
                        self._outbox.popleft()
                    continue
                self._outbox[0] = rest
            try:  # wait, unlocked, until the worker has read some
                select.select([], [self._fd], [], 0.5)
            except (OSError, ValueError):
                return  # closed under us
