"""Dispatcher: admission, late binding, and the life of every accepted request.

    submit() --> admission queue (bounded; full = OVERLOADED at once)
                   |  pump(): only while some worker has a free slot
                   v
              policy picks among eligible workers (board snapshot)
                   |  bump INFLIGHT / QUEUED_WORK_S on the board, then send
                   v
              worker request queue --> worker --> on_message() --> handle

A request leaves the admission queue only when a worker can start it (late binding), the
oldest of the owner (a named key) holding the fewest in the pool first (fair_queue.py); an
interactive request that finds no room goes over capacity to a worker running a job row, which
gives it its place (survival.py). A lost worker's requests go back to the head of the queue with
their history, to resume (one that took down `max_attempts` workers is answered WORKER_LOST).

Thread safety: one lock. submit() and cancel() come from the API's threads, on_message() and the
worker events from the supervisor's loop thread. Events for the listeners are queued under the
lock and delivered after it is released, in order, by one thread at a time: a slow listener (the
log, say) delays no submit, and a listener may call back into the dispatcher.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable

from vibevoice_pool.pool import events as ev
from vibevoice_pool.pool import survival
from vibevoice_pool.pool.fair_queue import FairQueue, OwnerQueueFull
from vibevoice_pool.pool.handle import RequestHandle, Wakeups, wake_now
from vibevoice_pool.pool.policies import Ctx, View, choose, snapshot
from workers.wire import messages as m
from workers.wire.board import Col, StatusBoard

log = logging.getLogger("vibevoice_pool")


@dataclass
class _Job:
    request: m.Request
    handle: RequestHandle
    work_s: float  # estimated audio seconds, corrected by measurement
    seq: int  # the order of arrival
    owner: str = ""  # a named key's tenant ("": none): the queue is fair between them
    held: bool = False  # (the FairQueue's flags) bound to a worker
    front: bool = False  # in the queue's head lane (sent back)
    lost: int = 0  # workers this request was on when they died
    slot: int | None = None
    left_s: float = 0.0  # estimated work still to do on its slot
    delivered: int = 0  # samples the handle has received
    seen: int = 0  # samples the current attempt has produced
    dispatched_at: float = 0.0
    started_at: float = 0.0  # worker clock, from Started
    running: bool = False  # the worker said Started for the current attempt
    cancelled: bool = False  # a Cancel was sent: it ends when its worker lets it go
    moving: bool = False  # a HandBack was sent: it leaves a removed worker
    attempts_at: list[float] = field(default_factory=list)


class Dispatcher:
    def __init__(
        self,
        board: StatusBoard,
        *,
        policy: str = "least_work",
        max_queue: int = 50,
        owner_max_queued: int = 0,  # places of the queue one named owner may hold (0: all)
        max_attempts: int = 2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        mem_reserve_bytes: float = 0.0,
        mem_per_audio_s_bytes: float = 0.0,
        quarantined: Callable[[int], bool] | None = None,
        stale_s: float = 1.0,  # a worker whose heartbeat is older is passed over
    ):
        self.board = board
        self.policy = policy
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.quarantined = quarantined or (lambda lost: lost >= self.max_attempts)  # (Pool's)
        self.clock, self.stale_s = clock, stale_s
        # a GPU worker is chosen only when its free memory covers reserve + work_s * per_audio_s
        self.mem_reserve_bytes = mem_reserve_bytes
        self.mem_per_audio_s_bytes = mem_per_audio_s_bytes
        self._lock = threading.RLock()
        self._depth = 0  # how deep the lock is held (it is re-entrant)
        self._queue = FairQueue(owner_max_queued)
        self._jobs: dict[str, _Job] = {}
        self._links: dict[int, Callable[[object], None]] = {}  # slot -> send
        self._draining: set[int] = set()  # live, but takes no new work
        self._removed: set[int] = set()  # draining for good: its rows move when a worker is up
        self._asked: dict[int, str] = {}  # slot -> an interactive request sent over capacity
        self._ctx = Ctx(rng=rng or random.Random())
        self._seq = itertools.count(1)
        self._admitting = True
        self.hurried = threading.Event()  # set: a stop's wind_down waits no longer
        self.work_ratio = 1.0  # measured audio / estimated audio (EMA)
        self.counters: collections.Counter[str] = collections.Counter()
        self.listeners = ev.Listeners()  # hear the events after the lock is released
        self._wakeups = Wakeups()  # the handles' readers to wake after it too

    # ---- the API side --------------------------------------------------

    def subscribe(self, listener: ev.Listener) -> None:
        """Call `listener(event)` for each event, after the lock is released."""
        self.listeners.add(listener)

    def unsubscribe(self, listener: ev.Listener) -> None:
        self.listeners.remove(listener)

    def new_id(self) -> str:
        return uuid.uuid4().hex[:16]

    def submit(self, request: m.Request, owner: str = "") -> RequestHandle:
        """Accept a request or refuse it at once (OVERLOADED, UNAVAILABLE)."""
        with self._locked():
            if not self._admitting:
                self.counters["refused_shutdown"] += 1
                raise m.PoolError(m.ErrorKind.UNAVAILABLE, "the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.counters["refused_overloaded"] += 1
                raise m.PoolError(
                    m.ErrorKind.OVERLOADED,
                    f"the queue is full ({self.max_queue} waiting); retry in a few seconds",
                    retryable=True,
                )
            if self._queue.full_for(owner):
                self.counters["refused_owner_queue_full"] += 1
                raise OwnerQueueFull(owner, self._queue.owner_cap)
            handle = RequestHandle(request, self.cancel, self.clock, wake=self._wakeups)
            job = _Job(
                request, handle, request.est_audio_s * self.work_ratio, next(self._seq), owner
            )
            job.delivered = request.resume.samples if request.resume else 0  # a job restarted
            self._jobs[request.id] = job
            self._queue.push(job)
            self.counters["accepted"] += 1
            self._pump_locked()
            return handle

    def cancel(self, request_id: str) -> None:
        with self._locked():
            job = self._jobs.get(request_id)
            if job is None:
                return
            if job.slot is None:
                self._queue.remove(job)
                self._finish(job, m.Failed(job.request.id, m.ErrorKind.CANCELLED, "cancelled"))
            else:
                job.cancelled = True
                self._send(job.slot, m.Cancel(request_id))

    def has_workers(self) -> bool:
        """Some worker is attached (ready, busy or draining)."""
        return bool(self._links)

    def queue_length(self) -> int:
        return len(self._queue)

    def pending(self) -> int:
        """Accepted and not yet answered: queued plus in flight."""
        return len(self._jobs)

    def stop_admitting(self) -> None:
        with self._locked():
            self._admitting = False

    def wind_down(self, grace_s: float) -> int:
        """Stop admitting, let what was accepted finish within grace_s, then answer
        the rest UNAVAILABLE (never dropped); how many were failed so."""
        self.stop_admitting()
        deadline = time.monotonic() + grace_s  # real time: it sleeps
        while self.pending() and time.monotonic() < deadline and not self.hurried.is_set():
            time.sleep(0.05)
        left = self.fail_all(
            m.ErrorKind.UNAVAILABLE, "the server shut down before this request finished"
        )
        if left:
            when = f"within {grace_s:.0f} s" if grace_s > 0 else "by the stop's deadline"
            log.warning("shutdown: %d request(s) did not finish %s", left, when)
        return left

    # ---- the supervisor side -------------------------------------------

    def attach(self, slot: int, send: Callable[[object], None]) -> None:
        """A worker in `slot` is ready; `send` puts a message on its queue."""
        with self._locked():
            self._links[slot] = send
            self._draining.discard(slot)
            self.board.set(slot, Col.INFLIGHT, 0)
            self.board.set(slot, Col.QUEUED_WORK_S, 0)
            back = survival.recall(self._jobs.values(), slot)
            for held_by, rid in back:
                self._send(held_by, m.HandBack(rid))  # it comes back (Preempted) to go here
            if not back:  # else once they are back (it moves rows too): they go first
                self._pump_locked()

    def worker_lost(
        self, slot: int, why: str, blame: bool = True, blame_unstarted: bool = False
    ) -> list[str]:
        """The worker in `slot` is gone: requeue (or quarantine) what it held; the ids
        sent back to the queue.
        `blame=False` (a lost device, a removal) does not count toward quarantine.
        `blame_unstarted=True` counts requests whose Started never arrived too, for a
        backend that can lose the Started of a request that killed its worker (Ray)."""
        with self._locked():
            self._links.pop(slot, None)
            self._draining.discard(slot)
            self._removed.discard(slot)
            self._asked.pop(slot, None)
            held = [j for j in self._jobs.values() if j.slot == slot]
            held.sort(key=lambda j: j.seq, reverse=True)
            requeued = []  # what goes back to the queue: not a cancelled or quarantined one
            for job in held:
                # Only a request that was running can have taken its worker down; one
                # still waiting in the worker's queue is not counted toward quarantine.
                job.lost += 1 if blame and (job.running or blame_unstarted) else 0
                job.running = False
                job.slot, job.seen, job.left_s = None, 0, 0.0
                if job.cancelled or self.quarantined(job.lost):  # never sent again
                    self._finish(job, survival.ended(job, why))
                    continue
                job.request = replace(
                    job.request,
                    attempt=job.request.attempt + 1,
                    resume=job.handle.history.snapshot(),
                )
                self._queue.push_front(job)
                requeued.append(job.request.id)
                self.counters["requeued"] += 1
                self._emit(ev.Requeued(job.request, job.handle, slot))
            self.board.set(slot, Col.INFLIGHT, 0)
            self.board.set(slot, Col.QUEUED_WORK_S, 0)
            self._pump_locked()
            return requeued[::-1]  # oldest first

    def drain(self, slot: int) -> None:
        """Send no new work to `slot`; what it holds may finish."""
        with self._locked():
            self._draining.add(slot)

    def undrain(self, slot: int) -> None:
        """Let a drained worker take new work again."""
        with self._locked():
            self._draining.discard(slot)
            self._pump_locked()

    def move_off(self, slot: int) -> int:
        """A removed worker hands its rows to the others, by resume (HandBack), as
        places are free for them (survival.moves); how many go now."""
        with self._locked():
            self._removed.add(slot)
            return self._move_locked()

    def _move_locked(self) -> int:
        free = sum(v.capacity - v.inflight for v in self._eligible())
        back = survival.moves(self._jobs.values(), self._removed, free)
        for held_by, rid in back:
            self._send(held_by, m.HandBack(rid))
        return len(back)

    def held_by(self, slot: int) -> int:
        with self._locked():
            return sum(1 for j in self._jobs.values() if j.slot == slot)

    def on_message(self, slot: int, *msgs) -> None:
        """A worker's messages, in the order it sent them, under one hold of the lock:
        a reader of a handle is woken once for all of them (a burst of events)."""
        with self._locked():
            for msg in msgs:
                self._on_message(slot, msg)
            self._pump_locked()

    def _on_message(self, slot: int, msg) -> None:
        job = self._jobs.get(getattr(msg, "id", ""))
        if job is None or job.slot != slot:
            return  # an answer for a request that moved on (cancelled, requeued)
        if isinstance(msg, m.Started):
            job.started_at, job.running = msg.at, True
            survival.started(self.counters, self._asked, job, slot, msg.from_samples)
            job.handle.push(msg)
            self._emit(ev.Started(job.request, job.handle, slot, msg.at))
        elif isinstance(msg, m.Chunk):
            self._chunk(job, msg)
        elif isinstance(msg, m.Done):
            actual = job.seen / m.SAMPLE_RATE
            if job.request.est_audio_s > 0 and actual > 0:
                ratio = actual / job.request.est_audio_s
                self.work_ratio = 0.9 * self.work_ratio + 0.1 * ratio
            self._release(job)
            self._finish(job, replace(msg, audio_s=max(actual, msg.audio_s)))  # resumed: all
        elif isinstance(msg, m.Preempted):  # it resumes later, with its history
            self._release(job)
            if job.cancelled:  # preempted or moved before the Cancel reached it
                self._finish(job, survival.ended(job, ""))
            else:
                moved = slot in self._draining or not job.running  # removed, or recalled
                survival.preempted(self.counters, self._asked, job, slot, msg.steps, moved)
                self._queue.push_front(job)
                self._emit(ev.Requeued(job.request, job.handle, slot, lost=False, moved=moved))
        elif isinstance(msg, m.Failed):
            if msg.traceback:  # for the log; a client gets the message only
                why = (msg.id, slot, msg.message, msg.traceback.rstrip())
                log.error("request %s failed in worker %d: %s\n%s", *why)
                msg = replace(msg, traceback="")
            self._release(job)
            self._finish(job, msg)

    def fail_all(self, error: m.ErrorKind, message: str) -> int:
        """Answer every request still pending (shutdown past its grace)."""
        with self._locked():
            jobs = list(self._jobs.values())
            self._queue.clear()
            for job in jobs:
                if job.slot is not None:
                    self._release(job)
                self._finish(job, m.Failed(job.request.id, error, message))
            return len(jobs)

    def expire(self, timeout_s: float) -> None:
        """Fail requests older than timeout_s with TIMEOUT (called on each tick)."""
        now = self.clock()
        with self._locked():
            for job in [j for j in self._jobs.values() if now - j.handle.submitted_at > timeout_s]:
                if job.slot is not None:
                    self._send(job.slot, m.Cancel(job.request.id))
                    self._release(job)
                else:
                    self._queue.remove(job)
                why = f"the request took longer than request_timeout_s={timeout_s:g}"
                self._finish(job, m.Failed(job.request.id, m.ErrorKind.TIMEOUT, why))
            self._pump_locked()

    # ---- internals -----------------------------------------------------

    def _send(self, slot: int, msg) -> None:
        send = self._links.get(slot)
        if send is not None:
            send(msg)

    def _chunk(self, job: _Job, msg: m.Chunk) -> None:
        survival.keep_history(job, msg.history)
        n = len(msg.pcm)
        start, job.seen = job.seen, job.seen + n
        done_s = n / m.SAMPLE_RATE
        used = min(job.left_s, done_s)
        job.left_s -= used
        self.board.add(job.slot, Col.QUEUED_WORK_S, -used)
        if job.seen <= job.delivered:
            return  # a replay: the client already has these samples
        pcm = msg.pcm[job.delivered - start :] if start < job.delivered else msg.pcm
        job.delivered = job.seen
        first = job.handle.first_audio_at is None
        job.handle.push(m.Chunk(msg.id, msg.seq, pcm))
        if first:
            self._emit(ev.FirstAudio(job.request, job.handle, job.slot))

    def _release(self, job: _Job) -> None:
        slot = job.slot
        if slot is None:
            return
        self.board.add(slot, Col.INFLIGHT, -1)
        self.board.add(slot, Col.QUEUED_WORK_S, -job.left_s)
        if self.board.get(slot, Col.QUEUED_WORK_S) < 1e-9:
            self.board.set(slot, Col.QUEUED_WORK_S, 0.0)
        job.left_s = 0.0

    def _finish(self, job: _Job, outcome) -> None:
        self._jobs.pop(job.request.id, None)
        survival.forget(self._asked, job.slot, job.request.id)
        job.handle.worker = job.slot if job.slot is not None else job.handle.worker
        job.slot = None
        self._queue.released(job)
        self.counters["completed" if isinstance(outcome, m.Done) else outcome.error.value] += 1
        job.handle.push(outcome)
        self._emit(ev.Finished(job.request, job.handle, outcome))

    @contextlib.contextmanager
    def _locked(self):
        """Hold the lock; when the outermost hold ends, wake the readers of the handles
        it pushed events to (once each) and deliver what was emitted."""
        due = None
        try:
            with self._lock:
                self._depth += 1
                if self._depth == 1:
                    self._wakeups.hold()
                try:
                    yield
                finally:
                    self._depth -= 1
                    if self._depth == 0:
                        due = self._wakeups.take()
        finally:
            if due is not None:
                wake_now(due)
                self.listeners.deliver()

    def _emit(self, event: ev.PoolEvent) -> None:
        self.listeners.queue(event)  # under the lock: the queue keeps the lock's order

    def _eligible(self) -> list[View]:
        """Views of the workers that can take a request now (policies.snapshot)."""
        up = [slot for slot in self._links if slot not in self._draining]
        return snapshot(self.board.table, up, self.has_room)

    def has_room(self, inflight: int, capacity: int) -> bool:
        """Late binding: a slot takes a request only while it holds fewer than its
        capacity (a benchmark overrides this to measure binding at arrival)."""
        return inflight < capacity

    def current(self, slot: int) -> int | None:
        """The arrival number of the oldest request the slot is running, if any."""
        with self._lock:
            running = [j.seq for j in self._jobs.values() if j.slot == slot and j.running]
        return min(running, default=None)

    def mem_need(self, work_s: float) -> float:
        return self.mem_reserve_bytes + work_s * self.mem_per_audio_s_bytes

    def _bind(self, job: _Job, slot: int) -> None:
        job.slot, job.left_s, job.seen, job.moving = slot, job.work_s, 0, False
        job.dispatched_at = self.clock()
        job.handle.worker = slot
        self._queue.bound(job)
        self.board.add(slot, Col.INFLIGHT, 1)
        self.board.add(slot, Col.QUEUED_WORK_S, job.work_s)

    def _preempt_locked(self, sends: list) -> bool:
        """An interactive request over capacity to a worker running a batch row."""
        up = set(self._links) - self._draining
        pick = survival.preemption(self._queue, self._jobs.values(), self.board, up, self._asked)
        if pick is None:
            return False
        job, slot = pick
        self._bind(job, slot)
        sends.append((slot, job, 0.0, View(slot, int(self.board.get(slot, Col.INFLIGHT)))))
        return True

    def pump(self) -> None:
        with self._locked():
            self._pump_locked()

    def _pump_locked(self) -> None:
        sends: list[tuple[int, _Job, float, View]] = []
        if self._removed:  # rows of removed workers move first, into the places free now
            self._move_locked()
        while self._queue:
            job = self._queue.peek()
            need = self.mem_need(job.work_s)
            views = [v for v in self._eligible() if v.mem_free >= need]
            views = survival.for_suspect(job, survival.beating(views, self.board, self.stale_s))
            if self._removed and not job.moving and survival.reserved(self._jobs.values(), views):
                break  # the places free wait for rows moving off removed workers
            if not views:  # no free slot (with the memory): wait, or preempt a batch row
                if self._preempt_locked(sends):
                    continue
                break
            self._queue.remove(job)
            i, score = choose(self.policy, views, job.work_s, self._ctx)
            self._ctx.turn += 1
            self._bind(job, views[i].slot)
            sends.append((views[i].slot, job, score, views[i]))
        if not sends:
            return
        # Send after choosing, telling each worker how many more are right behind,
        # so a burst that arrives together is batched together; log after sending.
        left = collections.Counter(slot for slot, *_ in sends)
        for slot, job, _, _ in sends:
            left[slot] -= 1
            self._links[slot](m.Synthesize(job.request, following=left[slot]))
        for slot, job, score, view in sends:
            self._emit(ev.Dispatched(job.request, job.handle, slot, score, view.inflight))
