"""One worker process as the supervisor sees it: started, watched, stopped.

A worker forked by the zygote is the zygote's child, not the parent's: its
`multiprocessing` sentinel is a socket to the zygote, which reports the exit
when it reaps the child, and which reads as a death of every such worker if
the zygote itself dies. So a worker is watched through a pidfd of its own
(Linux 5.3): readable once that process has ended, whoever its parent is. A
spawned worker falls back to its sentinel where no pidfd can be had.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import struct
import termios
from multiprocessing import connection


class WorkerProcess:
    def __init__(self, ctx, forked: bool, **process_kwargs):
        self.forked = forked  # started by the zygote (else spawned)
        self.proc = ctx.Process(**process_kwargs)
        self.pidfd: int | None = None

    def start(self) -> None:
        self.proc.start()
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # no pidfd here, or the child is already gone
            self.pidfd = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def handle(self):
        """What `connection.wait` waits on: ready once the process has ended."""
        return self.pidfd if self.pidfd is not None else self.proc.sentinel

    def ended(self, timeout: float = 0.0) -> bool:
        return bool(connection.wait([self.handle], timeout))

    def alive(self) -> bool:
        return not self.ended(0)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def exit_description(self) -> str:
        """'killed by SIGKILL' or 'exit code N', once the process has ended."""
        if self.forked and self._zygote_gone_unreported():
            # multiprocessing reads the zygote's end as exit code 255: not this worker's
            self.proc.join(timeout=0)
            return "ended, its exit status not known (the zygote that forked it is gone)"
        self.proc.join(timeout=1)  # a spawned child is reaped; the zygote reports a forked one
        code = self.proc.exitcode
        if code is None:  # forked: the zygote (stopped, or gone) never reported it
            return "ended, its exit status not known"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def _zygote_gone_unreported(self) -> bool:
        """The sentinel of a forked worker is a pipe that only the zygote writes (the
        exit status, once it has reaped the worker): readable with nothing in it is its
        end of file, the zygote gone without a word."""
        fd = self.proc.sentinel
        try:
            if not connection.wait([fd], 1):
                return False  # the zygote has not reported yet
            waiting = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        except (OSError, ValueError):
            return False
        return struct.unpack("i", waiting)[0] == 0

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def start_cause(e: OSError) -> str:
    """The failed boot's reason in /metrics: `file_handles` for EMFILE / ENFILE."""
    return "file_handles" if e.errno in (errno.EMFILE, errno.ENFILE) else "start"


def start_error(e: OSError) -> str:
    """Why a worker process could not be started, in words an operator can act on."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (
            f"no file handle left to start a worker ({e.strerror}; open-file limit {limit}): "
            "raise the limit (ulimit -n, LimitNOFILE=) or lower max_connections"
        )
    return f"the worker process could not be started: {e.strerror or e}"
