"""The watchdog: a small process that outlives the parent to end the workers it left.

    parent                                  watchdog (this module, `main`)
    ------                                  ------------------------------
    watch(pid)    -- "+PID" line -->        remembers a worker (or the zygote)
    forget(pid)   -- "-PID" line -->        forgets it (it died and was reaped)
    watch_exact(pid)   -- "=PID TICKS" -->  remembers any program, known by its start
    watch_env(k, v, since) -- "env TICKS K=V" -->  and every process of this user
                                            started since then whose environment has K=V
    remove(path)  -- "rm PATH" line -->     a folder to delete once those are gone
    stand_down()  -- "stop" line -->        exits: a clean stop ends its own workers
    the parent dies: EOF                    waits GRACE_S, SIGKILLs every one left,
                                            waits for them, deletes the folders, and
                                            says so in one line on stderr (the server's
                                            log format: text or JSON), when it did

A worker exits by itself once its parent's death pipe closes (a thread of the
worker reads it: workers/host/worker.py), but only a worker that runs can read
it: one stopped (SIGSTOP) or stuck in a C call that holds the GIL outlived a
SIGKILLed parent for ever, with its GPU memory, and kept the zygote and the
resource tracker alive too. The ray backend's local Ray (vibevoice_pool/ray/
cluster.py) has no death pipe at all: its agents outlived a SIGKILLed parent by
a minute and its session folder for ever. The watchdog is started with a fresh
interpreter (no torch, no Ray: it imports only this module), ignores the stop
signals a terminal sends to the whole group (the parent decides how the pool
stops), and kills only the processes it was told of: a multiprocessing child
still, or one with the start time it had, so a PID reused meanwhile by anything
else is spared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

GRACE_S = 1.0  # a worker that runs leaves by itself within this
GONE_WAIT_S = 5.0  # how long the killed get to vanish before their folders go


class Watchdog:
    """The parent's end: one pipe to the watchdog process."""

    def __init__(self, log_format: str = "text") -> None:
        read_fd, self._w = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = f"import sys; sys.path.insert(0, {root!r}); from workers.host import watchdog; "
        code += f"watchdog.main({read_fd}, {log_format!r}, {os.getpid()})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(read_fd,), stdin=subprocess.DEVNULL
        )
        os.close(read_fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

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

    def watch_exact(self, pid: int) -> None:
        """Any program (not a multiprocessing child), known by its start time."""
        ticks = start_ticks(pid)
        if ticks is not None:
            self._say(f"={pid} {ticks}")

    def watch_env(self, name: str, value: str, since_pid: int) -> None:
        """Every process of this user, started no earlier than `since_pid`, whose
        environment holds name=value (those started after the last watch_exact)."""
        ticks = start_ticks(since_pid)
        if ticks is not None and "\n" not in name + value:
            self._say(f"env {ticks} {name}={value}")

    def remove(self, path: str) -> None:
        """A folder to delete once what was watched is gone (and a link beside it
        that points to it)."""
        if "\n" not in path:
            self._say(f"rm {os.path.abspath(path)}")

    def stand_down(self) -> None:
        """A clean stop: the pool ends its workers itself."""
        self._say("stop")
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): a PID and this name one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _ours(pid: int) -> bool:
    """Still a multiprocessing child (a spawned worker, or one forked from the zygote,
    or the zygote itself), not a process that took a dead one's PID."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing" in f.read()
    except OSError:
        return False


def _now_ticks() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _with_env(markers: list[tuple[int, bytes]], until: int) -> set[int]:
    """This user's processes whose environment holds a marker, started between the
    marker's start time and `until` (so not those of a pool started since)."""
    found: set[int] = set()
    if not markers:
        return found
    uid = os.getuid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        ticks = start_ticks(pid)
        for since, marker in markers:
            if ticks is not None and since <= ticks <= until and b"\0" + marker + b"\0" in env:
                found.add(pid)
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            link = os.path.join(parent, name)
            if (
                os.path.islink(link)
                and os.path.abspath(os.path.join(parent, os.readlink(link))) == path
            ):
                os.unlink(link)


def report(parent: int, killed: list[int], folders: list[str], log_format: str) -> None:
    """One line on stderr, in the server's log format, saying what was left and ended."""
    import logging

    from workers.host.log_lines import JsonFormatter

    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(JsonFormatter() if log_format == "json" else text)
    say = logging.getLogger("vibevoice_pool.watchdog")
    say.addHandler(handler)
    say.propagate = False
    shown = ", ".join(map(str, killed[:20])) + (" ..." if len(killed) > 20 else "")
    say.warning(
        "watchdog: the server (pid %d) ended without stopping what it started: "
        "SIGKILLed %d process(es) it left%s, deleted %d folder(s)",
        parent,
        len(killed),
        f" ({shown})" if killed else "",
        len(folders),
    )


def main(fd: int, log_format: str = "text", parent: int = 0) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    pids: set[int] = set()
    exact: dict[int, int] = {}  # pid -> its start ticks
    markers: list[tuple[int, bytes]] = []
    folders: list[str] = []
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.rstrip(b"\n")
            if line == b"stop":
                return
            word, _, rest = line.partition(b" ")
            if word[:1] in (b"+", b"-") and word[1:].isdigit():
                pid = int(word[1:])
                (pids.add if word[:1] == b"+" else pids.discard)(pid)
                if word[:1] == b"-":
                    exact.pop(pid, None)
            elif word[:1] == b"=" and word[1:].isdigit() and rest.isdigit():
                exact[int(word[1:])] = int(rest)
            elif word == b"env" and b" " in rest:
                since, _, marker = rest.partition(b" ")
                if since.isdigit() and b"=" in marker:
                    markers.append((int(since), marker))
            elif word == b"rm" and rest.startswith(b"/"):
                folders.append(os.fsdecode(rest))
    until = _now_ticks() + os.sysconf("SC_CLK_TCK")  # what Ray started as its parent died
    time.sleep(GRACE_S)  # the parent died: the workers that run leave by themselves
    doomed = {pid for pid in pids if _ours(pid)}
    doomed |= {pid for pid, ticks in exact.items() if start_ticks(pid) == ticks}
    doomed |= _with_env(markers, until)
    killed = []
    for pid in sorted(doomed):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    if not folders:
        if killed:
            report(parent, killed, folders, log_format)
        return
    deadline = time.monotonic() + GONE_WAIT_S
    while any(_alive(pid) for pid in doomed) and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in folders:
        _remove(path)
    report(parent, killed, folders, log_format)
