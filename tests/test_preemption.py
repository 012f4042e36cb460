"""Preemption: an interactive request that waits while every place is held by
batch rows (jobs) takes one's place; the batch row resumes later from its history.

The policy (workers/host/preemption.py) alone, StepHost with the simulator in
process, and the dispatcher's side (an interactive request sent over capacity
to a worker running a batch row; the preempted row back in the queue with its
history) through a sim pool of real worker processes.
"""

from __future__ import annotations

import numpy as np
from conftest import wait_until

from vibevoice_pool.script import parse_script
from workers.engines.contract import EngineSpec
from workers.engines.row import Row
from workers.engines.sim import SimEngine, tone
from workers.engines.trail import Trail
from workers.host import preemption
from workers.host.step_host import StepHost
from workers.wire.estimate import audio_seconds_for
from workers.wire.history import HistoryLog
from workers.wire.messages import Priority, Request, Turn

BATCH, INTERACTIVE = Priority.BATCH.value, Priority.INTERACTIVE.value


def req(rid: str, seconds: float, priority: str, **kw) -> Request:
    text = "x" * int(seconds * 15)  # workers.wire.estimate: 15 characters a second
    return Request(id=rid, turns=(Turn(0, text),), priority=priority, stream=True, **kw)


def row(rid: str, priority: str, steps: int, left: int, joined_at: int = 0) -> Row:
    r = Row(req(rid, 10, priority), budget_tokens=steps + left, max_steps=10_000, trail=Trail(0))
    r.steps = r.audio_tokens = steps
    r.joined_at = joined_at
    return r


def test_the_policy_takes_the_batch_row_with_most_left_that_has_moved_on():
    rows = [
        row("job-a", BATCH, 20, 5),
        row("job-b", BATCH, 20, 50),
        row("chat", INTERACTIVE, 20, 99),
    ]
    chosen = preemption.victim(req("new", 1, INTERACTIVE), rows)
    assert chosen.id == "job-b"  # the most audio left; never the interactive row
    assert preemption.victim(req("job-c", 1, BATCH), rows) is None  # batch never preempts
    rows[1].joined_at = 20 - preemption.MIN_PROGRESS_STEPS + 1  # it just resumed: not yet
    assert preemption.victim(req("new", 1, INTERACTIVE), rows).id == "job-a"
    rows[0].joined_at = 19
    assert preemption.victim(req("new", 1, INTERACTIVE), rows) is None


def test_a_long_rows_resumes_cost_linear_not_quadratic_under_steady_preemption():
    """A resume recomputes the row's whole history in one prefill. With 8 steps between
    preemptions, a job preempted as often as it may (chats arriving without pause) made
    prefills that grew with it: 10 min of audio (4,500 steps) prefilled 1.27 M tokens
    in 562 resumes, 281 per step made. A row now makes 1/RESUME_SHARE of its steps
    before it may be taken again: 141 k tokens in 124 resumes, under RESUME_SHARE per
    step made."""
    long = row("job-long", BATCH, 4500, 4500, joined_at=4500)
    long.steps = 4500 + 144
    assert not preemption.settled(long)  # 144 < 4644 // 32: not yet
    long.steps += 1
    assert preemption.settled(long)
    assert preemption.victim(req("chat", 1, INTERACTIVE), [long]) is long
    short = row("job-short", BATCH, 20, 100, joined_at=12)
    assert preemption.settled(short)  # a short row: the 8 steps still rule

    total = 4500
    steady = row("job", BATCH, 0, total)
    prefilled = 0
    while steady.steps < total:
        steady.steps += 1
        if preemption.victim(req("chat", 1, INTERACTIVE), [steady]) is steady:
            prefilled += steady.steps  # it resumes from its whole history
            steady.joined_at = steady.steps
    assert prefilled <= preemption.RESUME_SHARE * total
    assert prefilled < 40 * total  # the old rule: 281 a step


class Sink:
    def __init__(self):
        self.audio: dict[str, list] = {}
        self.logs: dict[str, HistoryLog] = {}
        self.ends: dict[str, str] = {}
        self.gave_up: list[tuple[str, int]] = []

    def chunk(self, rid, pcm, history=None):
        self.audio.setdefault(rid, []).append(pcm)
        if history is not None:
            assert self.logs.setdefault(rid, HistoryLog()).extend(history)

    def finish(self, rid, stop_reason="eos"):
        self.ends[rid] = stop_reason

    def fail(self, rid, error):
        self.ends[rid] = error.kind.value

    def preempted(self, rid, steps):
        self.gave_up.append((rid, steps))

    def step(self):
        pass

    def started(self, rid, at, from_samples=0):
        pass


def test_a_waiting_interactive_request_takes_a_job_rows_place_and_the_job_resumes():
    spec = EngineSpec(engine="sim", max_batch_size=2, sim_rtf=0.0, sim_chunk_s=0.5)
    eng = SimEngine(spec)
    eng.load()
    sink = Sink()
    h = StepHost(eng, sink, preempt=preemption.victim, give_back=True)
    jobs = [req("job-a", 12, BATCH, seed=1), req("job-b", 20, BATCH, seed=2)]
    for j in jobs:
        h.submit(j)
    for _ in range(preemption.MIN_PROGRESS_STEPS):
        h.run_step()
    h.submit(req("chat", 2, INTERACTIVE, seed=3))
    sched = h.run_step()
    assert sched.joined_ids == ["chat"]  # at once, at this boundary
    # the row with the most audio left, after the progress guard's steps
    assert sink.gave_up == [("job-b", preemption.MIN_PROGRESS_STEPS)]
    back = Request(**{**jobs[1].__dict__, "resume": sink.logs["job-b"].snapshot()})
    h.submit(back)
    while not h.idle:
        h.run_step()
    assert set(sink.ends) == {"job-a", "job-b", "chat"}
    got = np.concatenate(sink.audio["job-b"])
    assert np.array_equal(got, tone(2, 0, len(got)))  # nothing repeated, nothing missing
    assert len(got) == round(audio_seconds_for(back.text, back.max_audio_s) * 24_000)


def test_through_the_pool_a_chat_preempts_a_job_and_both_jobs_finish_whole(sim_pool):
    with sim_pool(gpus="cpu:1", max_batch_size=2, sim_rtf=0.4) as pool:  # 0.2 s a step
        text = "Speaker 1: " + "a long job of words to read " * 8
        jobs = [
            pool.submit(
                Request(
                    **{
                        **pool.make_request(parse_script(text), seed=s, stream=True).__dict__,
                        "priority": BATCH,
                    }
                )
            )
            for s in (11, 12)
        ]
        wait_until(lambda: all(j.samples >= 5 * 24_000 for j in jobs), 60, 0.01, "both jobs")
        chat = pool.submit(pool.make_request(parse_script("Speaker 1: Hi there."), seed=13))
        chat.result(timeout=30)
        assert not any(j.done for j in jobs)  # it did not wait for a job to end
        for j in jobs:
            got = j.result(timeout=120)
            assert np.array_equal(got, tone(j.seed, 0, len(got)))
            assert len(got) == round(j.request.est_audio_s * 24_000)
        c = pool.resumes()
        assert c["preempted"] == 1 and c["resumed"] == 1
        from prometheus_client import generate_latest

        from vibevoice_pool.api.metrics import Activity, registry_for

        text = generate_latest(registry_for(pool, Activity())).decode()
        assert "vibevoice_pool_preemptions_total 1.0" in text
        assert 'vibevoice_pool_resumes_total{outcome="resumed"} 1.0' in text


def test_removing_a_worker_moves_its_long_row_to_another_within_seconds(sim_pool):
    """Issue 23, acceptance 3 on the simulator: the removal completes within 5 s,
    whatever the row's length, and the row goes on elsewhere with nothing repeated
    or missing."""
    import time

    from conftest import pid_alive

    from workers.wire.board import Col

    with sim_pool(gpus="cpu:2", sim_rtf=0.4) as pool:  # 0.2 s a step of 0.5 s
        text = "Speaker 1: " + "a long row of words to read " * 12
        h = pool.submit(pool.make_request(parse_script(text), seed=17, stream=True))
        wait_until(lambda: h.samples >= 3 * 24_000, 30, 0.005, "3 s of audio")
        slot = h.worker
        pid = int(pool.board.get(slot, Col.PID))
        t0 = time.monotonic()
        pool.remove_worker(slot)
        wait_until(lambda: not pid_alive(pid), 5, 0.01, "the removed worker to exit")
        assert time.monotonic() - t0 < 5.0
        assert not h.done  # the row was far from its end: it moved, it did not finish
        got = h.result(timeout=60)
        assert h.worker != slot
        assert np.array_equal(got, tone(17, 0, len(got)))  # nothing repeated or missing
        assert len(got) == round(h.request.est_audio_s * 24_000)
        c = pool.dispatcher.counters
        assert c["moved"] == 1 and c["resumed"] == 1 and c["requeued"] == 0
        assert pool.resumes()["moved"] == 1
        assert pool.status()["rows"]["moved"] == 1  # GET /v1/pool shows it


def test_a_row_on_the_only_worker_moves_to_one_added_as_it_is_removed(sim_pool):
    """`scale --add cpu --remove 0` on a one-worker server: the new worker is still
    starting when worker 0 drains, so its long row cannot move then; it moves once the
    new worker is up, instead of holding worker 0 to its end (a 10-minute row: ten
    minutes), with nothing repeated or missing."""
    from conftest import pid_alive

    from workers.wire.board import Col

    with sim_pool(gpus="cpu:1", sim_rtf=0.4, sim_boot_s=1.0) as pool:  # 0.2 s a step of 0.5 s
        text = "Speaker 1: " + "a long row of words to read aloud for the listener " * 10
        h = pool.submit(pool.make_request(parse_script(text), seed=19, stream=True))
        wait_until(lambda: h.samples >= 2 * 24_000, 30, 0.005, "2 s of audio")
        pid = int(pool.board.get(0, Col.PID))
        new = pool.add_worker("cpu")
        pool.remove_worker(0)
        assert pool.resumes()["moved"] == 0  # nothing was up to take it yet
        wait_until(lambda: not pid_alive(pid), 60, 0.01, "the removed worker to exit")
        assert not h.done  # the row was far from its end: it moved, it did not finish
        got = h.result(timeout=60)
        assert h.worker == new
        assert np.array_equal(got, tone(19, 0, len(got)))  # nothing repeated or missing
        assert len(got) == round(h.request.est_audio_s * 24_000)
        assert pool.resumes()["moved"] == 1 and pool.dispatcher.counters["resumed"] == 1


def test_a_stream_whose_worker_died_resumes_on_its_respawn_not_behind_a_job(sim_pool):
    """A stream's worker is SIGKILLed while the other worker runs a job row. Sent again
    (attempt 2), the stream must run alone for its first steps; it went to the job's
    worker, which had a free place, and waited there for the job row to end (17 s in a
    sim run, 18 s when sent over capacity beside two job rows) though its own worker was
    back within a second. It now leaves the busy worker for the respawned one as soon as
    that is up, and ends long before the job, with nothing repeated or missing."""
    import os
    import signal
    from dataclasses import replace

    from workers.wire.board import Col

    with sim_pool(gpus="cpu:1", sim_rtf=0.4, max_batch_size=2) as pool:  # 0.2 s a step
        text = "Speaker 1: " + "a long row of words to read aloud for the listener " * 20
        job_req = pool.make_request(parse_script(text), seed=31, stream=True)
        job = pool.submit(replace(job_req, priority=BATCH))
        wait_until(lambda: job.samples >= 24_000, 30, 0.005, "the job's first second")
        new = pool.add_worker("cpu")
        wait_until(lambda: pool.ready_workers() == 2, 60, what="the added worker")
        chat_text = "Speaker 1: " + "a chat of some words " * 8
        chat = pool.submit(pool.make_request(parse_script(chat_text), seed=32, stream=True))
        wait_until(lambda: chat.samples >= 2 * 24_000, 30, 0.005, "2 s of the chat")
        assert chat.worker == new  # the idle one
        os.kill(int(pool.board.get(new, Col.PID)), signal.SIGKILL)
        got = chat.result(timeout=60)
        assert not job.done  # it did not wait for the job row to end
        assert chat.worker == new  # its worker, respawned
        assert np.array_equal(got, tone(32, 0, len(got)))  # nothing repeated or missing
        assert len(got) == round(chat.request.est_audio_s * 24_000)
        assert len(job.result(timeout=120)) == round(job.request.est_audio_s * 24_000)
        c = pool.dispatcher.counters
        assert c["resumed"] == 1 and c["requeued"] == 1


def test_a_removed_workers_row_moves_only_when_another_worker_has_a_place(sim_pool):
    """Removing a worker whose stream has nowhere to go (the other worker's one place
    holds another stream) moved it anyway, into the queue: its listener heard nothing
    until that other row ended (13 s in a sim run; a 10-minute row: ten minutes). It
    now goes on where it is, and moves as soon as a place frees elsewhere."""
    with sim_pool(gpus="cpu:2", sim_rtf=0.4, max_batch_size=1) as pool:  # 0.2 s a step
        long = "Speaker 1: " + "a long row of words to read aloud for the listener " * 12
        short = "Speaker 1: " + "a shorter row of words to read " * 6
        h = pool.submit(pool.make_request(parse_script(long), seed=41, stream=True))
        wait_until(lambda: h.samples > 0, 30, 0.005, "the long row's first audio")
        other = pool.submit(pool.make_request(parse_script(short), seed=42, stream=True))
        wait_until(lambda: other.samples >= 24_000, 30, 0.005, "the short row's first second")
        slot = h.worker
        assert other.worker != slot and not other.done
        pool.remove_worker(slot)
        at = h.samples
        wait_until(lambda: h.samples >= at + 2 * 24_000, 30, 0.005, "2 s more of the long row")
        assert not other.done  # no place anywhere: it went on where it is meanwhile
        assert h.worker == slot and pool.resumes()["moved"] == 0
        other.result(timeout=60)
        assert not h.done  # far from its end when the place freed
        got = h.result(timeout=60)
        assert h.worker == other.worker  # it moved into the place that freed
        assert np.array_equal(got, tone(41, 0, len(got)))  # nothing repeated or missing
        assert len(got) == round(h.request.est_audio_s * 24_000)
        assert pool.resumes()["moved"] == 1
