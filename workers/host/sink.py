"""Where a step engine's rows report, for every engine host: the local worker
process (host/worker.py) and the Ray replica (host/ray_replica.py) use this one sink.

    StepHost                    HostSink                      out (the host's `send`)
    --------                    --------                      -----------------------
    sink.track(request)         opens the row's books
    sink.started(id, at)        its compute time starts       Started(id, at)
    sink.chunk(id, pcm)         counts samples, numbers it    Chunk(id, seq, pcm)
    sink.finish(id, reason)     closes the books              Done(id, audio_s, compute_s, reason)
    sink.fail(id, error)        closes the books              Failed(id, kind, message, retryable)
    sink.step()                 the host's progress mark

A host adds what only it keeps by overriding the hooks (`done`,
`failed`, `step`): the worker writes its StatusBoard row, the replica its
progress time. A row not tracked (or already closed) is ignored, so a late
chunk of a cancelled row never goes out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from workers.wire import messages as m


@dataclass
class _Books:
    t0: float  # when its compute started (arrival, until it is admitted)
    samples: int = 0
    seq: int = 0  # the next chunk's number


class HostSink:
    def __init__(self, send: Callable[[object], None]):
        self.send = send
        self.open: dict[str, _Books] = {}

    def track(self, req: m.Request) -> None:
        self.open[req.id] = _Books(time.monotonic())

    def started(self, request_id: str, at: float) -> None:
        books = self.open.get(request_id)
        if books is not None:
            books.t0 = at
            self.send(m.Started(request_id, at))

    def chunk(self, request_id: str, pcm) -> None:
        books = self.open.get(request_id)
        if books is None:
            return
        books.samples += len(pcm)
        self.send(m.Chunk(request_id, books.seq, pcm))
        books.seq += 1

    def finish(self, request_id: str, stop_reason: str = m.StopReason.EOS.value) -> None:
        books = self.open.pop(request_id, None)
        if books is None:
            return
        audio_s = books.samples / m.SAMPLE_RATE
        compute_s = time.monotonic() - books.t0
        self.done(audio_s, compute_s)
        self.send(m.Done(request_id, audio_s, compute_s, stop_reason))

    def fail(self, request_id: str, error: m.PoolError) -> None:
        if self.open.pop(request_id, None) is None:
            return
        self.failed()
        self.send(m.Failed(request_id, error.kind, error.message, error.retryable, error.traceback))

    # ---- hooks for what one host keeps --------------------------------

    def step(self) -> None:
        """The engine made a step."""

    def done(self, audio_s: float, compute_s: float) -> None:
        """A row finished."""

    def failed(self) -> None:
        """A row failed."""
