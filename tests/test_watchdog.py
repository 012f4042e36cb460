"""The watchdog (workers/host/watchdog.py) with a real parent that is SIGKILLed:
what it was told of dies, its folder goes, and nothing else is touched.

The ray backend's local Ray has no death pipe: its parent tells the watchdog of
each process by its start time, of the workers its raylet starts later by an
environment variable they carry, and of its session folder. The parent here
does the same with `sleep` processes, without Ray (tests/test_ray.py has the
whole server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, pid_alive, wait_until

MARK = "VVP_WATCHDOG_TEST"

PARENT = """
import json, os, subprocess, sys, time
from workers.host.watchdog import Watchdog
folder, mark, stand_down = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
dog = Watchdog("json")  # its line as the server's JSON log would have it
told = subprocess.Popen(["sleep", "300"])  # known by its start time
dog.watch_exact(told.pid)
dog.watch_env(mark.split("=")[0], mark.split("=")[1], os.getpid())
marked = subprocess.Popen(["sleep", "300"], env=dict(os.environ, **dict([mark.split("=")])))
untold = subprocess.Popen(["sleep", "300"])  # neither told nor marked
dog.remove(folder)
if stand_down:
    dog.stand_down()
print(json.dumps({"told": told.pid, "marked": marked.pid, "untold": untold.pid,
                  "watchdog": dog.pid}), flush=True)
time.sleep(300)
"""


def run_parent(tmp_path, stand_down: bool):
    """(parent, its children's pids, a marked process started before it, folders)."""
    session = tmp_path / "ray" / "session_1"
    other = tmp_path / "ray" / "session_0"  # another Ray's, beside ours
    for folder in (session, other):
        (folder / "logs").mkdir(parents=True)
        (folder / "logs" / "raylet.out").write_text("x")
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    (tmp_path / "ray" / "session_older").symlink_to(other)
    mark = f"{MARK}={os.getpid()}"
    # marked, but started before the parent: another pool's, spared
    before = subprocess.Popen(["sleep", "300"], env=dict(os.environ, **dict([mark.split("=")])))
    time.sleep(0.1)  # start times count in clock ticks (10 ms)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(session), mark, "1" if stand_down else "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # the watchdog's too: it inherits it
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    pids = json.loads(parent.stdout.readline())
    return parent, pids, before, session, other


def said_so_far(parent) -> str:
    """What the parent's stderr holds now (the `sleep`s keep it open: no EOF to read to)."""
    fd = parent.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16).decode()
    except BlockingIOError:
        return ""


def end(*pids: int) -> None:
    for pid in pids:  # only processes this test started, by pid
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_parent_leaves_nothing_it_told_of_and_spares_the_rest(tmp_path):
    parent, pids, before, session, other = run_parent(tmp_path, stand_down=False)
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not pid_alive(pids["watchdog"]), 15, what="the watchdog to finish")
        assert not pid_alive(pids["told"])
        assert not pid_alive(pids["marked"])  # started after the parent, marked
        assert pid_alive(pids["untold"]) and pid_alive(before.pid)  # never told of
        assert not session.exists() and not (tmp_path / "ray" / "session_latest").is_symlink()
        assert (other / "logs" / "raylet.out").exists()
        assert (tmp_path / "ray" / "session_older").resolve() == other
        # the log says once what it ended, in the server's format (a JSON line here)
        lines = [json.loads(x) for x in said_so_far(parent).splitlines() if "watchdog" in x]
        assert len(lines) == 1 and lines[0]["level"] == "WARNING", lines
        said = lines[0]["msg"]
        assert f"the server (pid {parent.pid}) ended without stopping" in said
        assert "SIGKILLed 2 process(es)" in said and "deleted 1 folder(s)" in said
        assert str(pids["told"]) in said and str(pids["untold"]) not in said
    finally:
        end(pids["told"], pids["marked"], pids["untold"], before.pid)
        before.wait(5)


def test_a_parent_that_stood_down_leaves_its_processes_and_folder_alone(tmp_path):
    """A clean stop ends its own processes: the watchdog has left, whatever follows."""
    parent, pids, before, session, _ = run_parent(tmp_path, stand_down=True)
    try:
        assert not pid_alive(pids["watchdog"])  # stand_down waited for it
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        time.sleep(1.5)  # longer than the watchdog's grace, had it stayed
        assert all(pid_alive(pids[k]) for k in ("told", "marked", "untold"))
        assert (session / "logs" / "raylet.out").exists()
        assert "watchdog" not in said_so_far(parent)  # nothing to say
    finally:
        end(pids["told"], pids["marked"], pids["untold"], before.pid)
        before.wait(5)
