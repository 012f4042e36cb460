"""The watchdog: a small process that outlives the parent to end the workers it left.

    parent (supervisor)                    watchdog (this module, `main`)
    -------------------                    ------------------------------
    watch(pid)    -- "+PID" line -->       remembers the worker (or the zygote)
    forget(pid)   -- "-PID" line -->       forgets it (it died and was reaped)
    stand_down()  -- "stop" line -->       exits: a clean stop ends its own workers
    the parent dies: EOF                   waits GRACE_S, then SIGKILLs every one left

A worker exits by itself once its parent's death pipe closes (a thread of the
worker reads it: workers/host/worker.py), but only a worker that runs can read
it: one stopped (SIGSTOP) or stuck in a C call that holds the GIL outlived a
SIGKILLed parent for ever, with its GPU memory, and kept the zygote and the
resource tracker alive too. The watchdog is started with a fresh interpreter
(no torch: it imports only this module), ignores the stop signals a terminal
sends to the whole group (the parent decides how the pool stops), and kills only
processes that are still multiprocessing children, so a PID reused meanwhile by
anything else is spared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

GRACE_S = 1.0  # a worker that runs leaves by itself within this


class Watchdog:
    """The parent's end: one pipe to the watchdog process."""

    def __init__(self) -> None:
        read_fd, self._w = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = f"import sys; sys.path.insert(0, {root!r}); from workers.host import watchdog; "
        code += f"watchdog.main({read_fd})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(read_fd,), stdin=subprocess.DEVNULL
        )
        os.close(read_fd)

    def _say(self, line: str) -> None:
        if self._w >= 0:
            with contextlib.suppress(OSError):  # it died: nothing to tell
                os.write(self._w, line.encode() + b"\n")

    def watch(self, pid: int | None) -> None:
        if pid:
            self._say(f"+{pid}")

    def forget(self, pid: int | None) -> None:
        if pid:
            self._say(f"-{pid}")

    def stand_down(self) -> None:
        """A clean stop: the pool ends its workers itself."""
        self._say("stop")
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _ours(pid: int) -> bool:
    """Still a multiprocessing child (a spawned worker, or one forked from the zygote,
    or the zygote itself), not a process that took a dead one's PID."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing" in f.read()
    except OSError:
        return False


def main(fd: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pids: set[int] = set()
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.strip()
            if line == b"stop":
                return
            if line[:1] in (b"+", b"-") and line[1:].isdigit():
                (pids.add if line[:1] == b"+" else pids.discard)(int(line[1:]))
    time.sleep(GRACE_S)  # the parent died: the workers that run leave by themselves
    for pid in sorted(pids):
        if _ours(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
