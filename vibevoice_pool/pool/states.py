"""A worker's state in words: the one place that spells them.

Two layers feed it: the supervisor's SlotState and the worker's own
WorkerState (workers/wire/board.py, numbers on the shared board). From them:

    State          what /v1/pool says of a worker (public_state)
    Shown          what people see (the page's panel, `vibevoice-pool status`,
                   the Prometheus state gauge): State, with a worker that is
                   being respawned shown as recovering (shown_state)

Both are str enums, so a word compares equal to its member; JSON carries the
plain word (`.value`).
"""

from __future__ import annotations

import enum

from workers.wire.board import SlotState, WorkerState


class State(str, enum.Enum):
    """The public state of a worker (/v1/pool's `state`)."""

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    BACKOFF = "backoff"  # dead; respawning after a pause
    FAILED = "failed"
    DRAINING = "draining"
    UNAVAILABLE = "unavailable"
    STOPPED = "stopped"


SERVING = (State.READY, State.BUSY)  # the states that take requests

_OF_SLOT = {
    SlotState.EMPTY: State.STARTING,
    SlotState.STARTING: State.STARTING,
    SlotState.DEAD: State.BACKOFF,
    SlotState.BACKOFF: State.BACKOFF,
    SlotState.FAILED: State.FAILED,
    SlotState.DRAINING: State.DRAINING,
    SlotState.UNAVAILABLE: State.UNAVAILABLE,
    SlotState.STOPPED: State.STOPPED,
}


def public_state(slot_state: int, worker_state: int, health: float = 1) -> State:
    """The one word /v1/pool and the page show for a slot."""
    if slot_state == SlotState.RUNNING:
        if health == 0:
            return State.UNAVAILABLE
        return State.BUSY if worker_state == WorkerState.BUSY else State.READY
    return _OF_SLOT.get(SlotState(slot_state), State.STARTING)


class Shown(str, enum.Enum):
    """A worker's state as people see it, in the panel's order."""

    READY = "ready"
    BUSY = "busy"
    RECOVERING = "recovering"
    STARTING = "starting"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"
    DRAINING = "draining"
    STOPPED = "stopped"


SHOWN = tuple(s.value for s in Shown)  # ready, busy, recovering, starting, ...


def shown_state(worker: dict) -> str:
    """The shown word for a worker of /v1/pool: a respawn (backoff, or starting
    again after a restart) is recovering; an unknown word is starting."""
    state = worker.get("state", State.STARTING.value)
    if state == State.BACKOFF:
        return Shown.RECOVERING.value
    if state == State.STARTING and (worker.get("restarts") or 0) > 0:
        return Shown.RECOVERING.value
    return state if state in SHOWN else Shown.STARTING.value
