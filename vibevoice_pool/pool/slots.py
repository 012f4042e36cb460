"""What the local Supervisor and the RaySupervisor share about their slots:
the launch wait for the first ready worker, and the room check for a new one."""

from __future__ import annotations

import time

from workers import messages as m


class BootError(RuntimeError):
    """No worker could load its engine at launch."""


def wait_first_ready(
    lock, slots, is_ready, first_error, timeout: float, noun: str, hint: str = ""
) -> None:
    """Block until one slot `is_ready`; BootError when every slot has failed to boot
    (with the first error), or after `timeout` (naming the setting to raise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            if any(is_ready(s) for s in slots):
                return
            if all(s.boot_failures > 0 for s in slots):
                raise BootError(first_error() or f"every {noun} failed to boot")
        time.sleep(0.02)
    raise BootError(
        f"no {noun} was ready after {timeout:g} s; raise boot_timeout_s if the model "
        f"needs longer to load{hint}"
    )


def next_slot_index(stopping: bool, slots: list, rows: int) -> int:
    """The index a new slot gets, or a typed refusal (shutting down, board full)."""
    if stopping:
        raise m.PoolError(m.ErrorKind.UNAVAILABLE, "the pool is shutting down")
    if len(slots) >= rows:
        raise m.PoolError(m.ErrorKind.BAD_INPUT, f"the pool has room for {rows} workers at most")
    return len(slots)
