"""Long rows that survive, through real worker processes running the tiny model:
- a long streamed row whose worker is SIGKILLed at 80% of its audio resumes on
  the other worker from its history: a short stall, nothing repeated or missing,
  the audio after the splice equal to the uninterrupted row's (issue 23,
  acceptance 1);
- an interactive request that finds both places of the one worker held by job
  rows takes one's place at once, and the job resumes (acceptance 2).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import wait_until

from vibevoice_pool.config import build
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.script import parse_script
from workers.wire import messages as m
from workers.wire.board import Col

pytestmark = pytest.mark.slow

TEXT = "Speaker 1: " + "a long read of many words for the listener " * 12  # ~50 s
SEED = 7
# Issue 23 asks for a stall of at most 3 s after the kill (bench/resume measures it:
# 0.31 s, against 6.11 s for a replay from the start). Here the bound is relative, as a
# busy machine slows a resume and a replay alike: a replay makes the cut's audio again,
# as long as the row took to reach the cut; a resume takes a fraction of that.
STALL_SHARE = 1 / 3
SPLICE_TOL = 2e-2  # of the uninterrupted row's peak, over the 5 s after the splice


@pytest.fixture(scope="module")
def pool(tiny_model_dir, tmp_path_factory):
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": tiny_model_dir,
            "gpus": "cpu:2",
            "max_batch_size": 2,
            "cache_dir": str(tmp_path_factory.mktemp("cache")),
        }
    )
    pool = Pool.start(cfg, model_path=tiny_model_dir)
    wait_until(lambda: pool.ready_workers() == 2, 180, what="two tiny workers")
    yield pool
    pool.shutdown(grace_s=0)


@pytest.fixture(scope="module")
def uninterrupted(pool) -> np.ndarray:
    """TEXT with seed 7, run to its end without a fault: what each test's cut row must
    give (made once: it is the same row for both)."""
    req = pool.make_request(parse_script(TEXT), seed=SEED, stream=True)
    assert 40 <= req.est_audio_s <= 70
    return pool.submit(req).result(timeout=300)


class Arrivals:
    """When each chunk of a handle reached the parent, and its samples."""

    def __init__(self, handle):
        self.lock = threading.Lock()
        self.times: list[tuple[float, int]] = []
        push = handle.push

        def timed(event):
            if isinstance(event, m.Chunk):
                with self.lock:
                    self.times.append((time.monotonic(), len(event.pcm)))
            push(event)

        handle.push = timed

    def samples(self) -> int:
        with self.lock:
            return sum(n for _, n in self.times)

    def after(self, t0: float) -> list[float]:
        with self.lock:
            return [t for t, _ in self.times if t >= t0]

    def longest_gap_after(self, t0: float) -> float:
        stamps = [t0, *self.after(t0)]
        return max(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def test_a_killed_workers_long_row_resumes_elsewhere_within_seconds(pool, uninterrupted):
    want = uninterrupted
    submitted_at = time.monotonic()
    again = pool.submit(pool.make_request(parse_script(TEXT), seed=SEED, stream=True))
    arrivals = Arrivals(again)
    wait_until(
        lambda: arrivals.samples() >= 0.8 * len(want), 300, interval=0.002, what="80% of the row"
    )
    slot = again.worker
    pid = int(pool.board.get(slot, Col.PID))
    cut = arrivals.samples()
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    got = again.result(timeout=300)

    stall = arrivals.longest_gap_after(killed_at)
    reached = killed_at - submitted_at  # what a replay would spend again
    assert stall < STALL_SHARE * reached, (
        f"the stream stalled {stall:.2f} s after the kill; the row took {reached:.2f} s "
        "to reach the cut"
    )
    assert len(got) == len(want)  # nothing repeated, nothing missing
    assert np.array_equal(got[:cut], want[:cut])
    splice = slice(cut, cut + 5 * m.SAMPLE_RATE)
    err = np.abs(got[splice] - want[splice]).max() / np.abs(want).max()
    assert err < SPLICE_TOL
    counters = pool.dispatcher.counters
    assert counters["resumed"] == 1 and counters["resume_refused"] == 0
    assert again.worker != slot or pool.ready_workers() == 2
    wait_until(lambda: pool.ready_workers() == 2, 120, what="the respawned worker")


@pytest.fixture(scope="module")
def one_worker(tiny_model_dir, tmp_path_factory):
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": tiny_model_dir,
            "gpus": "cpu:1",
            "max_batch_size": 2,
            "cache_dir": str(tmp_path_factory.mktemp("cache1")),
        }
    )
    pool = Pool.start(cfg, model_path=tiny_model_dir)
    wait_until(lambda: pool.ready_workers() == 1, 180, what="one tiny worker")
    yield pool
    pool.shutdown(grace_s=0)


def test_an_interactive_request_preempts_a_job_row_and_both_jobs_finish_whole(one_worker):
    """Issue 23, acceptance 2: one worker with room for 2 rows, both held by long jobs;
    an interactive request gets its first audio within 2.5 s (10.0 s before, the time
    for a job row to end), and both jobs finish once, as long as uninterrupted runs
    and within 2e-2 of their peak."""
    from dataclasses import replace

    pool = one_worker
    text = "Speaker 1: " + "a job of many words to read aloud " * 6  # ~25 s each

    def jobs():
        reqs = [pool.make_request(parse_script(text), seed=s, stream=True) for s in (21, 22)]
        return [pool.submit(replace(r, priority=m.Priority.BATCH.value)) for r in reqs]

    want = [h.result(timeout=300) for h in jobs()]
    held = jobs()
    wait_until(lambda: all(h.samples >= 5 * m.SAMPLE_RATE for h in held), 120, 0.005, "jobs")
    chat = pool.submit(pool.make_request(parse_script("Speaker 1: Hello there."), stream=True))
    first = Arrivals(chat)
    asked = time.monotonic()
    wait_until(lambda: first.samples() > 0, 30, 0.002, "the chat's first audio")
    waited = first.after(asked)[0] - asked
    assert waited < 2.5, f"the interactive request waited {waited:.2f} s"
    assert not any(h.done for h in held)
    chat.result(timeout=60)
    for h, w in zip(held, want, strict=True):
        got = h.result(timeout=300)
        assert len(got) == len(w)
        assert np.abs(got - w).max() / np.abs(w).max() < SPLICE_TOL
        assert isinstance(h.outcome, m.Done)
    counters = pool.dispatcher.counters
    assert counters["preempted"] == 1 and counters["resumed"] == 1


def test_removing_the_worker_of_a_long_row_moves_it_within_seconds(pool, uninterrupted):
    """Issue 23, acceptance 3: removing a worker that holds a long row completes within
    5 s, and the row goes on on the other worker, nothing repeated or missing. (Last in
    this module: it takes a worker of the shared pool away.)"""
    from conftest import pid_alive

    want = uninterrupted
    h = pool.submit(pool.make_request(parse_script(TEXT), seed=SEED, stream=True))
    arrivals = Arrivals(h)
    wait_until(lambda: arrivals.samples() >= 0.3 * len(want), 300, 0.002, "30% of the row")
    slot = h.worker
    pid = int(pool.board.get(slot, Col.PID))
    t0 = time.monotonic()
    pool.remove_worker(slot)
    wait_until(lambda: not pid_alive(pid), 5, 0.01, "the removed worker to exit")
    removal_s = time.monotonic() - t0
    got = h.result(timeout=300)
    assert removal_s < 5.0
    assert h.worker != slot
    assert len(got) == len(want)
    assert np.abs(got - want).max() / np.abs(want).max() < SPLICE_TOL
    assert pool.resumes()["moved"] == 1
