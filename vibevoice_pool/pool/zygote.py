"""The zygote: the template process every worker is forked from, and its supervision.

    parent (supervisor)            zygote (multiprocessing forkserver)
    -------------------            -----------------------------------
    start()  -- preload list -->   imports torch, transformers, the engine's
                                   classes (workers/zygote/); no thread,
                                   no CUDA, no tensor
    context() -> forkserver   --> forks a worker on request; the worker pins
                                   its device (CUDA_VISIBLE_DEVICES) before
                                   any CUDA call (workers.host.worker.run)
    check() every tick        <-- its pidfd: readable once it died

The zygote is the standard library's forkserver (`set_forkserver_preload`), so
a worker is still a `torch.multiprocessing` Process with the same entry and
arguments as under spawn. One forkserver serves a whole process; this class
owns its preload list and watches it. Until the zygote is warm (it has
imported its preload and forked once), and whenever it has died, `context()`
gives spawn: a worker never waits for the zygote to come back. Spawn is also
what `worker_start = "spawn"` asks for, and what a platform without a safe
fork (not Linux, no pidfd) gets.

A zygote whose imports initialised the CUDA driver (a library that asked the CUDA
runtime how many GPUs there are, say) would hand every worker a CUDA it cannot
use: after the warm-up the parent reads the zygote's memory map, and if a GPU
device file (/dev/nvidia*) is open there, the zygote is not used (`off_reason`
says why) and workers spawn. The driver library mapped without a device file is
harmless (a forked child ran CUDA work on an H200): workers fork.

A forkserver preloads modules, not a model: the weights are kept warm by the
parent instead (vibevoice_pool/pool/warm_weights.py), and a forked tiny worker is
ready again in about half a second (docs/PERFORMANCE.md, section 3b), so a
zygote of our own that also held a built model was not needed to reach the
1 s target.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver as _forkserver_mod
import os
import signal
import sys
import threading
import time

log = logging.getLogger("vibevoice_pool")

START_METHODS = ("zygote", "spawn")
PRELOAD = {  # workers.zygote.signals first: a stop signal to the group spares the zygote
    "sim": ["workers.zygote.signals", "workers.zygote.preload"],
    "vibevoice": ["workers.zygote.signals", "workers.zygote.preload", "workers.zygote.model"],
}
_started_with: list[str] | None = None  # the preload of the forkserver this process runs
_module_lock = threading.Lock()


def unsafe_reason() -> str:
    """Why workers cannot be forked from a zygote here ('' when they can)."""
    if not sys.platform.startswith("linux"):
        return "fork from a template process is used on Linux only"
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "this Python has no forkserver start method"
    if not hasattr(os, "pidfd_open"):
        return "this Python has no os.pidfd_open (a worker forked by the zygote is watched by it)"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as e:
        return f"the kernel refuses pidfd_open ({e.strerror})"
    return ""


def _context(engine: str, method: str):
    """torch.multiprocessing's context for a model engine (tensors could cross);
    the standard library's for the simulator, whose parent never imports torch."""
    if engine == "sim":
        import multiprocessing as mp
    else:
        import torch.multiprocessing as mp
    return mp.get_context(method)


def zygote_pid() -> int | None:
    """The pid of this process's forkserver, or None when none runs."""
    return getattr(_forkserver_mod._forkserver, "_forkserver_pid", None)


def _use_preload(preload: list[str]) -> None:
    """Make the process's one forkserver preload `preload`: a forkserver already
    started with another list (a previous pool in this process) is stopped, and
    the next fork starts one with this list."""
    global _started_with
    server = _forkserver_mod._forkserver
    with _module_lock:
        if _started_with == preload and zygote_pid() is not None:
            return
        pid = zygote_pid()
        if pid is not None:
            with server._lock:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                os.close(server._forkserver_alive_fd)
                server._forkserver_pid = server._forkserver_alive_fd = None
                server._forkserver_address = None
        _forkserver_mod.set_forkserver_preload(list(preload))
        _started_with = list(preload)


def _cuda_in(pid: int) -> list[str]:
    """The CUDA driver and GPU device files mapped in a process ([] when none, or
    when its map cannot be read)."""
    from workers.zygote.probe import cuda_mappings

    try:
        with open(f"/proc/{pid}/maps") as f:
            return cuda_mappings(f.read())
    except OSError:
        return []


class Zygote:
    """One pool's view of the zygote: which context a new worker starts with."""

    def __init__(self, engine: str, method: str = "zygote"):
        self.spawn_ctx = _context(engine, "spawn")
        self.preload = PRELOAD.get(engine, PRELOAD["vibevoice"])
        reason = "worker_start = spawn" if method == "spawn" else unsafe_reason()
        self.fork_ctx = None if reason else _context(engine, "forkserver")
        self.off_reason = reason
        self.warm = False
        self.deaths = 0
        self.warm_up_s = 0.0  # how long the last warm-up took (the zygote's imports)
        self.pid: int | None = None
        self._pidfd: int | None = None
        self._lock = threading.Lock()
        self._warming: threading.Thread | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.fork_ctx is not None

    def start(self, wait_s: float) -> None:
        """Start the zygote and wait up to `wait_s` for it to be warm; past that,
        workers spawn and the zygote keeps warming up for the respawns."""
        if not self.enabled:
            log.info("Workers start by spawn (%s)", self.off_reason)
            return
        _use_preload(self.preload)
        self._warm_up_async()
        self._warming.join(timeout=wait_s)
        if not self.warm and self._warming.is_alive():  # else the warm-up said why
            log.warning("The zygote is not warm after %.0f s: workers spawn meanwhile", wait_s)

    def context(self):
        """(multiprocessing context, forked from the zygote?) for the next worker."""
        with self._lock:
            if self.warm and not self._dead() and not self._stopped():
                return self.fork_ctx, True
        self.check()
        return self.spawn_ctx, False

    def check(self) -> None:
        """Called on every supervisor tick: a dead zygote is restarted in the
        background, and workers spawn until it is warm again."""
        with self._lock:
            if not self.warm or not self._dead():
                return
            self.warm = False
            self.deaths += 1
            self._close_pidfd()
        log.warning("⚠️ the zygote (pid %s) died; workers spawn until a new one is warm", self.pid)
        self._warm_up_async()

    def close(self) -> None:
        """Stop watching (the forkserver lives on for the next pool of this process)."""
        with self._lock:
            self._closed = True
            self.warm = False
            self._close_pidfd()

    # ---- inside -----------------------------------------------------------

    def _dead(self) -> bool:
        if self._pidfd is None:
            return True
        import select

        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    def _stopped(self) -> bool:
        """A stopped zygote (SIGSTOP) would block a fork request, and with it the
        supervisor: a worker spawns instead until it runs again."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
        except (OSError, IndexError):
            return False

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _warm_up_async(self) -> None:
        with self._lock:
            if self._closed or (self._warming is not None and self._warming.is_alive()):
                return
            self._warming = threading.Thread(target=self._warm_up, name="zygote", daemon=True)
            self._warming.start()

    def _warm_up(self) -> None:
        """Fork one empty child: the forkserver answers only once it has imported
        its preload, so when the child exists, the zygote is warm."""
        t0 = time.monotonic()
        try:
            # os.getpid: a target that needs no import in the parent or the child
            child = self.fork_ctx.Process(target=os.getpid, name="vibevoice-zygote-probe")
            child.start()
            child.join(timeout=30)
            pid = zygote_pid()
            pidfd = os.pidfd_open(pid)
        except Exception as e:  # the zygote could not start: spawn stays
            log.warning("The zygote could not start (%s: %s); workers spawn", type(e).__name__, e)
            return
        from workers.zygote.probe import driver_initialised

        driver = driver_initialised(_cuda_in(pid))
        with self._lock:
            if self._closed:
                os.close(pidfd)
                return
            self._close_pidfd()
            self._pidfd, self.pid = pidfd, pid
            self.warm_up_s = time.monotonic() - t0
            if driver:
                self.off_reason = (
                    f"the zygote (pid {pid}) has the CUDA driver initialised after its imports "
                    f"({', '.join(driver)} open): a worker forked from it could not use CUDA"
                )
            self.warm = not driver
        if driver:
            log.warning("⚠️ %s; workers spawn instead", self.off_reason)
            return
        log.info("🧬 zygote (pid %d) warm in %.1f s: workers fork from it", pid, self.warm_up_s)
