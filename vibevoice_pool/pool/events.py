"""What the dispatcher tells its listeners, as typed frozen events.

    Dispatched   a request was sent to a slot (its score, and how many that slot held)
    Started      the worker began it (`at` is the worker's clock)
    Requeued     the slot was lost; the request waits in the queue again
    Finished     the request ended: outcome is Done or Failed

`Pool.subscribe(listener)` calls `listener(event)` for each, on the
dispatcher's thread under its lock: a listener must be quick and must not
call back into the pool. Each carries the public Request and RequestHandle,
never the dispatcher's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Union

from vibevoice_pool.pool.handle import RequestHandle
from workers.wire import messages as m


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
class Requeued:
    kind: ClassVar[str] = "requeued"
    request: m.Request
    handle: RequestHandle
    slot: int  # the slot that was lost


@dataclass(frozen=True)
class Finished:
    kind: ClassVar[str] = "finished"
    request: m.Request
    handle: RequestHandle
    outcome: m.Done | m.Failed


PoolEvent = Union[Dispatched, Started, Requeued, Finished]
Listener = Callable[[PoolEvent], None]
