"""RequestHandle: what a caller of `Dispatcher.submit` holds.

The dispatcher pushes events into it from the pool's threads; the caller reads
them from asyncio (`async for ev in handle.events()`) or from a plain thread
(`handle.result(timeout)`). Events are the worker's own message types:
Started, Chunk (already trimmed of audio a replay repeats), then exactly one
of Done or Failed.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Callable

import numpy as np

from workers import messages as m

TERMINAL = (m.Done, m.Failed)


class RequestHandle:
    def __init__(self, request: m.Request, cancel: Callable[[str], None]):
        self.request = request
        self.id = request.id
        self.seed = request.seed
        self.submitted_at = time.monotonic()
        self.worker: int | None = None  # the slot that finished (or last ran) it
        self.outcome: m.Done | m.Failed | None = None
        self._cancel = cancel
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._waker: Callable[[], None] | None = None
        self._chunks: list[np.ndarray] = []
        self.samples = 0  # audio samples received so far

    # ---- producer side (dispatcher threads) ----------------------------

    def push(self, event) -> None:
        with self._cond:
            if self.outcome is not None:
                return  # nothing follows the one terminal event
            if isinstance(event, m.Chunk):
                self._chunks.append(event.pcm)
                self.samples += len(event.pcm)
            if isinstance(event, TERMINAL):
                self.outcome = event
            # A reader that has events waiting will read this one too before it
            # waits again: wake it only when this is the first (one loop wake-up
            # for a burst of events).
            first = not self._events
            self._events.append(event)
            self._cond.notify_all()
            waker = self._waker if first else None
        if waker is not None:
            waker()

    # ---- consumer side -------------------------------------------------

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def cancel(self) -> None:
        """Ask the pool to stop this request; a Failed(cancelled) follows."""
        if self.outcome is None:
            self._cancel(self.id)

    def audio(self) -> np.ndarray:
        """Every sample received so far, as one float32 array."""
        with self._cond:
            parts = list(self._chunks)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def result(self, timeout: float | None = None) -> np.ndarray:
        """Block until the end; the audio, or the PoolError it failed with."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.outcome is not None, timeout):
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if isinstance(self.outcome, m.Failed):
            raise m.PoolError(self.outcome.error, self.outcome.message)
        return self.audio()

    async def events(self):
        """Every event in order, ending with the terminal one."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._cond:
            self._waker = lambda: loop.call_soon_threadsafe(wake.set)
        try:
            while True:
                with self._cond:
                    event = self._events.popleft() if self._events else None
                if event is None:
                    await wake.wait()
                    wake.clear()
                    continue
                yield event
                if isinstance(event, TERMINAL):
                    return
        finally:
            with self._cond:
                self._waker = None
