"""What every engine host (the local worker process, a Ray replica) does the same
way around a step engine: which waiting requests join the running set and when,
cancels, how an engine's errors reach the open rows, and the speed estimate the
scheduler reads.

    host.submit(request)     it waits for room (pending)
    host.cancel(request_id)  waiting: answered at once; running: its place is freed
    host.hand_back(id)       the row goes back to the parent (Preempted), to resume
    host.admit() -> [req]    at a step boundary: the waiting requests that joined
                             (a resumed one's audio so far in from_samples[id])
    host.step()              one engine step for every live row

Admission, in arrival order, stops at the first request that cannot join:
  - the engine holds its live row limit (unless the preemption policy,
    host/preemption.py, frees a batch row's place for an interactive request);
  - the engine's memory budget has no room for the row (it waits for a row to
    leave; one that can never fit was failed by prepare);
  - a replay (attempt > 1) runs alone: if it is what killed a worker, it must
    not take innocent rows down again; nothing joins while it runs.

An engine's unexpected exception fails its rows as ENGINE_ERROR with the
traceback attached (messages.unexpected), so it reaches the parent's log.
"""

from __future__ import annotations

import collections
import logging
import time

from workers.engines.row import Row
from workers.host import preemption
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool.worker")

SPEED_WINDOW_S = 1.0  # busy seconds per speed sample (or less, when the engine empties)


class StepHost:
    def __init__(self, engine, sink):
        self.engine = engine
        self.sink = sink  # the host's own: chunk / finish / fail / step (contract.StepSink)
        self.pending: collections.deque[m.Request] = collections.deque()
        self.running: dict[str, m.Request] = {}
        self._ready: dict[str, Row] = {}  # prepared, waiting for memory
        self.speed = 0.0  # audio seconds per busy wall second, all rows together (EMA)
        self._win_audio = 0.0
        self._win_wall = 0.0
        self._engine_sink = _EngineSink(self)
        # a resumed row's audio so far, for its Started (from_samples); taken by the host
        self.from_samples: dict[str, int] = {}
        self._rows: dict[str, Row] = {}  # the running rows, for the preemption policy
        self._since: dict[str, int] = {}  # a row's step count when it joined

    @property
    def live(self) -> int:
        return len(self.running)

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
        if request_id in self.running and self.engine.cancel(request_id) is not None:
            self.running.pop(request_id, None)
            self.sink.fail(
                request_id, m.PoolError(m.ErrorKind.CANCELLED, "cancelled by the client")
            )
            return True
        return False

    def admit(self) -> list[m.Request]:
        e = self.engine
        joined: list[m.Request] = []
        while self.pending:
            req = self.pending[0]
            if len(self.running) >= e.max_rows and not self._preempt_for(req):
                break
            if self.running and (req.attempt > 1 or self._replay_running()):
                break
            row = self._ready.pop(req.id, None)
            if row is None:
                try:
                    row = e.prepare(req)
                except m.PoolError as err:
                    self.pending.popleft()
                    self.sink.fail(req.id, err)
                    continue
                except Exception as err:  # a bug in prepare: this row fails, the rest go on
                    log.error("preparing %s failed: %s: %s", req.id, type(err).__name__, err)
                    self.pending.popleft()
                    self.sink.fail(req.id, m.unexpected(err))
                    continue
            if self.running and not e.fits(row):
                self._ready[req.id] = row  # waits for a row to leave
                break
            self.pending.popleft()
            e.admit(row)
            self._rows[req.id], self._since[req.id] = row, row.steps
            if row.made_samples:
                self.from_samples[req.id] = row.made_samples
            self.running[req.id] = req
            joined.append(req)
            if req.attempt > 1:
                break
        return joined

    def _preempt_for(self, req: m.Request) -> bool:
        """Free a batch row's place for `req` if the policy (host/preemption.py) picks
        one: its held audio and history go out, then Preempted; the parent sends it
        again later, to resume."""
        for rid in [k for k in self._rows if k not in self.running]:
            self._rows.pop(rid)
            self._since.pop(rid, None)
        rows = [self._rows[rid] for rid in self.running if rid in self._rows]
        row = preemption.victim(req, rows, self._since)
        if row is None or not self.hand_back(row.id):
            return False
        log.info("request %s preempted at step %d for %s", row.id, row.steps, req.id)
        return True

    def hand_back(self, request_id: str) -> bool:
        """Give a row back (preempted, or its worker is being removed): a waiting one
        at once; a running one's KV is freed, its held audio and history go out, then
        Preempted. The parent sends it again with its history, to resume."""
        for req in self.pending:
            if req.id == request_id:
                self.pending.remove(req)
                self._ready.pop(request_id, None)
                self.sink.preempted(request_id, 0)
                return True
        row = self._rows.get(request_id)
        if request_id not in self.running or row is None or self.engine.cancel(request_id) is None:
            return False
        row.hand_back(self._engine_sink)
        self.running.pop(request_id, None)
        self._rows.pop(request_id)
        self._since.pop(request_id, None)
        self.sink.preempted(request_id, row.steps)
        return True

    def _replay_running(self) -> bool:
        return any(r.attempt > 1 for r in self.running.values())

    def step(self) -> None:
        if not self.running:
            return
        t0 = time.monotonic()
        try:
            self.engine.step(self._engine_sink)
        except m.PoolError as err:
            self._fail_all(err)
        except Exception as err:  # a bug or a runtime error in the engine
            n = len(self.running)
            log.error("engine error in a step of %d rows: %s: %s", n, type(err).__name__, err)
            self._fail_all(m.unexpected(err))
        self._win_wall += time.monotonic() - t0
        if self._win_wall >= SPEED_WINDOW_S or not self.running:
            self.speed = speed_ema(self.speed, self._win_audio, self._win_wall)
            self._win_audio = self._win_wall = 0.0

    def _fail_all(self, err: m.PoolError) -> None:
        self.engine.reset()
        for rid in list(self.running):
            self.running.pop(rid)
            self.sink.fail(rid, err)


class _EngineSink:
    """The sink the engine sees: forwards to the host's sink, keeps `running` and the
    speed window up to date."""

    def __init__(self, host: StepHost):
        self.h = host

    def chunk(self, request_id: str, pcm, history=None) -> None:
        self.h._win_audio += len(pcm) / m.SAMPLE_RATE
        if history is None:
            self.h.sink.chunk(request_id, pcm)
        else:
            self.h.sink.chunk(request_id, pcm, history)

    def finish(self, request_id: str, stop_reason: str = "eos") -> None:
        if self.h.running.pop(request_id, None) is not None:
            self.h.sink.finish(request_id, stop_reason)

    def fail(self, request_id: str, error: m.PoolError) -> None:
        if self.h.running.pop(request_id, None) is not None:
            self.h.sink.fail(request_id, error)

    def step(self) -> None:
        self.h.sink.step()


def speed_ema(old: float, audio_s: float, wall_s: float) -> float:
    """Audio seconds per wall second, smoothed; `old` <= 0 means unknown."""
    if wall_s <= 0 or audio_s <= 0:
        return old
    speed = audio_s / wall_s
    return speed if old <= 0 else 0.7 * old + 0.3 * speed
