"""How `vibevoice-pool launch` stops: SIGINT (Ctrl+C), SIGTERM and SIGHUP, from the
first line of the launch to its exit.

    while the workers start   the signal interrupts the start (Interrupted): the
                              workers already started are stopped, exit 128 + signal
    while serving             the first signal stops taking requests; what was
                              accepted has grace_s from that signal to finish, one
                              deadline for every phase of the stop (HTTP, jobs, the
                              pool); a second signal stops now: what is unfinished is
                              answered `unavailable`, jobs wait for the next start
                              (the same signal again within REPEAT_S is the first one
                              sent twice, as `timeout` does: not a second)

A handler never raises once the server is up, so a third Ctrl+C cannot break the
stop half way (a process that stops half way leaves its workers behind). Nor inside
`uninterrupted()`: a worker's start, where an exception would cut the zygote off in
the middle of the descriptors it is being sent (a traceback in the log, from it);
the signal's Interrupted is raised as that stretch ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker

log = logging.getLogger("vibevoice_pool")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The same signal again this soon is the same stop, not "stop now": coreutils'
# `timeout` (and a launcher that signals the process and then its group) delivers
# its SIGTERM twice, milliseconds apart; a person's second Ctrl+C comes later.
REPEAT_S = 0.5


NO_INIT = (
    "Running as PID 1 with no init: a worker whose zygote died passes to this process, "
    "which does not reap it (a zombie until the container stops). Keep the image's entry "
    "point (tini) or give the container an init (docker run --init); in Kubernetes set "
    "args:, not command:"
)


def no_init_warning(pid: int | None = None) -> str:
    """NO_INIT when this process is PID 1 (a container's command replaced the image's
    tini): orphans come to PID 1, and only an init reaps them."""
    return NO_INIT if (os.getpid() if pid is None else pid) == 1 else ""


class Interrupted(KeyboardInterrupt):
    """A stop signal while the workers were still starting."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_held = {"depth": 0, "signal": 0}  # the main thread's uninterrupted() stretch


@contextlib.contextmanager
def uninterrupted():
    """A stretch a start signal does not cut: its Interrupted comes at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run in the main thread only
        return
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        signum, _held["signal"] = _held["signal"], 0
        if signum and not _held["depth"]:
            raise Interrupted(signum)


class Stopping:
    """The launch's stop signals (install() to uninstall())."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic):
        self.grace_s = grace_s
        self.clock = clock
        self.deadline: float | None = None  # set by the first signal once serving
        self.forced = threading.Event()
        self.serving = False
        self._asked = False  # a signal came
        self._first: tuple[int, float] | None = None  # the first signal and when
        self._exit: Callable[[int], None] | None = None  # uvicorn's: stop serving
        self._force: list[Callable[[], None]] = []
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a launch in a test's thread)
        # multiprocessing's resource tracker ignores SIGINT and SIGTERM but not SIGHUP:
        # started now with SIGHUP ignored (kept across its exec), a closed terminal
        # leaves it to unlink the status board's shared memory when the pool is gone
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            resource_tracker.ensure_running()
        finally:
            signal.signal(signal.SIGHUP, previous)
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self.handle)

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def serve(self, stop_serving: Callable[[int], None], force: Callable[[], None]) -> None:
        """From now on a signal stops the server (`stop_serving(signum)`), and a
        second one calls `force` too."""
        self._exit = stop_serving
        self._force.append(force)
        self.serving = True

    def begin(self) -> None:
        """The stop starts now (a signal, or the server ended by itself): its deadline."""
        if self.deadline is None:
            self.deadline = self.clock() + self.grace_s

    def left(self) -> float:
        """Seconds the stop's phases may still wait for accepted requests."""
        if self.forced.is_set():
            return 0.0
        self.begin()
        return max(0.0, self.deadline - self.clock())

    def handle(self, signum: int, frame=None) -> None:
        name = signal.Signals(signum).name
        if not self._asked:
            self._asked = True
            self._first = (signum, self.clock())
            if not self.serving:
                self.deadline = self.clock()  # nothing accepted yet: nothing to wait for
                log.warning("%s while starting: stopping the workers started so far", name)
                if _held["depth"]:
                    _held["signal"] = signum  # raised where the stretch ends
                    return
                raise Interrupted(signum)
            self.begin()
            log.warning(
                "%s: stopping. No new requests; accepted ones have up to %.0f s to finish "
                "(send it again to stop now)",
                name,
                self.grace_s,
            )
            if self._exit is not None:
                self._exit(signum)
            return
        first, at = self._first or (0, 0.0)
        if self.serving and signum == first and self.clock() - at < REPEAT_S:
            log.info("%s again at once: the same stop (sent twice by its sender)", name)
            return
        if not self.forced.is_set():
            log.warning(
                "%s again: stopping now; unfinished requests are answered unavailable", name
            )
            self.forced.set()
            for action in list(self._force):
                action()


class StopWork:
    """What the pool and the jobs still run when a stop begins. At the stop's
    deadline (grace_s after the signal), or at once on a second signal, the jobs
    stop (their rows run again at the next start) and the pool answers every
    request still open `unavailable`, so each HTTP answer ends as an answer (JSON,
    or a stream cut short) before uvicorn stops waiting for it (margin_s later)."""

    def __init__(self, pool, margin_s: float):
        self.pool = pool
        self.margin_s = margin_s
        self.jobs = None
        self._lock = threading.Lock()  # the timer acts, or the launch closes: one at a time
        self._closed = False
        self._jobs_stopped = False
        self._timer: threading.Thread | None = None

    def start(self, stopping: Stopping) -> None:
        if self.jobs is not None:  # a queued job started now would only be cut at the deadline
            self.jobs.hold()
        if self._timer is None:
            self._timer = threading.Thread(
                target=self._at_deadline, args=(stopping,), name="stop-timer", daemon=True
            )
            self._timer.start()

    def _at_deadline(self, stopping: Stopping) -> None:
        stopping.forced.wait(stopping.left())
        with self._lock:
            if self._closed:  # the launch is stopping the pool itself
                return
            self._stop_jobs(0.0)
            self.pool.dispatcher.wind_down(0.0)

    def now(self, server) -> None:
        """A second signal: nothing waits any longer."""
        if self.jobs is not None:
            self.jobs.hurry()
        self.pool.dispatcher.hurried.set()
        force = threading.Timer(self.margin_s / 2, lambda: setattr(server, "force_exit", True))
        force.daemon = True  # a stop that ends sooner does not wait for it to exit
        force.start()

    def close(self, wait_s: float) -> None:
        """After serving: the jobs get what is left of the grace, then the pool
        stops (Pool.shutdown, by the launch)."""
        with self._lock:
            self._closed = True
        self._stop_jobs(wait_s)

    def _stop_jobs(self, wait_s: float) -> None:
        if self.jobs is not None and not self._jobs_stopped:
            self._jobs_stopped = True
            self.jobs.stop(wait_s)
