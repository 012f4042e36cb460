"""Where the supervisor ends a worker's process (supervisor.py; the stack: stacks.py).

    each tick, a live worker -> the board's vitals (heartbeat, progress, device
                                health) to the recovery policy's hang rule; a kill
                                it orders is a SIGKILL, a stuck worker (hung,
                                stalled, slow to boot) first sent STACK_SIGNAL and
                                killed once its stack is written, or after
                                STACK_WAIT_S; a removed worker done draining is
                                sent its Shutdown
    shutdown                 -> one deadline (STOP_WAIT_S) for every worker to end
                                on its Shutdown, what they send meanwhile read and
                                dropped; SIGKILL for the rest

`WorkerKills` is a part of `Supervisor`, which it reads and calls: `board`, `policy`,
`dispatcher`, `clock`, `_note`, `_label`, `_send` and `_close`.
"""

from __future__ import annotations

import time
from multiprocessing import connection

from vibevoice_pool.pool.recovery import KillKind, Vitals
from vibevoice_pool.pool.stacks import stack_written
from vibevoice_pool.pool.worker_process import WorkerProcess
from workers.host.worker import STACK_SIGNAL
from workers.wire import messages as m
from workers.wire.board import Col, SlotState, WorkerState

STACK_WAIT_S = 1.0  # longest wait for a hung worker's stack before SIGKILL
STOP_WAIT_S = 2.0  # at shutdown, longest wait for the workers to exit before SIGKILL
ASK_STACK = (KillKind.HANG, KillKind.STALL, KillKind.BOOT_TIMEOUT)  # stuck: ask what on


class WorkerKills:
    def _vitals(self, slot, now: float) -> Vitals:
        """What the board shows of a live worker, for the policy's hang rule."""
        b, i = self.board, slot.index
        beat = b.get(i, Col.HEARTBEAT)  # 0 until the worker's first beat
        busy = int(b.get(i, Col.WORKER_STATE)) == WorkerState.BUSY
        unhealthy = slot.placement.is_gpu and b.get(i, Col.HEALTH) == 0
        slot.unhealthy_since = (slot.unhealthy_since or now) if unhealthy else 0.0
        return Vitals(
            heartbeat_age=now - beat if beat > 0 else None,
            progress_age=now - b.get(i, Col.PROGRESS) if busy else None,
            unhealthy_for=now - slot.unhealthy_since if unhealthy else None,
        )

    def _check_live(self, slot, now: float) -> None:
        """The hang rule, and a removed worker that finished draining."""
        if slot.kill_reason:
            if slot.kill_at and stack_written(slot, now):
                slot.kill_at = 0.0
                slot.process.kill()
            return  # killed (or about to be); its sentinel will fire
        kill = self.policy.on_tick(slot.record, now, self._vitals(slot, now))
        if kill is not None:
            if kill.kind is KillKind.BOOT_TIMEOUT:
                slot.boot_error = kill.reason
            elif kill.kind is KillKind.DEVICE_LOST:
                slot.device_lost = True
                self.dispatcher.drain(slot.index)
            self._kill(slot, kill.reason, ask_stack=kill.kind in ASK_STACK)
        elif slot.removed and not slot.shutdown_sent and self.dispatcher.held_by(slot.index) == 0:
            slot.shutdown_sent = True
            self._send(slot, m.Shutdown())

    def _kill(self, slot, reason: str, ask_stack: bool = False) -> None:
        """SIGKILL; a stuck worker is first asked for its stack (STACK_SIGNAL: its
        faulthandler writes every thread's), and killed once it is written."""
        slot.kill_reason = reason
        slot.log.warning("⚠️ %s (worker %d): %s; killing it", self._label(slot), slot.index, reason)
        self._note(slot.index, "kill")
        if ask_stack and slot.stack_file:
            slot.kill_at, slot.asked_stack = self.clock() + STACK_WAIT_S, True
            slot.process.signal(STACK_SIGNAL)
        else:
            slot.process.kill()

    def _stop_processes(self, slots: list, timeout: float = STOP_WAIT_S) -> None:
        """One wait for every worker to end on its Shutdown, then SIGKILL for the rest
        (a worker still booting, stopped or stuck): a stop of N workers waits
        `timeout` once, not N times. Meanwhile what they still send is read and
        dropped: a worker blocked on a full response pipe never reads its Shutdown."""
        deadline = time.monotonic() + timeout
        running = {slot.process.handle for slot in slots}
        talking = {slot.responses for slot in slots if slot.responses is not None}
        while running and (left := deadline - time.monotonic()) > 0:
            for ready in connection.wait([*running, *talking], left):
                if ready in running:
                    running.discard(ready)
                    continue
                try:
                    ready.recv_bytes()
                except (EOFError, OSError):
                    talking.discard(ready)
        stuck = [slot.process for slot in slots if slot.process.alive()]
        for proc in stuck:
            proc.kill()
        _wait_all(stuck, timeout)
        for slot in slots:
            slot.process.proc.join(timeout=0.5)  # a spawned child is reaped
            self._close(slot)
            self.board.set(slot.index, Col.SLOT_STATE, SlotState.STOPPED)


def _wait_all(procs: list[WorkerProcess], timeout: float) -> None:
    """Wait until every process has ended, or `timeout` has passed (one deadline)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.ended(max(0.0, deadline - time.monotonic()))
