"""RequestHandle: what a caller of `Dispatcher.submit` holds.

The dispatcher pushes events into it from the pool's threads (the worker's
own message types: Started, Chunk, already trimmed of audio a replay repeats,
then exactly one of Done or Failed). Callers read it one way:

    await handle.started()        a worker has begun it (handle.worker is set);
                                  raises the PoolError it failed with before that
    async for pcm in handle.stream():
                                  its audio, float32 at 24 kHz, from the first sample;
                                  ends when it is done (handle.outcome is the Done),
                                  raises the typed PoolError when it failed
    handle.stream(release=True)   the same, for the handle's last reader (a streamed
                                  answer): what every reader has read is let go, so
                                  a long stream holds only what its client has not had
    handle.result(timeout)        the same from a plain thread: all the audio, or raises
    handle.queue_s(), first_audio_s()
                                  seconds from admission to a worker's first start, and
                                  to its first audio (/metrics, the log's done line)

It takes several readers: each stream reads from the first sample at its own
pace, and waits (no polling) when it has caught up. The page reads one for its
progress while its <audio> player's stream reads another. Once a releasing reader
has begun, a reader that starts later begins at the first event still held, and
audio() has only the samples not read yet.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
import time
from typing import Callable

import numpy as np

from workers.wire import messages as m
from workers.wire.history import HistoryLog

TERMINAL = (m.Done, m.Failed)


class RequestHandle:
    def __init__(
        self,
        request: m.Request,
        cancel: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wake: Callable[[set], None] | None = None,
    ):
        self.request = request
        self.id = request.id
        self.seed = request.seed
        self._clock = clock  # the dispatcher's
        self.submitted_at = clock()
        self.worker: int | None = None  # the slot that finished (or last ran) it
        self.outcome: m.Done | m.Failed | None = None
        self._cancel = cancel
        self._wake = wake or wake_now  # the readers a push found waiting (the dispatcher's Wakeups)
        self.finished_at: float | None = None  # monotonic time of the terminal event
        self.started_at: float | None = None  # of the first Started: a worker began it
        self.first_audio_at: float | None = None  # of the first Chunk: its first audio
        self.samples = 0  # audio samples received so far
        self._events: list = []  # every event, in order: each reader keeps its own place
        self._gone = 0  # events let go from the front of _events (a releasing reader's)
        self._places: dict[object, int] = {}  # each reader's next event, of all pushed
        self._release = False  # a releasing reader has begun
        self._cond = threading.Condition()
        self._wakers: set[Callable[[], None]] = set()  # readers waiting for the next event
        self._chunks: list[np.ndarray] = []
        self._ends: list[int] = []  # samples received up to the end of each of _chunks
        # the row's history (workers/wire/history.py): what it resumes from when it is
        # sent again; the dispatcher grows it, a job's runner saves it beside its audio
        self.history = HistoryLog(request.resume)
        self.resumed = 0  # times it went on from its history (a lost worker, preempted, moved)

    # ---- producer side (dispatcher threads) ----------------------------

    def push(self, event) -> None:
        with self._cond:
            if self.outcome is not None:
                return  # nothing follows the one terminal event
            if isinstance(event, m.Chunk):
                self._chunks.append(event.pcm)
                self.samples += len(event.pcm)
                self._ends.append(self.samples)
                if self.first_audio_at is None and len(event.pcm):
                    self.first_audio_at = self._clock()
            elif isinstance(event, m.Started):
                if self.started_at is None:  # a request sent again keeps its first
                    self.started_at = self._clock()
            if isinstance(event, TERMINAL):
                self.outcome = event
                self.finished_at = self._clock()
            self._events.append(event)
            self._cond.notify_all()
            # A waker is armed only by a reader that has caught up, and fires
            # once: one loop wake-up per reader for a burst of events.
            wakers, self._wakers = self._wakers, set()
        if wakers:
            self._wake(wakers)

    # ---- consumer side -------------------------------------------------

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def queue_s(self) -> float | None:
        """Seconds from admission until a worker first began it: the first Started, not
        a later one of a request sent back to the queue (its lost worker's time stays in
        its duration); until its end when it ended before any worker began it (cancelled
        or timed out in the queue); None while it waits."""
        end = self.started_at if self.started_at is not None else self.finished_at
        return None if end is None else max(0.0, end - self.submitted_at)

    def first_audio_s(self) -> float | None:
        """Seconds from admission to its first audio in the parent (streamed or not);
        None before any came."""
        at = self.first_audio_at
        return None if at is None else max(0.0, at - self.submitted_at)

    def cancel(self) -> None:
        """Ask the pool to stop this request; a Failed(cancelled) follows."""
        if self.outcome is None:
            self._cancel(self.id)

    def audio(self, start: int = 0) -> np.ndarray:
        """The samples received so far from sample `start` on (all of them by default),
        as one float32 array. Only the chunks past `start` are copied, so a reader that
        asks for what is new since its last call (a job's progress) copies each sample
        once, not its row's whole audio each time."""
        with self._cond:
            first = bisect.bisect_right(self._ends, start)
            parts = self._chunks[first:]
            if first:
                begin = self._ends[first - 1]
            else:  # the first chunk held (the ones before were let go, or none)
                begin = self._ends[0] - len(self._chunks[0]) if self._chunks else start
            skip = max(0, start - begin)
        if not parts:
            return np.zeros(0, dtype=np.float32)
        if skip:
            parts[0] = parts[0][skip:]
        return np.concatenate(parts)

    def result(self, timeout: float | None = None) -> np.ndarray:
        """Block until the end; the audio, or the PoolError it failed with."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.outcome is not None, timeout):
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if isinstance(self.outcome, m.Failed):
            raise _error(self.outcome)
        return self.audio()

    async def started(self) -> None:
        """Return once a worker has begun this request, or it has finished; raise the
        PoolError it failed with when it failed before any worker began it."""
        async for event in self._read():
            if isinstance(event, m.Failed):
                raise _error(event)
            return

    async def stream(self, release: bool = False):
        """Its audio as it is made, from the first sample; raises the typed PoolError
        when it failed (after the audio that came before the failure). `release`: no
        one needs what this reader has read after it (a streamed answer): the handle
        lets go of every event all its readers have read, chunks included."""
        async for event in self._read(release):
            if isinstance(event, m.Chunk):
                yield event.pcm
            elif isinstance(event, m.Failed):
                raise _error(event)

    async def _read(self, release: bool = False):
        """Every event in order from the first held, ending with the terminal one."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        def waker() -> None:
            loop.call_soon_threadsafe(wake.set)

        with self._cond:
            read = self._gone
            self._places[waker] = read
            self._release = self._release or release
        try:
            while True:
                with self._cond:
                    self._places[waker] = read
                    if self._release:
                        self._let_go(min(self._places.values()))
                    fresh = self._events[read - self._gone :]
                    if not fresh:
                        self._wakers.add(waker)
                if not fresh:
                    await wake.wait()
                    wake.clear()
                    continue
                for event in fresh:
                    read += 1
                    yield event
                    if isinstance(event, TERMINAL):
                        return
        finally:
            with self._cond:
                self._wakers.discard(waker)
                del self._places[waker]
                if self._release:  # the last reader out: all it read goes
                    self._let_go(min(self._places.values(), default=read))

    def _let_go(self, upto: int) -> None:
        """Drop the events before `upto` (every reader has read them), and their
        chunks (under _cond)."""
        k = upto - self._gone
        if k <= 0:
            return
        chunks = sum(isinstance(e, m.Chunk) for e in self._events[:k])
        del self._events[:k]
        del self._chunks[:chunks]
        del self._ends[:chunks]
        self._gone += k


def wake_now(wakers) -> None:
    for waker in wakers:
        with contextlib.suppress(RuntimeError):  # its event loop has closed: no one to wake
            waker()


class Wakeups:
    """The dispatcher's handles' readers to wake: while one thread holds them (the
    dispatcher, under its lock), those its pushes find waiting are kept, to be woken
    after the lock is released (`take`, then `wake_now`): once each for a burst of
    events. Pushes from any other thread wake their readers at once."""

    def __init__(self):
        self._holder = 0  # the thread that holds them, 0: none
        self._held: list = []

    def hold(self) -> None:
        self._holder = threading.get_ident()

    def take(self) -> list:
        held, self._held, self._holder = self._held, [], 0
        return held

    def __call__(self, wakers) -> None:
        if self._holder == threading.get_ident():
            self._held.extend(wakers)
        else:
            wake_now(wakers)


def _error(failed: m.Failed) -> m.PoolError:
    return m.PoolError(failed.error, failed.message, failed.retryable)
