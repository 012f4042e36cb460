"""One slot lifecycle for every backend. `SlotBackend` is what Pool is typed
against; `SlotLifecycle` is the part both backends share, and each backend (the
local Supervisor, the RaySupervisor) only starts, stops and watches:

    backend                         SlotLifecycle (here)              RecoveryPolicy
    -------                         --------------------              --------------
    _start(slot): spawn / deploy <- _starting(slot): board row reset, on_start
    saw Ready / a ping answer    -> _became_ready(slot, ...)       -> on_ready
    saw a death                  -> _after_death(slot, cause)      -> on_death
    saw a failed boot            -> _after_boot_failure(slot, why) -> on_boot_failure
    each tick: vitals            -> policy.on_tick                 -> Kill or None
    add_slot / remove_slot / wait_ready / events: here, the same for both

The policy's answers (respawn at, failed, unavailable, stop) become the
slot's board state and its `due_at`; the backend starts the slot again once
`due_at` has passed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from vibevoice_pool.config import PoolConfig
from vibevoice_pool.pool.devices import Placement
from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.recovery import Action, Cause, Record, RecoveryPolicy, Verdict
from workers.engines.contract import EngineSpec
from workers.wire import messages as m
from workers.wire.board import Col, SlotState, StatusBoard

log = logging.getLogger("vibevoice_pool")
# why a boot failed, as /metrics counts them: the engine did not load (or its process
# died loading it); its process could not be started; the same for lack of file handles
BOOT_FAILURES = ("load", "start", "file_handles")


class BootError(RuntimeError):
    """No worker could load its engine at launch."""


@dataclass
class SlotBase:
    """What every backend keeps of a slot, and what Pool reads of it."""

    index: int
    placement: Placement
    engine: EngineSpec
    record: Record = field(default_factory=Record)  # the recovery policy's
    generation: int = 0
    boot_error: str = ""
    boot_s: float = 0.0  # the engine's load, as the last ready worker reported it
    due_at: float = 0.0  # when a backoff, failed or unavailable slot starts again
    removed: bool = False
    restarts: int = 0
    info: m.DeviceInfo | None = None
    boot_failed: dict = field(default_factory=lambda: dict.fromkeys(BOOT_FAILURES, 0))

    @property
    def ready(self) -> bool:
        return self.record.ready_since is not None

    @property
    def boot_failures(self) -> int:
        return self.record.boot_failures

    @property
    def log(self) -> logging.LoggerAdapter:
        """The pool's log, its lines marked with this worker: JSON lines carry `worker`
        and `device`, so an alert or a count keys on fields rather than on the text."""
        return logging.LoggerAdapter(log, {"worker": self.index, "device": self.placement.device})


class SlotBackend(Protocol):
    """Where the pool's slots run. Pool and the front ends use only this."""

    slots: list[SlotBase]
    events: list[tuple[float, int, str]]  # (time, slot, what), for benchmarks and tests
    policy: RecoveryPolicy
    fatal: str  # set when the backend cannot go on: the server stops, exit fatal_exit
    fatal_exit: int

    def start(self) -> None: ...
    def wait_ready(self, timeout: float) -> None: ...
    def add_slot(self, placement: Placement, engine: EngineSpec) -> int: ...
    def next_index(self) -> int: ...
    def remove_slot(self, index: int) -> None: ...
    def restart(self, index: int) -> None: ...
    def shutdown(self, grace_s: float) -> None: ...
    def pids(self) -> list[int]: ...
    def monitor_targets(self) -> list[tuple[int, int | None, int | None]]: ...


class SlotLifecycle:
    """The slot bookkeeping both backends share. A backend sets `noun`, makes
    its slots with `_new_slot`, adds its own state in `_setup` and implements
    `_start` (and its own watching)."""

    noun = "worker"
    boot_hint = ""
    moves_rows = True  # a removed slot hands its rows back (HandBack) to resume elsewhere

    def __init__(
        self,
        cfg: PoolConfig,
        placements: list[Placement],
        engines: list[EngineSpec],
        board: StatusBoard,
        dispatcher: Dispatcher,
        policy: RecoveryPolicy | None = None,
    ):
        self.cfg = cfg
        self.board = board
        self.dispatcher = dispatcher
        self.clock = dispatcher.clock  # one clock for the pool: policies, ticks, handles
        self.policy = policy or RecoveryPolicy.from_config(cfg)
        pairs = zip(placements, engines, strict=True)
        self.slots = [self._new_slot(i, p, e) for i, (p, e) in enumerate(pairs)]
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.first_boot_error = ""
        self.fatal = ""  # why the backend cannot go on (the server then exits non-zero)
        self.fatal_exit = 1
        self.events: list[tuple[float, int, str]] = []
        self._setup()

    # ---- for a backend to fill in ---------------------------------------

    def _setup(self) -> None:
        """What the backend keeps beside the slots (called at the end of __init__)."""

    def _new_slot(self, index: int, placement: Placement, engine: EngineSpec) -> SlotBase:
        return SlotBase(index, placement, engine)

    def _start(self, slot: SlotBase) -> None:
        raise NotImplementedError

    def _worker_gone(self, slot: SlotBase) -> bool:
        """A removed, stopped slot's worker is gone for good: an added one may take
        its slot (and board row). The local backend's: its process has been reaped."""
        return getattr(slot, "process", None) is None

    def _wake(self) -> None:
        """Let the watching thread look at the slots now."""

    def _label(self, slot: SlotBase) -> str:
        p = slot.placement
        return f"GPU {p.cuda_index}" if p.is_gpu else f"CPU worker {p.device.split(':')[1]}"

    # ---- public ----------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Return once a slot is ready; BootError when every slot has failed to boot
        (with the first error), or after `timeout` (naming the setting to raise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(s.ready for s in self.slots):
                    return
                if all(s.boot_failures > 0 for s in self.slots):
                    raise BootError(self.first_boot_error or f"every {self.noun} failed to boot")
            time.sleep(0.02)
        raise BootError(
            f"no {self.noun} was ready after {timeout:g} s; raise boot_timeout_s if the model "
            f"needs longer to load{self.boot_hint}"
        )

    def add_slot(self, placement: Placement, engine: EngineSpec) -> int:
        """Start a new worker while serving; returns its slot index."""
        with self._lock:
            if self._stop.is_set():
                raise m.PoolError(m.ErrorKind.UNAVAILABLE, "the pool is shutting down")
            rows, index = self.board.rows, self._free_index()
            if index >= rows:
                raise m.PoolError(
                    m.ErrorKind.BAD_INPUT, f"the pool has room for {rows} workers at most"
                )
            slot = self._new_slot(index, placement, engine)
            if index < len(self.slots):  # a removed worker's: its row and counts go
                self.board.clear_row(index)
                self.dispatcher.worker_lost(index, "removed", blame=False)  # holds nothing
                self.slots[index] = slot
            else:
                self.slots.append(slot)
            self._start(slot)
        self._wake()
        slot.log.info("➕ added %s as worker %d", self._label(slot), slot.index)
        return slot.index

    def next_index(self) -> int:
        """The slot index the next add_slot takes (what its worker will be called)."""
        with self._lock:
            return self._free_index()

    def _free_index(self) -> int:
        """The first slot removed and stopped, its worker gone; else a new one. Without
        this every add after a remove took a board row for good, and after
        SPARE_ROWS cycles the pool refused any add with one worker up."""
        for s in self.slots:
            stopped = int(self.board.get(s.index, Col.SLOT_STATE)) == SlotState.STOPPED
            if s.removed and stopped and self._worker_gone(s):
                return s.index
        return len(self.slots)

    def remove_slot(self, index: int) -> None:
        """Drain a worker, then stop it for good: its rows move to the other workers by
        resume (Dispatcher.move_off) as places free there, or finish there."""
        with self._lock:
            slot = self.slots[index]
            if slot.removed:
                return
            slot.removed = True
            self.dispatcher.drain(index)
            self.board.set(index, Col.SLOT_STATE, SlotState.DRAINING)
            moved = self.dispatcher.move_off(index) if self.moves_rows else 0  # resume elsewhere
            slot.log.info(
                "➖ draining %s (worker %d) for removal: %d of its %d request(s) move to "
                "other workers now (the rest as places free there)",
                self._label(slot),
                index,
                moved,
                self.dispatcher.held_by(index),
            )
        self._wake()

    # ---- what both backends do the same way -------------------------------

    def _starting(self, slot: SlotBase) -> None:
        """A slot's worker is being (re)started: its board row starts over."""
        b, i = self.board, slot.index
        slot.record = self.policy.on_start(slot.record, self.clock())
        slot.info = None
        for col in (Col.WORKER_STATE, Col.PID, Col.HEARTBEAT, Col.PROGRESS, Col.SPEED):
            b.set(i, col, 0)
        b.set(i, Col.SLOT_STATE, SlotState.STARTING)
        b.set(i, Col.DEVICE, -1 if slot.placement.cuda_index is None else slot.placement.cuda_index)
        b.set(i, Col.CAPACITY, slot.engine.max_batch_size)

    def _became_ready(self, slot: SlotBase, info: m.DeviceInfo | None, send) -> None:
        """A slot's worker loaded its engine: the dispatcher may send to it."""
        b, i, now = self.board, slot.index, self.clock()
        slot.record = self.policy.on_ready(slot.record, now)
        slot.info, slot.boot_error = info, ""
        b.set(i, Col.CAPACITY, max(1, info.max_batch_size if info else 1))
        b.set(i, Col.READY_SINCE, now)
        b.set(i, Col.SLOT_STATE, SlotState.RUNNING)
        self._note(i, "ready")
        self.dispatcher.attach(i, send)

    def _boot_error(self, slot: SlotBase, message: str) -> None:
        slot.boot_error = message
        self.first_boot_error = self.first_boot_error or message

    def _after_death(self, slot: SlotBase, cause: Cause, how: str = "") -> Action:
        """The slot's worker is gone (its requests already handed back). One that
        dies before it is ready has failed to boot, whether it said so or not."""
        if not slot.ready and cause is Cause.CRASH:
            why = slot.boot_error or f"the {self.noun} died while loading its engine ({how})"
            return self._after_boot_failure(slot, why)
        action = self.policy.on_death(slot.record, self.clock(), cause)
        self._apply(slot, action)
        return action

    def _after_boot_failure(self, slot: SlotBase, message: str, reason: str = "load") -> Action:
        """The slot's worker could not load its engine (`reason`: one of BOOT_FAILURES)."""
        slot.boot_failed[reason] += 1
        self._boot_error(slot, message)
        action = self.policy.on_boot_failure(slot.record, self.clock())
        self._apply(slot, action)
        return action

    def _after_last_removed(self) -> None:
        """Every worker removed and stopped: what waits in the queue is answered now, as
        a new request is (no worker can come back but by an add)."""
        stopped = SlotState.STOPPED
        if all(
            s.removed and int(self.board.get(s.index, Col.SLOT_STATE)) == stopped
            for s in self.slots
        ):
            n = self.dispatcher.fail_all(
                m.ErrorKind.UNAVAILABLE, "every worker was removed; add one (POST /v1/pool/workers)"
            )
            if n:
                log.warning(
                    "➖ every worker removed: %d waiting request(s) answered unavailable", n
                )

    def _apply(self, slot: SlotBase, action: Action) -> None:
        """The policy's answer onto the slot and its board row."""
        b, i = self.board, slot.index
        slot.record, slot.due_at = action.record, action.at
        if action.verdict is Verdict.STOP:
            b.set(i, Col.SLOT_STATE, SlotState.STOPPED)
            if slot.removed:
                slot.log.info("➖ %s (worker %d) removed", self._label(slot), i)
                self._after_last_removed()
        elif action.verdict is Verdict.UNAVAILABLE:
            b.set(i, Col.SLOT_STATE, SlotState.UNAVAILABLE)
        elif action.verdict is Verdict.FAIL:
            b.set(i, Col.SLOT_STATE, SlotState.FAILED)
            slot.log.error(
                "❌ %s failed to boot %d times; retrying every %.0f s: %s",
                self._label(slot),
                action.record.boot_failures,
                self.policy.failed_retry_s,
                slot.boot_error,
            )
        else:
            b.set(i, Col.SLOT_STATE, SlotState.BACKOFF)
            b.set(i, Col.BACKOFF_UNTIL, action.at)

    def _retry_now(self, slot: SlotBase) -> None:
        """An operator's restart of a slot that is down: try it again at once."""
        slot.due_at = 0.0
        slot.record = self.policy.on_retry(slot.record)

    def _counted_restart(self, slot: SlotBase) -> None:
        slot.restarts = int(self.board.get(slot.index, Col.RESTARTS)) + 1
        self.board.set(slot.index, Col.RESTARTS, slot.restarts)

    def _note(self, slot: int, what: str) -> None:
        self.events.append((self.clock(), slot, what))
        del self.events[:-1000]
