"""How the pool ends its workers (Pool.shutdown), on real sim workers: a worker
still running rows whose requests were answered exits on its Shutdown, and the
workers that do not exit are waited for together, not one after another."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import pid_alive, wait_until

from vibevoice_pool.config import build
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.script import parse_script
from workers.wire import messages as m

pytestmark = pytest.mark.slow

STOP_WAIT_S = 2.0  # the supervisor's wait for a worker to exit before SIGKILL

LONG = "Speaker 1: " + "a long line of speech " * 40  # about 60 s of audio


def started(tmp_path, **settings) -> Pool:
    """A pool of sim workers, every one ready; the test stops it itself."""
    values = {"engine": "sim", "cache_dir": str(tmp_path), **settings}
    pool = Pool.start(build(values))
    n = len(pool.live_slots())
    wait_until(lambda: pool.ready_workers() == n, 60, what="every worker to be ready")
    return pool


def test_busy_workers_exit_on_their_shutdown_instead_of_being_killed(tmp_path):
    """At the stop's deadline every open request is answered `unavailable`; the rows
    still running in the workers are no one's work. A worker used to finish them
    before it read its Shutdown, so each was SIGKILLed after a 2 s wait."""
    pool = started(tmp_path, gpus="cpu:2", sim_rtf=0.5, worker_start="spawn")
    handles = [pool.submit(pool.make_request(parse_script(LONG))) for _ in range(2)]
    wait_until(lambda: all(w["state"] == "busy" for w in pool.status()["workers"]), 30, what="busy")
    procs = [slot.process.proc for slot in pool.supervisor.slots]
    pool.shutdown(grace_s=0)
    for h in handles:
        with pytest.raises(m.PoolError) as e:
            h.result(timeout=10)
        assert e.value.kind == m.ErrorKind.UNAVAILABLE
    assert [p.exitcode for p in procs] == [0, 0]  # not -SIGKILL


def test_workers_that_do_not_exit_are_waited_for_together(tmp_path):
    """Four stopped workers (as a GPU stuck in a kernel would be): one wait of
    STOP_WAIT_S for all of them, then SIGKILL; it was STOP_WAIT_S for each in turn
    (8 s here, 16 s for eight GPUs), past a container's stop timeout."""
    pool = started(tmp_path, gpus="cpu:4")
    pids = [w["pid"] for w in pool.status()["workers"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    pool.shutdown(grace_s=0)
    took = time.monotonic() - t0
    for pid in pids:
        wait_until(lambda p=pid: not pid_alive(p), 10, what=f"worker {pid} to end")
    assert took < 2 * STOP_WAIT_S  # 4 x STOP_WAIT_S before


def test_a_start_signal_waits_for_the_worker_being_started(caplog):
    """A SIGTERM to the group while the workers started raised Interrupted wherever the
    main thread was, once in the middle of a worker's start: the zygote, cut off while
    it was being sent the worker's descriptors, printed an EOFError traceback (CI's
    test_a_signal_while_the_workers_start_stops_them_without_a_traceback). Within
    uninterrupted() the signal is said at once and raised as the stretch ends."""
    from vibevoice_pool.pool.stopping import Interrupted, Stopping, uninterrupted

    stopping = Stopping(grace_s=5)
    went_on = []
    with caplog.at_level("WARNING", logger="vibevoice_pool"):
        with pytest.raises(Interrupted) as e:
            with uninterrupted():
                stopping.handle(signal.SIGTERM)  # returns: the start goes on
                went_on.append("the worker's start finished")
    assert went_on and e.value.exit_code == 128 + signal.SIGTERM
    assert "SIGTERM while starting" in caplog.text
    with pytest.raises(Interrupted):  # outside it, at once as before
        Stopping(grace_s=5).handle(signal.SIGINT)
    with uninterrupted():  # no signal: nothing raised, and nothing left pending
        pass
