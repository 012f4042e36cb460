"""Scheduling policies: small pure functions over a snapshot of the workers.

A policy gets the eligible workers (each with a free slot) as `View`s, the
request's estimated work in audio seconds, and a `Ctx` with the turn number
and a random generator; it returns one score per view. Lowest score wins;
ties rotate with the turn (`pick`), so equal workers share the load.

    least_work    expected finish: (queued work + this work) / measured speed
    seed          the old demo's score: queue*10 + mem%*0.5 + util%*0.3
    least_queue   fewest requests in flight
    round_robin   the next worker in turn
    power_of_two  two at random, the shorter queue of the two
    random        any one

snapshot(table, slots, has_room) reads the eligible workers' Views off the status
board (the dispatcher's hot path).
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from workers.wire.board import Col, SlotState, WorkerState

# Board columns as plain ints, for the hot path.
_SLOT_STATE, _WORKER_STATE, _CAPACITY = map(int, (Col.SLOT_STATE, Col.WORKER_STATE, Col.CAPACITY))
_BATCH_LIMIT, _INFLIGHT, _QUEUED = map(int, (Col.BATCH_LIMIT, Col.INFLIGHT, Col.QUEUED_WORK_S))
_SPEED, _UTIL, _DEVICE = int(Col.SPEED), int(Col.UTIL), int(Col.DEVICE)
_MEM_USED, _MEM_TOTAL, _MEM_REUSABLE = int(Col.MEM_USED), int(Col.MEM_TOTAL), int(Col.MEM_REUSABLE)
_RUNNING = float(SlotState.RUNNING)
_UP = (float(WorkerState.IDLE), float(WorkerState.BUSY))


@dataclass(frozen=True)
class View:
    slot: int
    inflight: int = 0
    capacity: int = 1
    queued_work_s: float = 0.0
    speed: float = 0.0  # audio s per wall s; 0 = not measured yet
    mem_used: float = 0.0
    mem_total: float = 0.0
    util: float = 0.0  # percent
    mem_free: float = float("inf")  # bytes free for new work on the device


def snapshot(table, slots: Iterable[int], has_room: Callable[[int, int], bool]) -> list[View]:
    """Views of the workers in `slots` that can take a request now (up, and
    `has_room(inflight, capacity)`). Each row is read from the board's table once,
    as a list of floats (the hot path: no numpy scalars)."""
    views = []
    for slot in slots:
        row = table[slot].tolist()
        if row[_SLOT_STATE] != _RUNNING or row[_WORKER_STATE] not in _UP:
            continue
        capacity = max(1, int(row[_CAPACITY]))
        if row[_BATCH_LIMIT] >= 1:
            capacity = min(capacity, int(row[_BATCH_LIMIT]))
        inflight = int(row[_INFLIGHT])
        if not has_room(inflight, capacity):
            continue
        mem_total = row[_MEM_TOTAL]
        if row[_DEVICE] < 0 or mem_total <= 0:
            mem_free = float("inf")  # unknown (CPU, or no NVML sample yet)
        else:
            mem_free = mem_total - row[_MEM_USED] + row[_MEM_REUSABLE]
        stats = (row[_QUEUED], row[_SPEED], row[_MEM_USED], mem_total, row[_UTIL], mem_free)
        views.append(View(slot, inflight, capacity, *stats))
    return views


@dataclass
class Ctx:
    turn: int = 0
    rng: _random.Random = field(default_factory=lambda: _random.Random(0))


Policy = Callable[[Sequence[View], float, Ctx], list[float]]


def _speed(v: View, views: Sequence[View]) -> float:
    """A worker's speed; an unmeasured one is assumed as fast as the known mean."""
    if v.speed > 0:
        return v.speed
    known = [w.speed for w in views if w.speed > 0]
    return sum(known) / len(known) if known else 1.0


def least_work(views: Sequence[View], work_s: float, ctx: Ctx) -> list[float]:
    return [(v.queued_work_s + work_s) / _speed(v, views) for v in views]


def seed(views: Sequence[View], work_s: float, ctx: Ctx) -> list[float]:
    out = []
    for v in views:
        mem_pct = 100.0 * v.mem_used / v.mem_total if v.mem_total > 0 else 0.0
        out.append(v.inflight * 10 + mem_pct * 0.5 + v.util * 0.3)
    return out


def least_queue(views: Sequence[View], work_s: float, ctx: Ctx) -> list[float]:
    return [float(v.inflight) for v in views]


def round_robin(views: Sequence[View], work_s: float, ctx: Ctx) -> list[float]:
    # All tie; `pick` rotates through them by the turn.
    return [0.0] * len(views)


def power_of_two(views: Sequence[View], work_s: float, ctx: Ctx) -> list[float]:
    if len(views) <= 2:
        return least_queue(views, work_s, ctx)
    a, b = ctx.rng.sample(range(len(views)), 2)
    out = [float("inf")] * len(views)
    out[a], out[b] = float(views[a].inflight), float(views[b].inflight)
    return out


def random(views: Sequence[View], work_s: float, ctx: Ctx) -> list[float]:
    out = [1.0] * len(views)
    out[ctx.rng.randrange(len(views))] = 0.0
    return out


POLICIES: dict[str, Policy] = {
    "least_work": least_work,
    "seed": seed,
    "least_queue": least_queue,
    "round_robin": round_robin,
    "power_of_two": power_of_two,
    "random": random,
}


def pick(scores: Sequence[float], turn: int, eps: float = 1e-9) -> int:
    """Index of the lowest score; among ties, the first at or after `turn`."""
    best = min(scores)
    tied = [i for i, s in enumerate(scores) if s - best <= eps * max(1.0, abs(best))]
    return tied[turn % len(tied)]


def choose(name: str, views: Sequence[View], work_s: float, ctx: Ctx) -> tuple[int, float]:
    """(index into views, its score) for the named policy."""
    scores = POLICIES[name](views, work_s, ctx)
    i = pick(scores, ctx.turn)
    return i, scores[i]
