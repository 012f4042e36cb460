"""Supervisor: the local backend. One worker process per slot, started, stopped
and watched here; what a death or a failed boot leads to is the recovery
policy's (pool/recovery.py), applied through the shared SlotLifecycle (slots.py).

A worker is forked from the zygote (pool/zygote.py), which has imported torch,
transformers and the engine once; it is spawned while the zygote is not warm,
and always with `worker_start = spawn`. One loop thread waits, with
`multiprocessing.connection.wait`, on every worker's response pipe, every
process's end (worker_process.py) and a wake-up pipe at once:

    response pipe readable -> Ready / BootFailed here, the rest to the dispatcher
    process ended          -> the process died: drain its pipe, hand its
                              requests back to the dispatcher, ask the policy
    tick (every 50 ms, and after messages at most every 10 ms)
                           -> the policy's hang rule over the board's vitals
                              (heartbeat, progress, device health, boot time):
                              a kill (kills.py, with the stop at shutdown); due
                              respawns start, old requests time out, a dead
                              zygote is restarted

Slot life: starting -> running (ready <-> busy) -> dead -> backoff -> starting;
`failed` after the policy's failed boots in a row, retried every
`failed_retry_s`; `unavailable` while its GPU does not answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import connection

from vibevoice_pool.pool.channel import F_SETPIPE_SZ, PIPE_BYTES, RequestChannel
from vibevoice_pool.pool.devices import Placement
from vibevoice_pool.pool.kills import WorkerKills
from vibevoice_pool.pool.recovery import Cause, Verdict
from vibevoice_pool.pool.slots import SlotBase, SlotLifecycle
from vibevoice_pool.pool.stacks import log_stack
from vibevoice_pool.pool.stopping import uninterrupted
from vibevoice_pool.pool.voice_sender import VoiceSender
from vibevoice_pool.pool.warm_weights import WeightsHolder
from vibevoice_pool.pool.worker_process import WorkerProcess, start_cause, start_error
from vibevoice_pool.pool.zygote import Zygote
from workers.engines.contract import EngineSpec
from workers.host.watchdog import Watchdog
from workers.host.worker import WorkerSpec
from workers.host.worker import run as run_worker
from workers.wire import messages as m
from workers.wire.board import Col, SlotState

log = logging.getLogger("vibevoice_pool")

TICK_S = 0.05
BUSY_TICK_S = 0.01  # the shortest time between two ticks while messages keep coming
READ_BURST = 64  # messages read from one worker per wake-up at most (the others' turn next)
RESTART_REQUESTED = Cause.RESTART.value
ZYGOTE_WAIT_S = 120.0  # at launch, longest wait for the zygote before workers spawn


@dataclass
class _Slot(SlotBase):
    process: WorkerProcess | None = None
    requests: RequestChannel | None = None  # parent -> worker
    responses: object = None  # Connection, worker -> parent (read end)
    death: object = None  # Connection, write end; closing it tells the worker to exit
    kill_reason: str = ""
    shutdown_sent: bool = False
    device_lost: bool = False
    unhealthy_since: float = 0.0
    stack_file: str = ""  # where its faulthandler writes (workers.host.worker)
    kill_at: float = 0.0  # asked for its stack: SIGKILL once written, or at this time
    asked_stack: bool = False
    stack_size: int = -1  # the stack file's size at the last tick


class Supervisor(WorkerKills, SlotLifecycle):
    def _setup(self) -> None:
        cfg = self.cfg
        self.zygote = Zygote(cfg.engine, cfg.worker_start)
        self.ctx = self.zygote.spawn_ctx  # pipes; a worker's process comes from zygote.context()
        self._wake_r, self._wake_w = os.pipe()
        self._ticked = 0.0  # when the loop last ticked (time.monotonic)
        self._thread: threading.Thread | None = None
        self.weights = WeightsHolder(cfg.warm_weights)  # model weights held in memory
        self._stacks = tempfile.mkdtemp(prefix="vibevoice-pool-stacks-")
        self.watchdog = Watchdog(cfg.log_format)  # ends the workers left if this one dies

    def _new_slot(self, index: int, placement: Placement, engine: EngineSpec) -> _Slot:
        return _Slot(index, placement, engine)

    # ---- public --------------------------------------------------------

    def start(self) -> None:
        self.zygote.start(wait_s=min(self.cfg.boot_timeout_s, ZYGOTE_WAIT_S))
        for slot in self.slots:
            slot.engine = self.weights.spec_for(slot.engine)
        with uninterrupted():  # a signal stops the start between two workers, not within
            for slot in self.slots:
                self._start(slot)
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        with self._lock:
            return [s.process.pid for s in self.slots if s.process is not None]

    def monitor_targets(self) -> list[tuple[int, int | None, int | None]]:
        """(row, CUDA ordinal or None, pid or None) of every slot, for the Monitor."""
        with self._lock:
            return [
                (s.index, s.placement.cuda_index, s.process.pid if s.process else None)
                for s in self.slots
                if not (s.removed and s.process is None)
            ]

    def add_slot(self, placement: Placement, engine: EngineSpec) -> int:
        return super().add_slot(placement, self.weights.spec_for(engine))

    def restart(self, index: int) -> None:
        """Kill and respawn a slot now (on demand), or retry a failed one."""
        with self._lock:
            slot = self.slots[index]
            if slot.process is not None and slot.process.alive():
                self._kill(slot, RESTART_REQUESTED)
            else:
                self._retry_now(slot)
        self._wake()

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let accepted requests finish within grace_s, then stop."""
        self.dispatcher.wind_down(grace_s)
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for slot in self.slots:
                self._send(slot, m.Shutdown())
            self._stop_processes([s for s in self.slots if s.process is not None])
        self.zygote.close()
        self.watchdog.stand_down()
        self.weights.close()
        shutil.rmtree(self._stacks, ignore_errors=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- start ---------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        b, i = self.board, slot.index
        slot.generation += 1
        slot.kill_reason = ""
        self._starting(slot)
        ends: list = []  # the pipes made so far, closed if the start fails
        try:
            slot.requests = RequestChannel(self.ctx)
            ends += self.ctx.Pipe(duplex=False)
            read_end, write_end = ends
            # room for a burst of chunks, which the parent reads at once (channel.PIPE_BYTES)
            with contextlib.suppress(OSError):
                fcntl.fcntl(read_end.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
            ends += self.ctx.Pipe(duplex=False)
            death_r, death_w = ends[2:]
            slot.stack_file = os.path.join(self._stacks, f"worker-{i}-{slot.generation}.txt")
            slot.kill_at, slot.stack_size, slot.asked_stack = 0.0, -1, False
            spec = WorkerSpec(
                slot=i,
                generation=slot.generation,
                engine=slot.engine,
                board_name=b.name,
                board_rows=b.rows,
                cuda_device=slot.placement.cuda_index,
                log_level=self.cfg.log_level,
                log_format=self.cfg.log_format,
                heartbeat_s=self.cfg.heartbeat_s,
                stack_file=slot.stack_file,
            )
            ctx, forked = self.zygote.context()
            proc = WorkerProcess(
                ctx,
                forked,
                target=run_worker,
                args=(spec, slot.requests.reader, write_end, death_r),
                name=f"vibevoice-worker-{i}",
                daemon=True,
            )
            self._note(i, "starting")
            proc.start()
        except OSError as e:  # no process (no file handle left, say): a boot that failed
            for end in ends:
                end.close()
            self._close(slot)
            slot.log.error("❌ %s could not start: %s", self._label(slot), start_error(e))
            self._after_boot_failure(slot, start_error(e), start_cause(e))
            return
        slot.requests.reader_sent()
        write_end.close()
        death_r.close()
        slot.process, slot.responses, slot.death = proc, read_end, death_w
        self.watchdog.watch(proc.pid)
        if forked:
            self.watchdog.watch(self.zygote.pid)
        self._note(i, "forked" if forked else "spawned")
        how = "forked from the zygote" if forked else "spawned"
        slot.log.info(
            "Initialising %s (worker %d, pid %d, %s)", self._label(slot), i, proc.pid, how
        )

    # ---- watch ---------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                waitables = {self._wake_r: None}
                for s in self.slots:
                    if s.process is None:
                        continue
                    if s.responses is not None:
                        waitables[s.responses] = ("msg", s)
                    waitables[s.process.handle] = ("dead", s)
            ready = connection.wait(list(waitables), timeout=TICK_S)
            with self._lock:
                for obj in ready:
                    tag = waitables[obj]
                    if tag is None:
                        os.read(self._wake_r, 4096)
                    elif tag[0] == "msg" and tag[1].responses is obj:
                        self._read(tag[1])
                for obj in ready:
                    tag = waitables[obj]
                    if tag is not None and tag[0] == "dead" and tag[1].process is not None:
                        if tag[1].process.handle == obj:
                            self._died(tag[1])
                # a tick after anything but messages alone (a time-out, a wake-up, a death);
                # after messages, BUSY_TICK_S apart (time.monotonic: a test's clock may stop)
                now = time.monotonic()
                only_messages = ready and all(
                    waitables[o] and waitables[o][0] == "msg" for o in ready
                )
                if not only_messages or now - self._ticked >= BUSY_TICK_S:
                    self._ticked = now
                    self._tick()

    def _read(self, slot: _Slot, drain: bool = False) -> None:
        """Read the messages waiting on a slot's pipe, READ_BURST at most (all of them when
        drain); the dispatcher takes them together (a request's reader wakes once for
        its burst of events), after any Ready or BootFailed among them is handled."""
        conn = slot.responses
        burst: list = []
        try:
            try:
                while (drain or len(burst) < READ_BURST) and _waiting(conn):
                    msg = conn.recv()
                    if isinstance(msg, (m.Ready, m.BootFailed)):
                        self._pass_on(slot, burst)  # what came before it, first
                        self._handle(slot, msg)
                    else:
                        burst.append(msg)
            finally:
                self._pass_on(slot, burst)
        except (EOFError, OSError, ValueError):
            slot.responses = None  # the worker closed its end; its sentinel follows
            conn.close()
        except Exception:  # a message cut short by a death does not unpickle
            slot.log.warning("worker %d sent a message that could not be read", slot.index)
            slot.responses = None
            conn.close()

    def _pass_on(self, slot: _Slot, burst: list) -> None:
        if burst:
            msgs = tuple(burst)
            burst.clear()
            self.dispatcher.on_message(slot.index, *msgs)

    def _handle(self, slot: _Slot, msg) -> None:
        if isinstance(msg, m.Ready):
            self._ready(slot, msg)
        elif isinstance(msg, m.BootFailed):
            self._boot_error(slot, f"{msg.error.value}: {msg.message}")
            slot.log.error("❌ %s failed to initialise: %s", self._label(slot), msg.message)
            if msg.traceback:
                slot.log.error("worker %d's traceback:\n%s", slot.index, msg.traceback.rstrip())
        else:
            self.dispatcher.on_message(slot.index, msg)

    def _ready(self, slot: _Slot, msg: m.Ready) -> None:
        if slot.removed:  # removed while it was booting: it never takes work
            slot.shutdown_sent = True
            self._send(slot, m.Shutdown())
            return
        slot.boot_s = msg.boot_s
        mem = f" ({msg.info.mem_total_bytes / 1e9:.1f}GB)" if msg.info.mem_total_bytes else ""
        slot.log.info(
            "✅ %s initialised: %s%s in %.1f s (worker %d, pid %d)",
            self._label(slot),
            msg.info.name,
            mem,
            msg.boot_s,
            slot.index,
            msg.pid,
        )
        if msg.info.note:
            slot.log.info("   worker %d: %s", slot.index, msg.info.note)
        self._became_ready(slot, msg.info, VoiceSender(slot.requests.put))

    def _cause(self, slot: _Slot) -> Cause:
        if self._stop.is_set():
            return Cause.SHUTDOWN
        if slot.removed:
            return Cause.REMOVED
        if slot.device_lost:
            return Cause.DEVICE_LOST
        return Cause.RESTART if slot.kill_reason == RESTART_REQUESTED else Cause.CRASH

    def _died(self, slot: _Slot) -> None:
        if slot.responses is not None:
            self._read(slot, drain=True)
        pid, how = slot.process.pid, slot.process.exit_description()
        log_stack(slot, pid)
        if slot.kill_reason:
            how = f"{slot.kill_reason}; {how}"
        self._note(slot.index, "dead")
        cause = self._cause(slot)
        # A lost device, a removal or an operator's restart is not the requests' fault.
        moved = self.dispatcher.worker_lost(slot.index, how, blame=cause is Cause.CRASH)
        self._close(slot)
        action = self._after_death(slot, cause, how)
        label, i = self._label(slot), slot.index
        if action.verdict is Verdict.UNAVAILABLE:
            slot.log.error(
                "⛔ %s is unavailable (%s); %d request(s) sent to other workers; "
                "checking it again every %.0f s",
                label,
                how,
                len(moved),
                self.policy.failed_retry_s,
            )
        elif action.verdict is Verdict.RESPAWN:
            delay = action.at - self.clock()
            slot.log.warning(
                "💥 %s (worker %d, pid %s) died: %s; %d request(s) sent back to the queue; %s",
                label,
                i,
                pid,
                how,
                len(moved),
                f"respawning in {delay:.0f} s" if delay > 0 else "respawning now",
            )
            if delay <= 0:
                self._check_down(slot, self.clock())

    def _tick(self) -> None:
        now = self.clock()
        for slot in self.slots:
            if slot.process is not None:
                self._check_live(slot, now)
            else:
                self._check_down(slot, now)
        self.zygote.check()
        self.dispatcher.expire(self.cfg.request_timeout_s)

    def _check_down(self, slot: _Slot, now: float) -> None:
        """Respawn a slot whose backoff is over, retry a failed or unavailable one."""
        b, i = self.board, slot.index
        state = int(b.get(i, Col.SLOT_STATE))
        if slot.removed:
            if state != SlotState.STOPPED:
                b.set(i, Col.SLOT_STATE, SlotState.STOPPED)
            return
        if state not in (SlotState.BACKOFF, SlotState.FAILED, SlotState.UNAVAILABLE):
            return
        if now < slot.due_at:
            return
        if state == SlotState.UNAVAILABLE and b.get(i, Col.HEALTH) != 1:
            slot.due_at = now + self.policy.failed_retry_s  # the device still does not answer
            return
        if state == SlotState.UNAVAILABLE:
            slot.log.info("✅ %s answers again", self._label(slot))
            slot.device_lost = False
        self._counted_restart(slot)
        slot.log.info("🔄 respawning %s (restart %d)", self._label(slot), slot.restarts)
        self._start(slot)

    # ---- helpers -------------------------------------------------------

    def _send(self, slot: _Slot, msg) -> None:
        if slot.requests is not None:
            try:
                slot.requests.put(msg)
            except (ValueError, OSError):
                pass

    def _close(self, slot: _Slot) -> None:
        if slot.requests is not None:
            slot.requests.close()
        for conn in (slot.responses, slot.death):
            if conn is not None:
                conn.close()
        if slot.process is not None:
            self.watchdog.forget(slot.process.pid)
            slot.process.close()
        slot.process, slot.requests, slot.responses, slot.death = None, None, None, None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass


def _waiting(conn) -> bool:
    """A message (or the end) waits on the pipe: Connection.poll(0) without the selector
    it builds each time (a Connection reads no more than one message: no buffer)."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    return bool(p.poll(0))
