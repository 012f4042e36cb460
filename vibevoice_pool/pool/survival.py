"""The parent's side of rows that survive: resumes and preemption (dispatcher.py
calls these under its lock; nothing here holds state of its own).

    resumed(counters, request, slot, from_samples)
        a request sent again with its history began: count and log whether the
        worker resumed it (from_samples > 0) or replayed it from its start
    preemption_slot(jobs, slots, asked) -> slot | None
        where an interactive request that finds no free place may go anyway: a
        worker running a batch row (a job), which its step host then preempts
        (workers/host/preemption.py); one such request per worker at a time
    preemption(queue, jobs, board, slots, asked) -> (job, slot) | None
        the interactive request and the worker running a batch row it goes to
    moves(jobs, removed, free) -> [(slot, request id)]
        what removed workers hand to the others (HandBack) now: as many of their
        requests as there are places free on the others, before any waiting request
        takes them (`reserved`); a row moved with nowhere to go would stall its
        stream until a place frees, so it goes on where it is instead, and moves
        when one frees or a worker comes up (scale --add X --remove 0 on a
        one-worker server)
    reserved(jobs, views) -> bool
        the places free in `views` are all promised to requests on their way off
        removed workers: a waiting request may not take one
    recall(jobs, slot) -> [(slot, request id)]
        what to hand back (HandBack) when a worker comes up: the suspects that wait
        on a busy worker (below)
    for_suspect(job, views) -> views
        a request sent again after its worker died (attempt > 1) joins only an engine
        running no other row (workers/host/step_host.py), so on a busy worker it waits
        for every row there to end, a job's too: it goes to an idle worker when there
        is one, and one that waits on a busy worker is recalled when a worker comes up
        (the one that died, respawned) to start there at once
    preempted(counters, job, slot, steps, moved)
        a row gave its place up (preempted or moved): it goes back with its history
    ended(job, why) -> Failed
        how a request its worker let go ends instead of going back: cancelled (a
        Cancel was sent: its client left), or quarantined (it took workers down)
    started(...), forget(...)
        the bookkeeping of interactive requests sent over capacity
    beating(views, board, stale_s) -> views
        the workers that beat lately, when any did: a frozen one (SIGSTOP, a stuck
        process) is not chosen while it waits for hang_timeout_s to be replaced
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import replace
from typing import Iterable

from workers.wire import messages as m
from workers.wire.board import Col, SlotState, WorkerState

log = logging.getLogger("vibevoice_pool")


def started(counters, asked: dict, job, slot: int, from_samples: int) -> None:
    """A request began on `slot`: a resumed row sends what follows its history; an
    interactive one sent over capacity is in (the slot may be asked again); one sent
    with its history resumed or was replayed."""
    job.seen = from_samples
    req = job.request
    if asked.get(slot) == req.id:
        del asked[slot]
    if req.resume is not None:
        resumed(counters, req, slot, from_samples)
        if from_samples:
            job.handle.resumed += 1  # the page says so


def fields(request_id: str, slot: int | None) -> dict:
    """A line's JSON fields: the request, and its worker (the pool adds the device)."""
    return {"request_id": request_id, **({} if slot is None else {"worker": slot})}


def forget(asked: dict, slot: int | None, request_id: str) -> None:
    """A request ended: it no longer holds a place asked over capacity."""
    if slot is not None and asked.get(slot) == request_id:
        del asked[slot]


def resumed(counters: collections.Counter, req: m.Request, slot: int, from_samples: int) -> None:
    hist = req.resume
    if from_samples:
        counters["resumed"] += 1
        counters["resumed_steps"] += hist.steps
        log.info(
            "request %s resumed on worker %d at step %d (%.1f s of audio kept)",
            req.id,
            slot,
            hist.steps,
            from_samples / m.SAMPLE_RATE,
            extra=fields(req.id, slot),
        )
    else:
        counters["resume_refused"] += 1
        counters["recomputed_steps"] += hist.steps
        log.warning(
            "request %s could not resume at step %d on worker %d: replayed from its start",
            req.id,
            hist.steps,
            slot,
            extra=fields(req.id, slot),
        )


def keep_history(job, delta) -> None:
    """A chunk's history piece joins the request's (RequestHandle.history)."""
    if delta is not None and not job.handle.history.extend(delta):
        rid = job.request.id
        log.warning(
            "request %s: a history piece that does not follow", rid, extra=fields(rid, None)
        )


def preemption(queue, jobs, board, slots: set[int], asked: dict):
    """(the interactive request that would leave the queue first (a FairQueue), the worker
    it may go to over capacity), taken off the queue and noted in `asked`; or None."""
    job = queue.first(lambda j: j.request.priority != m.Priority.BATCH.value)
    if job is None:
        return None
    running = [(j.slot, j.request) for j in jobs if j.running]
    slot = preemption_slot(running, serving(board, slots), asked)
    if slot is None:
        return None
    queue.remove(job)
    asked[slot] = job.request.id
    return job, slot


def moves(jobs, removed: set[int], free: int) -> list[tuple[int, str]]:
    """What the removed workers hand back now (see the module doc), oldest first; each
    is marked `moving` until it is sent again (a row on its way counts as a place)."""
    jobs = sorted(jobs, key=lambda j: j.seq)
    free -= sum(1 for j in jobs if j.moving)
    back = []
    for j in jobs:
        if free > 0 and j.slot in removed and not (j.moving or j.cancelled):
            free -= 1
            j.moving = True
            back.append((j.slot, j.request.id))
    return back


def reserved(jobs, views: list) -> bool:
    """(See the module doc.)"""
    moving = sum(1 for j in jobs if j.moving)
    return moving > 0 and bool(views) and sum(v.capacity - v.inflight for v in views) <= moving


def recall(jobs, slot: int) -> list[tuple[int, str]]:
    """What to hand back now that the worker in `slot` is up (see the module doc)."""
    jobs = list(jobs)
    busy = {j.slot for j in jobs if j.running}
    return [
        (j.slot, j.request.id)
        for j in jobs
        if j.slot is not None
        and j.slot != slot
        and not j.cancelled
        and (j.request.attempt > 1 and not j.running and j.slot in busy)
    ]


def for_suspect(job, views: list) -> list:
    """The views a request may go to: an idle worker's only, for a suspect, when there
    is one (see the module doc)."""
    if job.request.attempt <= 1:
        return views
    return [v for v in views if v.inflight == 0] or views


def preemption_slot(running: Iterable[tuple[int, m.Request]], slots: Iterable[int], asked: dict):
    """The worker (among `slots`, those up and taking work) with the most batch rows
    running, that has no interactive request sent over its capacity yet (`asked`:
    slot -> that request's id); None if no worker runs a batch row."""
    open_slots = set(slots) - set(asked)
    batch = collections.Counter(
        slot
        for slot, req in running
        if slot in open_slots and req.priority == m.Priority.BATCH.value
    )
    if not batch:
        return None
    return max(sorted(batch), key=lambda s: batch[s])


def serving(board, slots: Iterable[int]) -> list[int]:
    """The slots whose worker is up (ready or busy) on the board."""
    up = (float(WorkerState.IDLE), float(WorkerState.BUSY))
    return [
        s
        for s in slots
        if board.get(s, Col.SLOT_STATE) == float(SlotState.RUNNING)
        and board.get(s, Col.WORKER_STATE) in up
    ]


def preempted(counters: collections.Counter, asked: dict, job, slot: int, steps: int, moved: bool):
    """A row gave its place up (preempted, or moved: off a removed worker, or recalled
    before it started): it goes back to the queue with the history the parent kept, to
    resume; a place it was sent to over capacity is free for another."""
    forget(asked, slot, job.request.id)
    counters["moved" if moved else "preempted"] += 1
    log.info(
        "request %s %s worker %d at step %d: it waits to resume with its history",
        job.request.id,
        "moves off" if moved else "preempted on",
        slot,
        steps,
        extra=fields(job.request.id, slot),
    )
    job.request = replace(job.request, resume=job.handle.history.snapshot())
    job.slot, job.running = None, False


def ended(job, why: str) -> m.Failed:
    """The answer of a request that is not sent again once its worker lets it go (dies,
    preempts or moves it): it was cancelled (the Cancel may never have reached a hung
    worker), or it was running on `job.lost` workers that died (quarantine)."""
    if job.cancelled:
        return m.Failed(job.request.id, m.ErrorKind.CANCELLED, "cancelled by the client")
    log.error(
        "request %s quarantined: it was running on %d workers that died",
        job.request.id,
        job.lost,
        extra=fields(job.request.id, None),
    )
    return m.Failed(
        job.request.id,
        m.ErrorKind.WORKER_LOST,
        f"this request was running on {job.lost} workers that died ({why}); it will not be retried",
    )


def beating(views: list, board, stale_s: float) -> list:
    """The views whose worker's heartbeat is at most stale_s old (one never seen
    counts as beating); all of them when none is, so a beat late under load never
    leaves a request without a worker."""
    oldest = time.monotonic() - stale_s
    fresh = [v for v in views if not 0 < board.get(v.slot, Col.HEARTBEAT) < oldest]
    return fresh or views
