"""The HTTP protocol uvicorn runs per connection: its httptools protocol, reporting
each phase to the ConnectionGuard (connections.py) and refusing what must never
reach the app.

    connection_made     guard.opened: the caps of connections (may close it at once)
    data_received       request line and headers over max_header_bytes: 431
                        (counted before the parser holds them)
    _refuse             a refusal is answered, then the connection lingers: its write
                        side shut, what still comes dropped, closed after LINGER_S
    on_headers_complete two Host headers: 400 bad_host; a client over its streams:
                        429 (guard.request); else the app gets the request (body phase)
    on_message_complete the request is whole: busy
    pause_writing /     the client stopped reading an answer / read again: the guard's
    resume_writing      send_timeout_s runs while it is paused
    on_response_complete idle, or linger when the body had not all arrived (answered
                        early: 400 bad_host, 401, 403, 413...): the rest is read and
                        dropped, and the connection closed unless it is whole in LINGER_S

What crosses: the guard's calls, and whole raw answers (connections.raw_error)
written to the socket where the app never saw the request.
"""

from __future__ import annotations

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vibevoice_pool.api.connections import (
    BODY,
    BUSY,
    HEADERS,
    IDLE,
    LINGER,
    TOO_MANY_STREAMS,
    ConnectionGuard,
    client_of,
    raw_error,
)

TWO_HOSTS = raw_error(
    400, "bad_host", "the request has more than one Host header; send exactly one"
)
MALFORMED = raw_error(400, "bad_input", "the request is not valid HTTP/1.1")


def headers_too_large(limit: int) -> bytes:
    return raw_error(
        431,
        "headers_too_large",
        f"the request line and headers are over {limit // 1024} KiB, the server's limit "
        "(max_header_kb); send fewer or shorter headers",
    )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


def guarded_protocol(guard: ConnectionGuard, max_header_bytes: int = 64 * 1024) -> type:
    """uvicorn's httptools protocol, reporting each phase to `guard`."""
    too_large = headers_too_large(max_header_bytes)

    class GuardedProtocol(HttpToolsProtocol):
        _head = 0  # bytes of the request line and headers so far
        _in_head = True  # between requests, or in the middle of one's headers
        _hosts = 0
        _refusal = b""  # the answer that replaces uvicorn's own 400
        _refused = False  # answered by the guard: the parser is not fed again

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            client = client_of(self.client[0] if self.client else None)
            if not guard.opened(self, transport, client):
                self.connections.discard(self)

        def connection_lost(self, exc) -> None:
            guard.closed(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing() or self._refused:
                return  # refused: what is still sent is dropped until the close
            guard.heard(self)
            if self._in_head:
                room = max_header_bytes - self._head
                if len(data) > room:
                    head, rest = data[:room], data[room:]
                    self._head = max_header_bytes
                    if head:
                        self._feed(head)
                    if self._in_head:  # the headers did not end within the limit
                        self._refuse(too_large)
                    elif rest and not self.transport.is_closing():
                        self.data_received(rest)
                    return
                self._head += len(data)
            self._feed(data)

        def _feed(self, data: bytes) -> None:
            """uvicorn's data_received, less its warning on every refused request
            (a flood of them would fill the log): the guard counts them instead."""
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                if not self._refusal:
                    guard.malformed()
                self._refuse(self._refusal or MALFORMED)

        def _refuse(self, answer: bytes) -> None:
            """Answer and stop: what the client still sends is read and dropped for
            LINGER_S (closing at once would reset the connection under the answer)."""
            if self.transport.is_closing():
                return
            self._refused = True
            self.transport.write(answer)
            if guard.lingering(self) or not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write_eof()
            guard.phase(self, LINGER)
            if not guard.lingering(self):  # a connection the guard does not hold
                self.transport.close()

        def on_message_begin(self) -> None:
            self._hosts = 0
            self._in_head = True
            guard.phase(self, HEADERS)
            super().on_message_begin()

        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() == b"host":
                self._hosts += 1
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._hosts > 1:
                self._refusal = TWO_HOSTS
                raise _Refused
            path = self.url.split(b"?", 1)[0].decode("latin-1")
            if not guard.request(self, path):
                self._refusal = TOO_MANY_STREAMS
                raise _Refused
            super().on_headers_complete()
            guard.phase(self, BODY)

        def on_body(self, body: bytes) -> None:
            guard.body(self, len(body))
            super().on_body(body)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head = True, 0
            # the body of a request answered early came in time: the connection lives on
            guard.phase(self, IDLE if guard.lingering(self) else BUSY)

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()  # starts a pipelined request, if one waits
            if done is not None and done.response_complete and done.more_body:
                guard.phase(self, LINGER)  # answered before its body came: LINGER_S for the rest
                return
            busy = self.cycle is not None and not self.cycle.response_complete
            guard.phase(self, BUSY if busy else IDLE)

        def pause_writing(self) -> None:
            guard.writing(self, paused=True)  # the client is not reading: a deadline
            super().pause_writing()

        def resume_writing(self) -> None:
            guard.writing(self, paused=False)
            super().resume_writing()

        def handle_websocket_upgrade(self) -> None:
            guard.phase(self, BUSY)  # the WebSocket protocol owns it from here
            super().handle_websocket_upgrade()

    return GuardedProtocol
