"""A stuck worker's stack, asked for before it is killed (supervisor.py).

The worker's faulthandler writes every thread's stack to the slot's stack file on
STACK_SIGNAL (and on a fatal error). The supervisor kills the worker once the file
stops growing, or after STACK_WAIT_S, then puts what was written in the log.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vibevoice_pool")


def stack_written(slot, now: float) -> bool:
    """The stack file stopped growing since the last tick, or the wait is over."""
    try:
        size = os.path.getsize(slot.stack_file)
    except OSError:
        size = 0
    done = size > 0 and size == slot.stack_size
    slot.stack_size = size
    return done or now >= slot.kill_at


def log_stack(slot, pid: int) -> None:
    """Put what the worker's faulthandler wrote (asked before a kill, or on a fatal
    error) in the log, and remove the file."""
    try:
        with open(slot.stack_file, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        os.unlink(slot.stack_file)
    except OSError:
        text = ""
    if text:
        slot.log.warning("worker %d (pid %d) stack when it ended:\n%s", slot.index, pid, text)
    elif slot.asked_stack:
        slot.log.warning("worker %d (pid %d) wrote no stack before SIGKILL", slot.index, pid)
