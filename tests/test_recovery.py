"""Faults caused for real on a pool of spawned sim workers: SIGKILL, SIGSTOP,
a stuck engine, a poisoned request. Nothing accepted may be lost."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import pid_alive, wait_until

from vibevoice_pool.script import parse_script
from workers.wire import messages as m
from workers.wire.estimate import audio_seconds_for

pytestmark = pytest.mark.slow

TEXT = "Speaker 1: " + "a long line of speech " * 4  # about 6 s of audio


def submit(pool, text=TEXT, seed=None):
    return pool.submit(pool.make_request(parse_script(text), seed=seed))


def expected_samples(text):
    return int(round(audio_seconds_for(parse_script(text)[0].text) * m.SAMPLE_RATE))


def worker(pool, i):
    return pool.status()["workers"][i]


def busy_worker(pool):
    def find():
        for w in pool.status()["workers"]:
            if w["inflight"] and w["state"] == "busy":
                return w
        return None

    return wait_until(find, 20, what="a busy worker")


def test_sigkill_a_worker_holding_requests(sim_pool):
    with sim_pool(gpus="cpu:2", sim_rtf=0.3, max_batch_size=2) as pool:
        handles = [submit(pool, seed=i) for i in range(6)]
        victim = busy_worker(pool)
        os.kill(victim["pid"], signal.SIGKILL)
        for h in handles:
            audio = h.result(timeout=60)
            assert len(audio) == expected_samples(TEXT)  # complete, nothing repeated
        back = wait_until(
            lambda: (w := worker(pool, victim["id"]))["state"] == "ready" and w, 20, what="respawn"
        )
        assert back["pid"] != victim["pid"] and back["restarts"] == 1
        assert not pid_alive(victim["pid"])
        assert pool.dispatcher.counters["requeued"] >= 1


def test_a_replayed_request_gives_the_same_audio(sim_pool):
    with sim_pool(gpus="cpu:2", sim_rtf=0.3) as pool:
        h = submit(pool, seed=7)
        victim = busy_worker(pool)
        wait_until(lambda: len(h.audio()) > 0, 20, what="the first chunk")
        os.kill(victim["pid"], signal.SIGKILL)
        replayed = h.result(timeout=60)
        again = submit(pool, seed=7).result(timeout=60)
        assert (replayed == again).all()


def test_sigstop_a_worker_is_found_hung_and_replaced(sim_pool):
    with sim_pool(gpus="cpu:2", sim_rtf=0.3, hang_timeout_s=2.0) as pool:
        handles = [submit(pool, seed=i) for i in range(4)]
        victim = busy_worker(pool)
        os.kill(victim["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_until(
                lambda: not pid_alive(victim["pid"]), 15, what="the hung worker to be killed"
            )
            found_after = time.monotonic() - t0
        finally:
            if pid_alive(victim["pid"]):
                os.kill(victim["pid"], signal.SIGCONT)
        assert found_after < 2.0 + 3.0  # the hang timeout, plus a tick and scheduling slack
        for h in handles:
            assert len(h.result(timeout=60)) == expected_samples(TEXT)
        back = wait_until(
            lambda: (w := worker(pool, victim["id"]))["state"] == "ready" and w, 20, what="respawn"
        )
        assert back["pid"] != victim["pid"] and back["restarts"] == 1


def test_a_frozen_worker_leaves_ready_before_the_hang_timeout(sim_pool):
    """/ready counts a worker only while it beats: a SIGSTOPped worker stops counting
    within seconds, long before hang_timeout_s replaces it, and counts again once it
    goes on."""
    with sim_pool(gpus="cpu:1", hang_timeout_s=120.0) as pool:
        (w,) = pool.status()["workers"]
        assert pool.ready_workers() == 1
        os.kill(w["pid"], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_until(lambda: pool.ready_workers() == 0, 20, what="the frozen worker to leave")
            left_after = time.monotonic() - t0
            assert worker(pool, 0)["state"] == "ready"  # not yet replaced: still the same pid
            assert worker(pool, 0)["pid"] == w["pid"]
        finally:
            os.kill(w["pid"], signal.SIGCONT)
        assert left_after >= pool.silent_after_s() - 1.0
        wait_until(lambda: pool.ready_workers() == 1, 10, what="the worker to count again")
        assert worker(pool, 0)["pid"] == w["pid"] and worker(pool, 0)["restarts"] == 0


def test_a_stuck_engine_is_killed_by_the_stall_timeout(sim_pool):
    with sim_pool(gpus="cpu:2", stall_timeout_s=1.5) as pool:
        stuck = submit(pool, text="Speaker 1: this one hangs [[hang]]")
        others = [submit(pool, seed=i) for i in range(3)]
        for h in others:
            h.result(timeout=60)
        with pytest.raises(m.PoolError) as e:
            stuck.result(timeout=60)
        assert e.value.kind == m.ErrorKind.WORKER_LOST


def test_a_worker_idle_longer_than_the_stall_timeout_takes_its_next_request(sim_pool):
    """Idle time is not a stall: the stall clock starts when the worker takes work,
    not at the last step it ran before going idle."""
    with sim_pool(gpus="cpu:1", stall_timeout_s=1.0, sim_rtf=1.0, sim_chunk_s=0.4) as pool:
        before = worker(pool, 0)
        time.sleep(2.0)  # idle twice the stall timeout
        text = "Speaker 1: a short line"
        assert len(submit(pool, text=text).result(timeout=60)) == expected_samples(text)
        after = worker(pool, 0)
        assert after["pid"] == before["pid"] and after["restarts"] == 0, after


def test_a_stalled_worker_leaves_its_python_stack_in_the_log(sim_pool, caplog):
    caplog.set_level("WARNING", logger="vibevoice_pool")
    with sim_pool(gpus="cpu:1", stall_timeout_s=1.0) as pool:
        victim = worker(pool, 0)
        stuck = submit(pool, text="Speaker 1: this one hangs [[hang]]")
        with pytest.raises(m.PoolError) as e:
            stuck.result(timeout=60)
        assert e.value.kind == m.ErrorKind.WORKER_LOST
        assert "Traceback" not in e.value.message  # the stack is for the log, not the client
    # one stack per worker it stalled (it is replayed once, then quarantined)
    stacks = [r.getMessage() for r in caplog.records if "stack when it ended" in r.getMessage()]
    assert stacks and f"pid {victim['pid']}" in stacks[0], caplog.text
    stack = stacks[0]
    # where it was stuck: the sim's step, waiting on an event that never comes, called
    # by the worker loop; and every other thread (heartbeat, death pipe) too
    assert "engines/sim.py" in stack and "in execute" in stack and "in wait" in stack
    assert "host/worker.py" in stack and "in _loop" in stack and "in _beat" in stack
    assert "killed by SIGKILL" in caplog.text  # asked first, then killed


def test_a_poisoned_request_is_quarantined_after_two_lost_workers(sim_pool):
    with sim_pool(gpus="cpu:2", sim_rtf=0.1) as pool:
        poison = submit(pool, text="Speaker 1: this one crashes [[crash]]")
        others = [submit(pool, seed=i) for i in range(5)]
        with pytest.raises(m.PoolError) as e:
            poison.result(timeout=60)
        assert e.value.kind == m.ErrorKind.WORKER_LOST
        assert "2 workers" in e.value.message
        for h in others:
            assert len(h.result(timeout=60)) == expected_samples(TEXT)
        # the poison is never retried again: every slot comes back and stays up
        wait_until(
            lambda: all(w["state"] == "ready" for w in pool.status()["workers"]),
            30,
            what="respawns",
        )
        assert sum(w["restarts"] for w in pool.status()["workers"]) == 2


def test_engine_errors_fail_the_request_and_the_worker_lives_on(sim_pool):
    with sim_pool(gpus="cpu:1") as pool:
        pid = worker(pool, 0)["pid"]
        for marker, kind in (
            ("[[oom]]", m.ErrorKind.OUT_OF_MEMORY),
            ("[[error]]", m.ErrorKind.ENGINE_ERROR),
        ):
            with pytest.raises(m.PoolError) as e:
                submit(pool, text=f"Speaker 1: {marker}").result(timeout=30)
            assert e.value.kind == kind
        assert len(submit(pool).result(timeout=30)) == expected_samples(TEXT)
        assert worker(pool, 0)["pid"] == pid and worker(pool, 0)["restarts"] == 0


def test_an_engine_bug_leaves_its_traceback_in_the_log_and_its_message_to_the_client(
    sim_pool, caplog
):
    caplog.set_level("ERROR", logger="vibevoice_pool")
    with sim_pool(gpus="cpu:1") as pool:
        pid = worker(pool, 0)["pid"]
        # poisoned: a turn whose text is not text, built past the API's checks
        poisoned = m.Request(id=pool.dispatcher.new_id(), turns=(m.Turn(0, None),))
        with pytest.raises(m.PoolError) as e:
            pool.submit(poisoned).result(timeout=30)
        assert e.value.kind == m.ErrorKind.ENGINE_ERROR
        assert e.value.message.startswith("TypeError:") and "Traceback" not in e.value.message
        assert len(submit(pool).result(timeout=30)) == expected_samples(TEXT)
        assert worker(pool, 0)["pid"] == pid  # the worker lived on
    logged = [r.getMessage() for r in caplog.records if "failed in worker 0" in r.getMessage()]
    assert len(logged) == 1, caplog.text
    # the worker's own traceback, carried home: where in the engine it broke
    assert "Traceback (most recent call last)" in logged[0]
    assert "engines/sim.py" in logged[0] and "in prepare" in logged[0]


def test_cancel_mid_generation_frees_the_slot(sim_pool):
    with sim_pool(gpus="cpu:1", sim_rtf=0.5) as pool:
        long = submit(pool, text="Speaker 1: " + "words " * 200)
        wait_until(lambda: len(long.audio()) > 0, 20, what="the first chunk")
        t0 = time.monotonic()
        long.cancel()
        with pytest.raises(m.PoolError) as e:
            long.result(timeout=10)
        assert e.value.kind == m.ErrorKind.CANCELLED
        assert time.monotonic() - t0 < 5
        assert len(submit(pool, text="Speaker 1: short").result(timeout=30)) > 0


def test_a_first_death_respawns_at_once_and_deaths_in_a_row_back_off(sim_pool):
    def kill_and_wait(pool):
        old = worker(pool, 0)["pid"]
        t_kill = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_until(
            lambda: (w := worker(pool, 0))["state"] == "ready" and w["pid"] not in (0, old),
            30,
            what="respawn",
        )
        events = [(t, what) for t, slot, what in pool.supervisor.events if slot == 0]
        dead = next(t for t, what in events if what == "dead" and t >= t_kill)
        start = next(t for t, what in events if what == "starting" and t >= dead)
        return start - dead  # how long the slot waited before its new worker started

    with sim_pool(gpus="cpu:1") as pool:
        assert kill_and_wait(pool) < 0.2  # the first death: no backoff
        assert kill_and_wait(pool) >= pool.supervisor.policy.backoff(1)  # again, too soon
        assert worker(pool, 0)["restarts"] == 2


def test_a_request_cancelled_while_its_worker_hangs_is_not_run_again(sim_pool):
    """A Cancel cannot reach a SIGSTOPped worker. Once that worker is killed as hung,
    the request ends cancelled: it is not sent back to the queue to run to its end on
    another worker (it was, holding a place for a client that had left)."""
    with sim_pool(gpus="cpu:2", sim_rtf=0.3, hang_timeout_s=1.5) as pool:
        h = submit(pool, text="Speaker 1: " + "words " * 200, seed=1)  # about 80 s
        victim = busy_worker(pool)
        wait_until(lambda: len(h.audio()) > 0, 20, what="the first chunk")
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            h.cancel()  # the client leaves: the Cancel waits in the stopped worker's pipe
            wait_until(lambda: not pid_alive(victim["pid"]), 15, what="the hung worker's end")
        finally:
            if pid_alive(victim["pid"]):
                os.kill(victim["pid"], signal.SIGCONT)
        with pytest.raises(m.PoolError) as e:
            h.result(timeout=10)
        assert e.value.kind == m.ErrorKind.CANCELLED
        assert pool.dispatcher.counters["requeued"] == 0
        assert pool.dispatcher.pending() == 0
        assert all(w["inflight"] == 0 for w in pool.status()["workers"])


def test_a_resumed_request_reports_all_of_its_audio(sim_pool):
    """The Done of a row that resumed on another worker counts the audio made before
    the death too: the OpenAI stream's usage.audio_seconds and the log read it (they
    gave only what the last worker made: 38.1 s of a 43.1 s answer)."""
    with sim_pool(gpus="cpu:2", sim_rtf=0.3) as pool:
        h = submit(pool, seed=7)
        victim = busy_worker(pool)
        wait_until(lambda: h.samples >= 2 * m.SAMPLE_RATE, 20, 0.01, "2 s of audio")
        os.kill(victim["pid"], signal.SIGKILL)
        audio = h.result(timeout=60)
        assert h.resumed == 1
        assert h.outcome.audio_s == pytest.approx(len(audio) / m.SAMPLE_RATE, abs=1e-3)


def test_a_frozen_worker_is_passed_over_while_it_waits_to_be_found_hung(sim_pool):
    """A worker stopped while idle kept looking ready until hang_timeout_s (30 s by
    default): a request sent meanwhile could go to it and wait there the whole
    time while the other worker sat idle. Its stale heartbeat now passes it over."""
    with sim_pool(gpus="cpu:2", hang_timeout_s=60.0) as pool:
        frozen = worker(pool, 0)
        os.kill(frozen["pid"], signal.SIGSTOP)
        try:
            stale = lambda: (worker(pool, 0)["heartbeat_age_s"] or 0) > 2.0  # noqa: E731
            wait_until(stale, 10, what="the frozen worker's heartbeat to age")
            for seed in range(4):  # ties between idle workers rotate: two went to worker 0
                h = submit(pool, text="Speaker 1: a short line", seed=seed)
                h.result(timeout=20)  # not 60 s, waiting for the hang rule
                assert h.worker == 1
        finally:
            os.kill(frozen["pid"], signal.SIGCONT)
