"""Supervisor: starts one worker process per slot and keeps the slots alive.

A worker is forked from the zygote (vibevoice_pool/pool/zygote.py), which has
imported torch, transformers and the engine once; it is spawned while the
zygote is not warm, and always with `worker_start = spawn`. One loop thread
waits, with `multiprocessing.connection.wait`, on every worker's response
pipe, every process's end (worker_process.py) and a wake-up pipe at once:

    response pipe readable -> Ready / BootFailed here, the rest to the dispatcher
    process ended          -> the process died: drain its pipe, hand its
                              requests back to the dispatcher, schedule respawn
    tick (every 50 ms)     -> hung / stalled / slow-booting workers get SIGKILL,
                              due respawns start, old requests time out, a dead
                              zygote is restarted

Slot life: starting -> running (ready <-> busy) -> dead -> backoff -> starting;
after `BOOT_FAILURES_TO_FAIL` boot failures in a row: failed, retried every
`failed_retry_s`. A first death respawns at once; deaths in a row wait 1, 2,
4, 8, 16, 30 s (cap); the count starts over when the worker that died had
been ready for `HEALTHY_RESET_S`: a crash loop backs off, a worker killed now
and then comes back at once every time. (gunicorn's arbiter respawns a dead
worker at once, always, and halts on a boot error; the boot-failure rule here
stays: `failed` after three.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing import connection

from vibevoice_pool.config import PoolConfig
from vibevoice_pool.pool.channel import RequestChannel
from vibevoice_pool.pool.devices import Placement
from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.slots import next_slot_index, wait_first_ready
from vibevoice_pool.pool.voice_sender import VoiceSender
from vibevoice_pool.pool.warm_weights import WeightsHolder
from vibevoice_pool.pool.worker_process import WorkerProcess
from vibevoice_pool.pool.zygote import Zygote
from workers import messages as m
from workers import worker_main
from workers.board import Col, SlotState, StatusBoard, WorkerState
from workers.engine import EngineSpec

log = logging.getLogger("vibevoice_pool")

BACKOFF_S = (0, 1, 2, 4, 8, 16, 30)  # by deaths in a row: the first respawn is at once
HEALTHY_RESET_S = 10.0  # a worker ready this long before it died starts the backoff over
BOOT_FAILURES_TO_FAIL = 3
TICK_S = 0.05
RESTART_REQUESTED = "restart requested"
ZYGOTE_WAIT_S = 120.0  # at launch, longest wait for the zygote before workers spawn


@dataclass
class _Slot:
    index: int
    placement: Placement
    engine: EngineSpec
    generation: int = 0
    process: WorkerProcess | None = None
    requests: RequestChannel | None = None  # parent -> worker
    responses: object = None  # Connection, worker -> parent (read end)
    death: object = None  # Connection, write end; closing it tells the worker to exit
    started_at: float = 0.0
    ready: bool = False
    deaths: int = 0  # consecutive, for the backoff
    boot_failures: int = 0  # consecutive
    boot_error: str = ""
    kill_reason: str = ""
    due_at: float = 0.0  # when a backoff or failed slot is started again
    removed: bool = False
    shutdown_sent: bool = False
    device_lost: bool = False
    unhealthy_since: float = 0.0
    restarts: int = 0
    info: m.DeviceInfo | None = None
    boot_s: float = 0.0  # the engine's load, as the last Ready reported it


class Supervisor:
    def __init__(
        self,
        cfg: PoolConfig,
        placements: list[Placement],
        engines: list[EngineSpec],
        board: StatusBoard,
        dispatcher: Dispatcher,
    ):
        self.cfg = cfg
        self.board = board
        self.dispatcher = dispatcher
        self.zygote = Zygote(cfg.engine, cfg.worker_start)
        self.ctx = self.zygote.spawn_ctx  # pipes; a worker's process comes from zygote.context()
        self.slots = [
            _Slot(i, p, e) for i, (p, e) in enumerate(zip(placements, engines, strict=False))
        ]
        self._lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.first_boot_error: str = ""
        self.weights = WeightsHolder(cfg.warm_weights)  # model weights held in memory
        self.events: list[tuple[float, int, str]] = []  # (time, slot, what) for benchmarks

    # ---- public --------------------------------------------------------

    def start(self) -> None:
        self.zygote.start(wait_s=min(self.cfg.boot_timeout_s, ZYGOTE_WAIT_S))
        for slot in self.slots:
            slot.engine = self.weights.spec_for(slot.engine)
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> None:
        """Return once a worker is ready; BootError if every worker failed to boot."""
        wait_first_ready(
            self._lock,
            self.slots,
            lambda s: s.ready,
            lambda: self.first_boot_error,
            timeout,
            "worker",
        )

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
        """Start a new worker while serving; returns its slot index."""
        with self._lock:
            index = next_slot_index(self._stop.is_set(), self.slots, self.board.rows)
            slot = _Slot(index, placement, self.weights.spec_for(engine))
            self.slots.append(slot)
            self._spawn(slot)
        self._wake()
        log.info("➕ added %s as worker %d", self._label(slot), index)
        return index

    def remove_slot(self, index: int) -> None:
        """Drain a worker (it finishes what it holds), then stop it for good."""
        with self._lock:
            slot = self.slots[index]
            if slot.removed:
                return
            slot.removed = True
            self.dispatcher.drain(index)
            if slot.process is not None:
                self.board.set(index, Col.SLOT_STATE, SlotState.DRAINING)
            log.info("➖ draining %s (worker %d) for removal", self._label(slot), index)
        self._wake()

    def restart(self, index: int) -> None:
        """Kill and respawn a slot now (on demand), or retry a failed one."""
        with self._lock:
            slot = self.slots[index]
            if slot.process is not None and slot.process.alive():
                self._kill(slot, RESTART_REQUESTED)
            else:
                slot.due_at = 0.0
                slot.boot_failures = 0
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
                self._send(slot, m.Shutdown(0.0))
            for slot in self.slots:
                self._stop_process(slot)
        self.zygote.close()
        self.weights.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- spawning ------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        b, i = self.board, slot.index
        slot.generation += 1
        slot.ready, slot.kill_reason, slot.info = False, "", None
        slot.requests = RequestChannel(self.ctx)
        read_end, write_end = self.ctx.Pipe(duplex=False)
        death_r, death_w = self.ctx.Pipe(duplex=False)
        spec = worker_main.WorkerSpec(
            slot=i,
            generation=slot.generation,
            engine=slot.engine,
            board_name=b.name,
            board_rows=b.rows,
            cuda_device=slot.placement.cuda_index,
            log_level=self.cfg.log_level,
            heartbeat_s=self.cfg.heartbeat_s,
        )
        for col in (Col.WORKER_STATE, Col.PID, Col.HEARTBEAT, Col.PROGRESS, Col.SPEED):
            b.set(i, col, 0)
        b.set(i, Col.SLOT_STATE, SlotState.STARTING)
        b.set(i, Col.DEVICE, -1 if slot.placement.cuda_index is None else slot.placement.cuda_index)
        b.set(i, Col.CAPACITY, slot.engine.max_batch_size)
        ctx, forked = self.zygote.context()
        proc = WorkerProcess(
            ctx,
            forked,
            target=worker_main.run,
            args=(spec, slot.requests.reader, write_end, death_r),
            name=f"vibevoice-worker-{i}",
            daemon=True,
        )
        self._note(i, "starting")
        proc.start()
        slot.requests.reader_sent()
        write_end.close()
        death_r.close()
        slot.process, slot.responses, slot.death = proc, read_end, death_w
        slot.started_at = time.monotonic()
        self._note(i, "forked" if forked else "spawned")
        how = "forked from the zygote" if forked else "spawned"
        log.info("Initialising %s (worker %d, pid %d, %s)", self._label(slot), i, proc.pid, how)

    def _label(self, slot: _Slot) -> str:
        p = slot.placement
        return f"GPU {p.cuda_index}" if p.is_gpu else f"CPU worker {p.device.split(':')[1]}"

    # ---- the loop ------------------------------------------------------

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
                self._tick()

    def _read(self, slot: _Slot, drain: bool = False) -> None:
        """Read the messages waiting on a slot's pipe (all of them when drain)."""
        conn = slot.responses
        try:
            while conn.poll(0):
                self._handle(slot, conn.recv())
                if not drain:
                    break
        except (EOFError, OSError, ValueError):
            slot.responses = None  # the worker closed its end; its sentinel follows
            conn.close()
        except Exception:  # a message cut short by a death does not unpickle
            log.warning("worker %d sent a message that could not be read", slot.index)
            slot.responses = None
            conn.close()

    def _handle(self, slot: _Slot, msg) -> None:
        if isinstance(msg, m.Ready):
            self._ready(slot, msg)
        elif isinstance(msg, m.BootFailed):
            slot.boot_error = f"{msg.error.value}: {msg.message}"
            self.first_boot_error = self.first_boot_error or slot.boot_error
            log.error("❌ %s failed to initialise: %s", self._label(slot), msg.message)
        else:
            self.dispatcher.on_message(slot.index, msg)

    def _ready(self, slot: _Slot, msg: m.Ready) -> None:
        b, i = self.board, slot.index
        if slot.removed:  # removed while it was booting: it never takes work
            slot.shutdown_sent = True
            self._send(slot, m.Shutdown(0.0))
            return
        slot.ready, slot.info, slot.boot_failures, slot.boot_error = True, msg.info, 0, ""
        slot.boot_s = msg.boot_s
        b.set(i, Col.CAPACITY, max(1, msg.info.max_batch_size))
        b.set(i, Col.READY_SINCE, time.monotonic())
        b.set(i, Col.SLOT_STATE, SlotState.RUNNING)
        mem = f" ({msg.info.mem_total_bytes / 1e9:.1f}GB)" if msg.info.mem_total_bytes else ""
        log.info(
            "✅ %s initialised: %s%s in %.1f s (worker %d, pid %d)",
            self._label(slot),
            msg.info.name,
            mem,
            msg.boot_s,
            i,
            msg.pid,
        )
        if msg.info.note:
            log.info("   worker %d: %s", i, msg.info.note)
        self._note(i, "ready")
        requests = slot.requests
        self.dispatcher.attach(i, VoiceSender(requests.put))

    def _died(self, slot: _Slot) -> None:
        if slot.responses is not None:
            self._read(slot, drain=True)
        proc = slot.process
        how = proc.exit_description()
        if slot.kill_reason:
            how = f"{slot.kill_reason}; {how}"
        self._note(slot.index, "dead")
        # A lost device, a removal or an operator's restart is not the requests' fault.
        blame = not (slot.device_lost or slot.removed or slot.kill_reason == RESTART_REQUESTED)
        moved = self.dispatcher.worker_lost(slot.index, how, blame=blame)
        self._close(slot)
        b, i, now = self.board, slot.index, time.monotonic()
        if self._stop.is_set() or slot.removed:
            b.set(i, Col.SLOT_STATE, SlotState.STOPPED)
            if slot.removed:
                log.info("➖ %s (worker %d) removed", self._label(slot), i)
            return
        if slot.device_lost:
            slot.due_at = now + self.cfg.failed_retry_s
            b.set(i, Col.SLOT_STATE, SlotState.UNAVAILABLE)
            log.error(
                "⛔ %s is unavailable (%s); %d request(s) sent to other workers; "
                "checking it again every %.0f s",
                self._label(slot),
                how,
                len(moved),
                self.cfg.failed_retry_s,
            )
            return
        if not slot.ready:
            slot.boot_failures += 1
            if not slot.boot_error:
                slot.boot_error = f"the worker died while loading its engine ({how})"
                self.first_boot_error = self.first_boot_error or slot.boot_error
        if slot.ready and now - b.get(i, Col.READY_SINCE) >= HEALTHY_RESET_S:
            slot.deaths = 0  # it had been healthy long enough: backoff starts over
        if slot.boot_failures >= BOOT_FAILURES_TO_FAIL:
            slot.due_at = now + self.cfg.failed_retry_s
            b.set(i, Col.SLOT_STATE, SlotState.FAILED)
            log.error(
                "❌ %s failed to boot %d times; retrying every %.0f s: %s",
                self._label(slot),
                slot.boot_failures,
                self.cfg.failed_retry_s,
                slot.boot_error,
            )
            return
        delay = BACKOFF_S[min(slot.deaths, len(BACKOFF_S) - 1)]
        if slot.kill_reason == RESTART_REQUESTED:
            delay = 0
        slot.deaths += 1
        slot.due_at = now + delay
        b.set(i, Col.SLOT_STATE, SlotState.BACKOFF)
        b.set(i, Col.BACKOFF_UNTIL, slot.due_at)
        log.warning(
            "💥 %s (worker %d, pid %s) died: %s; %d request(s) sent back to the queue; %s",
            self._label(slot),
            i,
            proc.pid,
            how,
            len(moved),
            f"respawning in {delay} s" if delay else "respawning now",
        )
        if delay == 0:
            self._check_down(slot, now)

    def _tick(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is not None:
                self._check_live(slot, now)
            else:
                self._check_down(slot, now)
        self.zygote.check()
        self.dispatcher.expire(self.cfg.request_timeout_s)

    def _check_live(self, slot: _Slot, now: float) -> None:
        """Hang, stall, slow boot, lost device, finished draining."""
        b, i = self.board, slot.index
        if slot.kill_reason:
            return  # already killed; its sentinel will fire
        beat = b.get(i, Col.HEARTBEAT)  # 0 until the worker's first beat
        busy = int(b.get(i, Col.WORKER_STATE)) == WorkerState.BUSY
        unhealthy = slot.placement.is_gpu and b.get(i, Col.HEALTH) == 0
        slot.unhealthy_since = (slot.unhealthy_since or now) if unhealthy else 0.0
        if beat > 0 and now - beat > self.cfg.hang_timeout_s:
            self._kill(slot, f"hung: no heartbeat for {now - beat:.1f} s")
        elif busy and now - b.get(i, Col.PROGRESS) > self.cfg.stall_timeout_s:
            self._kill(slot, f"stalled: no generation step for {self.cfg.stall_timeout_s:g} s")
        elif not slot.ready and now - slot.started_at > self.cfg.boot_timeout_s:
            slot.boot_error = f"not ready after boot_timeout_s={self.cfg.boot_timeout_s:g}"
            self._kill(slot, slot.boot_error)
        elif unhealthy and now - slot.unhealthy_since >= self.cfg.device_lost_s:
            slot.device_lost = True
            self.dispatcher.drain(i)
            self._kill(slot, f"device lost: NVML has not answered for {self.cfg.device_lost_s:g} s")
        elif slot.removed and not slot.shutdown_sent and self.dispatcher.held_by(i) == 0:
            slot.shutdown_sent = True
            self._send(slot, m.Shutdown(0.0))

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
            slot.due_at = now + self.cfg.failed_retry_s  # the device still does not answer
            return
        if state == SlotState.UNAVAILABLE:
            log.info("✅ %s answers again", self._label(slot))
            slot.device_lost = False
        slot.restarts = int(b.get(i, Col.RESTARTS)) + 1
        b.set(i, Col.RESTARTS, slot.restarts)
        log.info("🔄 respawning %s (restart %d)", self._label(slot), slot.restarts)
        self._spawn(slot)

    # ---- helpers -------------------------------------------------------

    def _kill(self, slot: _Slot, reason: str) -> None:
        slot.kill_reason = reason
        log.warning("⚠️ %s (worker %d): %s; killing it", self._label(slot), slot.index, reason)
        self._note(slot.index, "kill")
        slot.process.kill()

    def _send(self, slot: _Slot, msg) -> None:
        if slot.requests is not None:
            try:
                slot.requests.put(msg)
            except (ValueError, OSError):
                pass

    def _stop_process(self, slot: _Slot) -> None:
        if slot.process is None:
            return
        slot.process.stop(timeout=2)
        self._close(slot)
        self.board.set(slot.index, Col.SLOT_STATE, SlotState.STOPPED)

    def _close(self, slot: _Slot) -> None:
        if slot.requests is not None:
            slot.requests.close()
        for conn in (slot.responses, slot.death):
            if conn is not None:
                conn.close()
        if slot.process is not None:
            slot.process.close()
        slot.process, slot.requests, slot.responses, slot.death = None, None, None, None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _note(self, slot: int, what: str) -> None:
        self.events.append((time.monotonic(), slot, what))
        del self.events[:-1000]
