"""Large request bodies wait on disk, not in memory, while they arrive.

FastAPI reads a JSON body whole, and holds what has come while the rest
trickles in: forty 50 MB bodies left a little short would hold 2 GB. BodySpool,
the innermost middleware (after the key and the /v1 size limit), takes every
body over `spool_bytes` (or of unknown length) first: it writes it to an
unnamed temporary file as it arrives (the first `spool_bytes` in memory), and
calls the app only once the body is whole, replaying it from the file a chunk
at a time. A body over `max_bytes` gets 413 (at once when its Content-Length
says so); a client that leaves while sending costs nothing more, and the file
is gone as soon as it closes (unnamed: a crash leaves nothing behind either).
All the bodies being spooled at once may hold `total_bytes` of what has
arrived; the body whose bytes pass it gets 503, as does one the disk has no room
for (a full $TMPDIR, a file size limit; /metrics counts it in
vibevoice_pool_disk_full_total{folder="tmp"} too). What counts is what came, not
what a Content-Length declares: a declared length costs the client nothing to
send, so counting it let a few clients without a key (on the page's paths,
which the key middleware does not guard) hold the whole budget with a trickle
and refuse every large body, voice uploads with the key included.
How long a body may take is the connection guard's business (connections.py).

What crosses: ASGI messages only; the file lives in the system's temporary
folder ($TMPDIR).
"""

from __future__ import annotations

import tempfile

from vibevoice_pool.api.errors import send_error

CHUNK = 64 * 1024


class BodySpool:
    def __init__(
        self, app, spool_bytes: int, max_bytes: int, total_bytes: int = 4 << 30, activity=None
    ):
        self.app = app
        self.activity = activity  # counts its 503s (api/metrics.py), when given
        self.spool_bytes = spool_bytes
        self.max_bytes = max_bytes
        self.total_bytes = total_bytes  # all the bodies being spooled at once
        self.held = 0  # bytes the bodies being spooled hold now (what came of each)

    async def _full(self, send) -> None:
        if self.activity is not None:
            self.activity.refused("overloaded")
        await send_error(
            send,
            503,
            "overloaded",
            "the server is taking in as many large request bodies as it may at once; "
            "retry in a moment",
            [(b"retry-after", b"1")],
        )

    async def _no_room(self, send, e: OSError) -> None:
        if self.activity is not None:
            self.activity.refused("overloaded")
            self.activity.no_room("tmp", tempfile.gettempdir())
        await send_error(
            send,
            503,
            "overloaded",
            f"the server's temporary folder ({tempfile.gettempdir()}) has no room for this "
            f"request body ({e.strerror or e}); retry later, or send a smaller body",
            [(b"retry-after", b"5")],
        )

    async def _too_large(self, send) -> None:
        await send_error(
            send,
            413,
            "too_large",
            f"the request body is over {self.max_bytes / 2**20:.0f} MB, the server's limit; "
            "send shorter voice samples or fewer of them",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length, chunked = None, False
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked and (length is None or length <= self.spool_bytes):
            return await self.app(scope, receive, send)
        if length is not None and length > self.max_bytes:
            return await self._too_large(send)
        await self._spooled(scope, receive, send)

    async def _spooled(self, scope, receive, send) -> None:
        counted = 0  # what this body holds of self.held: the bytes that came
        try:
            with tempfile.SpooledTemporaryFile(max_size=self.spool_bytes) as spool:
                size = 0
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left: nobody to answer
                    data = message.get("body", b"")
                    size += len(data)
                    if size > self.max_bytes:
                        return await self._too_large(send)
                    if self.held + len(data) > self.total_bytes:
                        return await self._full(send)
                    self.held += len(data)
                    counted += len(data)
                    try:
                        spool.write(data)
                    except OSError as e:  # ENOSPC, EFBIG (RLIMIT_FSIZE), EROFS...
                        return await self._no_room(send, e)
                    if not message.get("more_body", False):
                        break
                await self._replay(scope, receive, send, spool, size)
        finally:
            self.held -= counted

    async def _replay(self, scope, receive, send, spool, size: int) -> None:
        spool.seek(0)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            data = spool.read(CHUNK)
            replayed = spool.tell() >= size
            return {"type": "http.request", "body": data, "more_body": not replayed}

        await self.app(scope, replay, send)
