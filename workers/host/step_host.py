"""The scheduler around a step engine, for every engine host: the worker process
(host/worker.py) and the Ray replica (host/ray_replica.py) both call `run_step()`.

It owns every row queue and every policy; the engine (workers/engines/contract.py)
runs the rows it is given and returns what a step made. One step, as vLLM v1's
EngineCore.step:

    schedule()   which rows run: restarted rows rejoin first, then waiting requests in
                 arrival order while there is room; a request that cannot join may
                 take a running row's place (the preemption policy)
    execute      the engine runs one step of every row it holds -> StepOutput
    update(out)  the host applies it: sends each row's audio, closes the rows that
                 ended or failed (their places are free at the next schedule), the
                 out-of-memory policy, the speed window

    host.submit(request)     it waits for room (pending)
    host.cancel(request_id)  waiting or restarting: answered at once; running: its
                             place is freed in the engine
    host.run_step()          one step of the above (nothing to run: schedule only)
    host.hand_back(id)       the row goes back to the parent (Preempted), to resume

The queues:
    pending     requests not yet started, in arrival order (`_ready`: those prepared,
                waiting for memory)
    running     rows in the engine (request id -> Row)
    restarting  rows that lost their engine state to out-of-memory; they hold their
                place (counted in `live`) and rejoin before any request
    preempted   rows that gave their place to a waiting request; they rejoin, before
                any request, when there is room again

Admission, in arrival order, stops at the first request that cannot join:
  - the live row limit (`max_rows`: the engine's, halved by each out-of-memory) is held;
  - the engine's memory budget has no room for the row (it waits for a row to leave;
    one that can never fit was failed by prepare);
  - a row sent again after its worker died (attempt > 1) is a suspect: if it is what
    killed that worker, it must not take innocent rows down again. It joins alone and
    nothing joins beside it for its first SUSPECT_STEPS steps here (the steps around
    the point where its last worker died, for a resumed row); after those it is one
    row among others, so a long resumed row does not hold a worker for itself.
A request that cannot join is shown to the preemption policy (`preempt`: the waiting
request and the running rows -> a row to give up its place, or None; never by
default; the workers use host/preemption.py). With `give_back` (the workers), a
preempted row that keeps its history goes back to the parent (Preempted), which
resumes it from its last step on any worker; otherwise it reruns here from its
start later, skipping the audio already sent. `hand_back(id)` gives a row back the same way (its worker is being removed).

Out of memory in a step: the engine is reset and the live row limit halved; the
rows that ran go back to the parent to resume from their history (`give_back`), or
restart here from their start (the same seed makes the same audio, what was sent is
skipped); a row that ran alone fails with out_of_memory. An engine's
unexpected exception fails its rows as ENGINE_ERROR with the traceback attached
(messages.unexpected), so it reaches the parent's log. A failure that is one row's
own (in prepare, in admit, in its prefill: joining.py) fails that row alone.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from workers.engines.contract import StepOutput
from workers.engines.row import Row
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool.worker")

SPEED_WINDOW_S = 1.0  # busy seconds per speed sample (or less, when the engine empties)
SUSPECT_STEPS = 16  # steps a row sent again after its worker died runs alone (docstring)

# The preemption policy: the request at the head of the queue, which cannot join, and
# the rows running now -> the row that gives up its place, or None.
PreemptPolicy = Callable[[m.Request, Sequence[Row]], "Row | None"]


def never_preempt(waiting: m.Request, running: Sequence[Row]) -> Row | None:
    return None


@dataclass
class Schedule:
    """What one schedule() decided."""

    joined: list[Row] = field(default_factory=list)  # requests that started this step
    rejoined: list[Row] = field(default_factory=list)  # restarted or preempted rows back
    preempted: list[Row] = field(default_factory=list)  # rows that gave up their place
    rows: int = 0  # rows in the engine for the step

    @property
    def joined_ids(self) -> list[str]:
        return [r.id for r in self.joined]


class StepHost:
    def __init__(
        self,
        engine,
        sink,
        preempt: PreemptPolicy = never_preempt,
        clock=time.monotonic,
        give_back: bool = False,
        scheduled: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self.sink = sink  # contract.HostSink: started / chunk / finish / fail / step
        self.preempt = preempt
        # a preempted row that keeps its history goes back to the parent (Preempted) to
        # resume anywhere, instead of rerunning here from its start
        self.give_back = give_back
        # called between schedule and execute: a host that holds its messages back to
        # send a step's as one (the Ray replica) sends what scheduling made (Started, a
        # failed prepare) there, before the engine's work
        self.scheduled = scheduled
        self.clock = clock
        self.max_rows = max(1, engine.max_rows)  # the live row limit
        self.pending: collections.deque[m.Request] = collections.deque()
        self._ready: dict[str, Row] = {}  # prepared, waiting for memory
        self.running: dict[str, Row] = {}
        self.restarting: collections.deque[Row] = collections.deque()
        self.preempted: collections.deque[Row] = collections.deque()
        self.speed = 0.0  # audio seconds per busy wall second, all rows together (EMA)
        self._win_audio = 0.0
        self._win_wall = 0.0

    @property
    def live(self) -> int:
        """Places held: rows in the engine and rows restarting after out-of-memory."""
        return len(self.running) + len(self.restarting)

    @property
    def idle(self) -> bool:
        return not (self.running or self.restarting or self.preempted or self.pending)

    def submit(self, req: m.Request) -> None:
        self.pending.append(req)

    def cancel(self, request_id: str) -> bool:
        for req in self.pending:
            if req.id == request_id:
                self.pending.remove(req)
                self._ready.pop(request_id, None)
                err = m.PoolError(m.ErrorKind.CANCELLED, "cancelled before it started")
                self.sink.fail(request_id, err)
                return True
        for queue in (self.restarting, self.preempted):
            for row in queue:
                if row.id == request_id:
                    queue.remove(row)
                    self._cancelled(request_id)
                    return True
        if request_id in self.running and self.engine.cancel(request_id) is not None:
            self.running.pop(request_id)
            self._cancelled(request_id)
            return True
        return False

    def _cancelled(self, request_id: str) -> None:
        self.sink.fail(request_id, m.PoolError(m.ErrorKind.CANCELLED, "cancelled by the client"))

    # ---- one step ---------------------------------------------------------------

    def run_step(self) -> Schedule:
        """Schedule, execute one engine step, apply what it made."""
        sched = self.schedule()
        if not self.running:
            return sched
        if self.scheduled is not None:
            self.scheduled()
        t0 = self.clock()
        out = self._execute()
        if out is not None:
            self.update(out)
        self._win_wall += self.clock() - t0
        if self._win_wall >= SPEED_WINDOW_S or not self.running:
            self.speed = speed_ema(self.speed, self._win_audio, self._win_wall)
            self._win_audio = self._win_wall = 0.0
        return sched

    def schedule(self) -> Schedule:
        """Which rows run this step (the module's docstring gives the order)."""
        sched = Schedule()
        while self.restarting and len(self.running) < self.max_rows:
            self._join(self.restarting.popleft(), sched.rejoined)
        while self.preempted and self.live < self.max_rows and self._fits(self.preempted[0]):
            self._join(self.preempted.popleft(), sched.rejoined)
        if self.restarting or self.preempted:
            sched.rows = len(self.running)
            return sched  # rows that started earlier come first
        now = self.clock()
        while self.pending:
            req = self.pending[0]
            if self.running and (req.attempt > 1 or self._replay_running()):  # suspects
                break
            row = self._ready.pop(req.id, None) or self._prepare(req)
            if row is None:
                continue  # failed in prepare; the next one may join
            if not self._room_for(row, sched):
                self._ready[req.id] = row  # waits for a row to leave
                break
            self.pending.popleft()
            if self._join(row, sched.joined):
                self.sink.started(req.id, now, row.made_samples)  # a resumed one: its history's
            if req.attempt > 1:
                break
        sched.rows = len(self.running)
        return sched

    def _room_for(self, row: Row, sched: Schedule) -> bool:
        """Room for the row now, after preempting running rows if the policy says so."""
        while self.live >= self.max_rows or not self._fits(row):
            victim = self.preempt(row.request, list(self.running.values()))
            if victim is None or victim.id not in self.running:
                return False
            self.engine.cancel(victim.id)
            self.running.pop(victim.id)
            self._evict(victim, sched)
        return True

    def _evict(self, victim: Row, sched: Schedule) -> None:
        """A preempted row, out of the engine. One that keeps its history goes back to
        the parent (Preempted), which resumes it from its last step on any worker;
        another reruns here later from its start, skipping what was sent, before any
        waiting request."""
        if self.give_back and victim.trail is not None:
            log.info("request %s preempted at step %d", victim.id, victim.steps)
            self._give_back(victim)
            return
        again = self._rerun(victim)
        if again is not None:
            self.preempted.append(again)
            sched.preempted.append(again)

    def _fits(self, row: Row) -> bool:
        return not self.running or self.engine.fits(row)

    def _join(self, row: Row, into: list[Row]) -> bool:
        """The row joins the engine; one the engine cannot take in (a resumed row whose
        history it cannot rebuild, any bug) fails alone, and the rest go on."""
        row.joined_at = row.steps  # the preemption policy counts its progress from here
        try:
            self.engine.admit(row)
        except Exception as err:
            log.error("request %s could not join: %s: %s", row.id, type(err).__name__, err)
            self.sink.fail(row.id, err if isinstance(err, m.PoolError) else m.unexpected(err))
            return False
        self.running[row.id] = row
        into.append(row)
        return True

    def hand_back(self, request_id: str) -> bool:
        """Give a row back to the parent (its worker is being removed: HandBack): a
        waiting one at once, a running one with its held audio and history; the parent
        resumes it on another worker."""
        for req in self.pending:
            if req.id == request_id:
                self.pending.remove(req)
                self._ready.pop(request_id, None)
                self.sink.preempted(request_id, 0)
                return True
        row = self.running.get(request_id)
        if row is None or row.trail is None or self.engine.cancel(request_id) is None:
            return False
        self.running.pop(request_id)
        self._give_back(row)
        return True

    def _give_back(self, row: Row) -> None:
        """A row out of the engine goes to the parent: its held audio and history, then
        Preempted."""
        out = StepOutput()
        row.hand_back(out)  # the held audio, if any, with the history it covers
        for pcm, hist in zip(out.audio.get(row.id, ()), out.history.get(row.id, ()), strict=True):
            self.sink.chunk(row.id, pcm, hist)
        self.sink.preempted(row.id, row.steps)

    def _prepare(self, req: m.Request) -> Row | None:
        try:
            return self.engine.prepare(req)
        except m.PoolError as err:
            self.pending.popleft()
            self.sink.fail(req.id, err)
        except Exception as err:  # a bug in prepare: this row fails, the rest go on
            log.error("preparing %s failed: %s: %s", req.id, type(err).__name__, err)
            self.pending.popleft()
            self.sink.fail(req.id, m.unexpected(err))
        return None

    def _replay_running(self) -> bool:
        """A suspect is running: a row sent again after its worker died, within its
        first SUSPECT_STEPS steps here."""
        rows = (*self.running.values(), *self.restarting, *self.preempted)
        return any(r.request.attempt > 1 and r.steps - r.joined_at < SUSPECT_STEPS for r in rows)

    def _execute(self) -> StepOutput | None:
        try:
            return self.engine.execute()
        except m.PoolError as err:
            self._fail_all(err)
        except Exception as err:  # a bug or a runtime error in the engine
            n = len(self.running)
            log.error("engine error in a step of %d rows: %s: %s", n, type(err).__name__, err)
            self._fail_all(m.unexpected(err))
        return None

    def update(self, out: StepOutput) -> None:
        """Apply what a step made: audio out, ended and failed rows closed, then the
        out-of-memory policy for the rows still open."""
        for rid, pieces in out.audio.items():
            if rid not in self.running:
                continue  # cancelled since
            hists = out.history.get(rid) or [None] * len(pieces)
            for pcm, hist in zip(pieces, hists, strict=True):
                self._win_audio += len(pcm) / m.SAMPLE_RATE
                self.sink.chunk(rid, pcm, hist)
        for rid, reason in out.ended:
            if self.running.pop(rid, None) is not None:
                self.sink.finish(rid, reason)
        for rid, err in out.failed:
            if self.running.pop(rid, None) is not None:
                self.sink.fail(rid, err)
        if out.out_of_memory:
            self._out_of_memory(out.out_of_memory)
        if out.stepped:
            self.sink.step()

    def _out_of_memory(self, alone: str) -> None:
        """Every row that ran loses its state: it restarts with the limit halved; a row
        that ran alone cannot be helped and fails."""
        ran = list(self.running.values())
        self.engine.reset()
        self.running.clear()
        if len(ran) <= 1:
            for row in ran:
                self.sink.fail(row.id, m.PoolError(m.ErrorKind.OUT_OF_MEMORY, alone))
            return
        self.max_rows = max(1, min(self.max_rows, len(ran)) // 2)
        log.warning(
            "out of memory in a step of %d rows: the row limit is now %d", len(ran), self.max_rows
        )
        for row in ran:
            if self.give_back and row.trail is not None:
                self._give_back(row)  # the parent resumes it from its history, not its start
                continue
            again = self._rerun(row)
            if again is not None:
                self.restarting.append(again)

    def _rerun(self, row: Row) -> Row | None:
        """The row again from its start (or from the history it came with), its model
        state fresh, skipping what was sent since (held audio was not sent: it is made
        again)."""
        try:
            again = self.engine.prepare(row.request)
        except Exception as err:  # it was prepared once: a bug; it fails alone
            self.sink.fail(row.id, err if isinstance(err, m.PoolError) else m.unexpected(err))
            return None
        again.skip = max(0, row.covered - again.made_samples)  # a resumed one starts there
        return again

    def _fail_all(self, err: m.PoolError) -> None:
        """The rows holding places fail; preempted rows were not in the step and wait."""
        self.engine.reset()
        rows = [*self.running, *(r.id for r in self.restarting)]
        self.running.clear()
        self.restarting.clear()
        for rid in rows:
            self.sink.fail(rid, err)


def speed_ema(old: float, audio_s: float, wall_s: float) -> float:
    """Audio seconds per wall second, smoothed; `old` <= 0 means unknown."""
    if wall_s <= 0 or audio_s <= 0:
        return old
    speed = audio_s / wall_s
    return speed if old <= 0 else 0.7 * old + 0.3 * speed
