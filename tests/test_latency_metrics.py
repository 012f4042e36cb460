"""What an operator sets an objective on, in /metrics: how long a request waited for a
worker, how long until its first audio, and how fast its audio came, on real sim
workers (a request held behind a busy worker, a streamed one, one sent back after
its worker was SIGKILLed)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
from conftest import wait_until
from fastapi.testclient import TestClient
from test_metrics import scrape, value

from vibevoice_pool.api.app import create_app
from vibevoice_pool.api.speech import Front
from vibevoice_pool.script import parse_script
from vibevoice_pool.voices.library import VoiceLibrary, ensure_demo_voices
from workers.wire import messages as m
from workers.wire.board import Col

QUEUE = "vibevoice_pool_request_queue_seconds"
FIRST = "vibevoice_pool_time_to_first_audio_seconds"
SPEED = "vibevoice_pool_request_speed_ratio"
DURATION = "vibevoice_pool_request_duration_seconds"


@pytest.fixture
def served(sim_pool, tmp_path):
    """`served(**settings)`: (the pool, a client of its API app)."""
    ensure_demo_voices(tmp_path / "voices")

    def make(**settings):
        return _Served(sim_pool, tmp_path, settings)

    return make


class _Served:
    def __init__(self, sim_pool, tmp_path, settings):
        self.running = sim_pool(**settings)
        self.tmp_path = tmp_path

    def __enter__(self):
        pool = self.running.__enter__()
        voices = VoiceLibrary(self.tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        self.client = TestClient(create_app(Front(pool, voices, pool.cfg))).__enter__()
        return pool, self.client

    def __exit__(self, *exc):
        self.client.__exit__(*exc)
        return self.running.__exit__(*exc)


def histogram(metrics, name: str, **labels) -> tuple[float, float, dict[float, float]]:
    """(count, sum, cumulative count at each bucket's upper bound) of one family."""
    samples = metrics[name]
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == name + "_bucket" and labels.items() <= s.labels.items():
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    count = value(samples, name + "_count", **labels)
    return count, value(samples, name + "_sum", **labels), buckets


def below(buckets: dict[float, float], seconds: float) -> float:
    """Observations at or under the largest bucket bound not above `seconds`."""
    return max((n for le, n in buckets.items() if le <= seconds), default=0.0)


def test_a_request_held_behind_a_busy_worker_shows_its_wait_and_its_first_audio(served, caplog):
    """One worker that runs one row at a time: a long streamed request, then a second
    that waits in the queue until the first is done. Its wait is at least that hold,
    the first's is under it; each request's first audio is observed once, after its
    wait and not after its end; a job's rows count under priority="batch". The done
    line of each says its wait, its first audio and its whole time, as words and as
    the JSON lines' fields."""
    caplog.set_level("INFO", logger="vibevoice_pool")
    with served(gpus="cpu:1", sim_rtf=0.1, max_batch_size=1) as (pool, client):
        long = pool.make_request(parse_script("Speaker 1: " + "words " * 40), seed=1, stream=True)
        held = pool.submit(long)
        wait_until(lambda: held.samples > 0, 30, 0.01, "the first request's audio")
        waiting = pool.submit(pool.make_request(parse_script("Speaker 1: a short one"), seed=2))
        assert pool.queue_length() == 1  # it waits for the only place
        held.result(timeout=60)
        waiting.result(timeout=60)
        hold = held.finished_at - waiting.submitted_at  # the busy worker held it so long
        assert waiting.queue_s() >= hold > 0

        job = pool.make_request(parse_script("Speaker 1: a job's row"), seed=3)
        pool.submit(replace(job, priority=m.Priority.BATCH.value)).result(timeout=60)

        metrics = scrape(client)
        count, total, buckets = histogram(metrics, QUEUE, priority="interactive")
        assert count == 2  # one each, as sent
        assert total >= hold
        assert below(buckets, hold) <= 1  # the held one is above the hold: only the first under
        assert buckets[float("inf")] == 2
        assert histogram(metrics, QUEUE, priority="batch")[0] == 1

        count, first_total, _ = histogram(metrics, FIRST, priority="interactive")
        assert count == 2
        assert total <= first_total  # each first audio comes after its start
        job_count, job_first, _ = histogram(metrics, FIRST, priority="batch")
        assert job_count == 1
        durations = value(metrics[DURATION], DURATION + "_sum")
        assert first_total + job_first <= durations  # and before its end
        for h in (held, waiting):
            assert h.queue_s() <= h.first_audio_s() <= h.finished_at - h.submitted_at

        count, speeds, _ = histogram(metrics, SPEED, priority="interactive")
        assert count == 2
        expected = sum(h.outcome.audio_s / (h.finished_at - h.started_at) for h in (held, waiting))
        assert speeds == pytest.approx(expected, rel=1e-6)
        assert value(metrics["vibevoice_pool_requests"], "vibevoice_pool_requests_total") == 3

    for h in (held, waiting):
        done = [r for r in caplog.records if r.getMessage().startswith(f"request {h.id} done")]
        assert len(done) == 1, done
        r = done[0]
        assert (r.queue_s, r.first_audio_s) == (round(h.queue_s(), 3), round(h.first_audio_s(), 3))
        assert r.total_s == round(h.finished_at - h.submitted_at, 3)
        assert r.audio_s == round(h.outcome.audio_s, 3) > 0
        words = f"waited {h.queue_s():.2f} s, first audio after {h.first_audio_s():.2f} s"
        assert words in r.getMessage()
    assert done[0].queue_s >= round(hold, 3)  # (the last: the waiting one's) its whole wait


def test_a_request_that_ends_in_the_queue_counts_its_wait_and_no_first_audio(served, caplog):
    """A request cancelled while it waits for the only place: its wait (admission to
    its end) is counted, under the queue's histogram, and it has no first audio; its
    failed line says so."""
    caplog.set_level("INFO", logger="vibevoice_pool")
    with served(gpus="cpu:1", sim_rtf=0.1, max_batch_size=1) as (pool, client):
        busy = pool.submit(pool.make_request(parse_script("Speaker 1: " + "words " * 30), seed=1))
        wait_until(lambda: busy.samples > 0, 30, 0.01, "the busy worker's audio")
        queued = pool.submit(pool.make_request(parse_script("Speaker 1: never run"), seed=2))
        queued.cancel()
        with pytest.raises(m.PoolError):
            queued.result(timeout=10)
        assert queued.started_at is None and queued.first_audio_at is None
        busy.result(timeout=60)
        metrics = scrape(client)
        count, total, _ = histogram(metrics, QUEUE, priority="interactive")
        assert count == 2
        assert total == pytest.approx(busy.queue_s() + queued.queue_s(), abs=1e-6)
        assert histogram(metrics, FIRST, priority="interactive")[0] == 1
        assert histogram(metrics, SPEED, priority="interactive")[0] == 1  # completed only
    said = [r for r in caplog.records if r.getMessage().startswith(f"request {queued.id} failed")]
    assert len(said) == 1 and f"waited in the queue {queued.queue_s():.2f} s, no audio" in (
        said[0].getMessage()
    )
    assert said[0].queue_s == said[0].total_s and not hasattr(said[0], "first_audio_s")


def test_a_request_sent_back_after_a_sigkill_is_counted_once(served):
    """A streamed row whose worker is SIGKILLed mid-row goes back to the queue and ends
    on the other worker: it is one wait (its first, before the kill), one first audio
    (before the kill), one speed and one duration, as one request was sent."""
    with served(gpus="cpu:2", sim_rtf=0.2) as (pool, client):
        text = "Speaker 1: " + "a line of words " * 12
        h = pool.submit(pool.make_request(parse_script(text), seed=5, stream=True))
        wait_until(lambda: h.samples >= 3 * 24_000, 30, 0.005, "3 s of audio")
        killed_at = time.monotonic()  # the pool's clock
        os.kill(int(pool.board.get(h.worker, Col.PID)), signal.SIGKILL)
        h.result(timeout=60)
        metrics = scrape(client)
        requeued = value(metrics["vibevoice_pool_requeued"], "vibevoice_pool_requeued_total")
        assert requeued == 1  # it was sent back, and began again
        count, waited, _ = histogram(metrics, QUEUE, priority="interactive")
        assert count == 1
        assert waited == pytest.approx(h.queue_s()) and waited < killed_at - h.submitted_at
        count, first, _ = histogram(metrics, FIRST, priority="interactive")
        assert count == 1 and waited <= first < killed_at - h.submitted_at
        assert histogram(metrics, SPEED, priority="interactive")[0] == 1
        assert value(metrics[DURATION], DURATION + "_count") == 1
