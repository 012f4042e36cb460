"""Where a running job's row is now, from the pool's events (pool/events.py), and
how fast it makes audio there: what the job view shows while it runs.

A job the runner handed to the pool is `running` in the store, but its row can
give its place up while it runs: preempted by an interactive request, moved off a
removed worker, or sent back to the queue when its worker died. It then waits in
the pool's queue to resume from its history. Until a worker begins it again its
view says `queued`, with a `waiting` note (why, since when, the worker it is sent
to once the pool has chosen one); the store hears it too (JobStore.note_worker
with no worker), so `GET /v1/jobs?state=` agrees.

    track(request_id, job_id) / forget(request_id)   the runner's runs
    on_event(event) -> job id | None      a pool event of a tracked run; the job
                                          whose place changed
    changed() -> [(job id, worker|None)]  what the store has not heard yet
    shown(request_id, ...)                the view's worker, waiting note and eta_s
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# why a row waits again, from its Requeued event (`lost`, `moved`)
PREEMPTED, MOVED, WORKER_LOST = "preempted", "moved", "worker_lost"
ETA_MIN_RUN_S = 2.0  # the speed is a guess before the row has run this long
ETA_MIN_AUDIO_S = 1.0  # ... and made this much audio in this process


@dataclass
class Place:
    job_id: str
    worker: int | None = None  # the worker running it, or the one it is sent to
    started: bool = False  # a worker has begun it (and has not given it up since)
    waiting: str | None = None  # why it waits again: PREEMPTED, MOVED, WORKER_LOST
    since: float | None = None  # wall clock: since when it waits
    ran_s: float = 0.0  # seconds it has run on workers (its waits left out)
    run_from: float | None = None  # monotonic: since when it runs now
    made_from: float = 0.0  # audio seconds it had when this process began it


class Places:
    def __init__(self, clock=time.time, mono=time.monotonic):
        self.clock, self.mono = clock, mono
        self._lock = threading.Lock()
        self._runs: dict[str, Place] = {}  # request id -> its place
        self._changed: set[str] = set()  # request ids whose place the store has not heard

    def track(self, request_id: str, job_id: str, made_s: float = 0.0) -> None:
        with self._lock:
            self._runs[request_id] = Place(job_id, made_from=made_s)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._runs.pop(request_id, None)

    def look(self, request_id: str) -> Place | None:
        with self._lock:
            place = self._runs.get(request_id)
            if place is None:
                return None
            return Place(**place.__dict__)

    def on_event(self, event) -> str | None:
        kind = event.kind
        if kind not in ("dispatched", "started", "requeued"):
            return None
        with self._lock:
            place = self._runs.get(event.request.id)
            if place is None:
                return None
            if kind == "dispatched":
                place.worker = event.slot
                return None  # still waiting (or not yet begun): nothing to write
            if kind == "started":
                if place.waiting is not None:
                    self._changed.add(event.request.id)
                place.worker, place.started = event.slot, True
                place.waiting = place.since = None
                place.run_from = self.mono()
                return place.job_id if event.request.id in self._changed else None
            # requeued: it gave its place up, or lost it; it waits to resume
            if place.run_from is not None:
                place.ran_s += self.mono() - place.run_from
                place.run_from = None
            place.waiting = WORKER_LOST if event.lost else MOVED if event.moved else PREEMPTED
            place.since, place.worker, place.started = self.clock(), None, False
            self._changed.add(event.request.id)
            return place.job_id

    def changed(self) -> list[tuple[str, int | None]]:
        """(job id, its worker; None while it waits) of the runs whose place changed
        since the last call: what the store is told (JobStore.note_worker)."""
        with self._lock:
            ids, self._changed = self._changed, set()
            places = [self._runs[i] for i in ids if i in self._runs]
            return [(p.job_id, p.worker if p.started else None) for p in places]

    def shown(self, request_id: str, worker: int | None, made_s: float, est_s: float):
        """(worker, waiting note, eta_s) for the view of a run whose handle names `worker`."""
        place = self.look(request_id)
        if place is None:
            return worker, None, None
        if place.waiting is None:
            return worker, None, self.eta_s(place, made_s, est_s)
        return None, {"reason": place.waiting, "since": place.since, "worker": place.worker}, None

    def eta_s(self, place: Place, made_s: float, est_s: float) -> float | None:
        """Seconds until its estimated length, at the speed it has made audio on its
        workers in this process; None while it waits, or before that speed is known."""
        if place.waiting is not None or place.run_from is None or est_s <= 0:
            return None
        ran = place.ran_s + self.mono() - place.run_from
        made = made_s - place.made_from
        if ran < ETA_MIN_RUN_S or made < ETA_MIN_AUDIO_S:
            return None
        return max(0.0, est_s - made_s) * ran / made
