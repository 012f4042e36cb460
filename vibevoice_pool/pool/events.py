"""What the dispatcher tells its listeners, as typed frozen events.

    Dispatched   a request was sent to a slot (its score, and how many that slot held)
    Started      the worker began it (`at` is the worker's clock)
    FirstAudio   its first audio reached the handle (once a request; handle.first_audio_at)
    Requeued     the slot was lost, or gave the row up (preempted, moved off a removed
                 worker: lost=False); the request waits in the queue again
    Finished     the request ended: outcome is Done or Failed

`Pool.subscribe(listener)` calls `listener(event)` for each, in order, after
the dispatcher's lock is released, on whichever pool thread emitted it (the
supervisor's, or the caller of submit): a slow listener delays only later
events, never a submit. A listener that raises is logged and skipped. Each carries the public Request and RequestHandle,
never the dispatcher's own bookkeeping.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, Union

from vibevoice_pool.pool.handle import RequestHandle
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool")


@dataclass(frozen=True)
class Dispatched:
    kind: ClassVar[str] = "dispatched"
    request: m.Request
    handle: RequestHandle
    slot: int
    score: float
    inflight: int  # what the slot held when it was chosen


@dataclass(frozen=True)
class Started:
    kind: ClassVar[str] = "started"
    request: m.Request
    handle: RequestHandle
    slot: int
    at: float  # the worker's clock


@dataclass(frozen=True)
class FirstAudio:
    kind: ClassVar[str] = "first_audio"
    request: m.Request
    handle: RequestHandle
    slot: int


@dataclass(frozen=True)
class Requeued:
    kind: ClassVar[str] = "requeued"
    request: m.Request
    handle: RequestHandle
    slot: int  # the slot that was lost, or that gave the row up
    lost: bool = True  # False: preempted or moved; the worker lives on
    moved: bool = False  # moved off a removed worker, or recalled before it started


@dataclass(frozen=True)
class Finished:
    kind: ClassVar[str] = "finished"
    request: m.Request
    handle: RequestHandle
    outcome: m.Done | m.Failed


PoolEvent = Union[Dispatched, Started, FirstAudio, Requeued, Finished]
Listener = Callable[[PoolEvent], None]


class Listeners:
    """Who hears the dispatcher's events, and their delivery outside its lock.

    The dispatcher `queue`s each event while it holds its lock (so the queue keeps
    the order of the changes it reports), and calls `deliver` once it has released
    it. One thread delivers at a time, every event in order; a thread that finds
    another delivering leaves its events to that one and returns at once, so a
    slow listener delays later events, never the thread that caused them."""

    def __init__(self):
        self._all: tuple[Listener, ...] = ()  # replaced whole, never changed in place
        self._change = threading.Lock()
        self._queued: collections.deque[PoolEvent] = collections.deque()
        self._delivering = threading.Lock()

    def add(self, listener: Listener) -> None:
        with self._change:
            self._all = (*self._all, listener)

    def remove(self, listener: Listener) -> None:
        with self._change:
            self._all = tuple(x for x in self._all if x is not listener)

    def queue(self, event: PoolEvent) -> None:
        self._queued.append(event)

    def deliver(self) -> None:
        while self._queued:
            if not self._delivering.acquire(blocking=False):
                return  # the thread delivering now takes these too
            try:
                while self._queued:
                    event = self._queued.popleft()
                    for listener in self._all:
                        try:
                            listener(event)
                        except Exception:
                            log.exception("a pool listener failed on %s", type(event).__name__)
            finally:
                self._delivering.release()
