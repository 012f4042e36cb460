"""Continuous batching through real worker processes (the tiny model, one CPU worker).

Every row's audio is compared with transformers' `generate` for that row alone
(tests/vibevoice_reference.py). Chunks are streamed one per decode step, so the
long row's chunk count is the worker's step clock.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
from conftest import wait_until
from vibevoice_reference import Reference

from vibevoice_pool.config import build
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.script import parse_script
from workers.wire import messages as m
from workers.wire.board import Col
from workers.wire.estimate import audio_seconds_for

pytestmark = pytest.mark.slow

HOP = 3200
TOL = 1e-4


@pytest.fixture(scope="module")
def pool(tiny_model_dir, tmp_path_factory):
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": tiny_model_dir,
            "gpus": "cpu:1",
            "max_batch_size": 4,
            "cache_dir": str(tmp_path_factory.mktemp("cache")),
        }
    )
    pool = Pool.start(cfg, model_path=tiny_model_dir)
    wait_until(lambda: pool.ready_workers() == 1, 120, what="the tiny worker")
    yield pool
    pool.shutdown(grace_s=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


class Clock:
    """Counts the chunks of every watched request as they reach the parent."""

    def __init__(self):
        self.lock = threading.Lock()
        self.chunks: dict[str, int] = {}
        self.at_first: dict[str, dict[str, int]] = {}  # id -> the counts at its first chunk

    def watch(self, handle):
        push = handle.push

        def counted(event):
            if isinstance(event, m.Chunk):
                with self.lock:
                    if handle.id not in self.chunks:
                        self.at_first[handle.id] = dict(self.chunks)
                    self.chunks[handle.id] = self.chunks.get(handle.id, 0) + 1
            push(event)

        handle.push = counted
        return handle

    def count(self, rid: str) -> int:
        with self.lock:
            return self.chunks.get(rid, 0)


def submit(pool, clock, text, seed, **kw):
    return clock.watch(pool.submit(pool.make_request(parse_script(text), seed=seed, **kw)))


def assert_alone(reference, handle):
    got = handle.result(timeout=180)
    req = handle.request
    expected = max(1, int(req.est_audio_s * m.SAMPLE_RATE // HOP))
    assert len(got) == expected * HOP  # complete, nothing repeated
    want = reference.audio(req, expected)
    assert np.abs(got - want).max() < TOL * np.abs(want).max(), f"{handle.id} differs"


def test_rows_join_a_running_batch_and_each_sounds_as_alone(pool, reference):
    clock = Clock()
    long = submit(pool, clock, "Speaker 1: " + "many words here " * 7, 61, stream=True)
    wait_until(lambda: clock.count(long.id) >= 3, 120, interval=0.005, what="3 steps")
    sent_short = clock.count(long.id)
    short = submit(pool, clock, "Speaker 1: Quick one.", 62, stream=True)
    wait_until(lambda: clock.count(long.id) >= 10, 120, interval=0.005, what="10 steps")
    sent_late = clock.count(long.id)
    late = submit(pool, clock, "Speaker 1: A later line.", 63, stream=True, cfg_scale=2.0)
    short.result(timeout=120)
    # the short request finishes while the long one still streams
    assert not long.done
    # each newcomer's first audio within two decode steps of arriving
    assert clock.at_first[short.id][long.id] - sent_short <= 2
    wait_until(lambda: clock.count(late.id), 60, interval=0.005, what="the late row's audio")
    assert clock.at_first[late.id][long.id] - sent_late <= 2
    for h in (long, short, late):
        assert_alone(reference, h)
    assert pool.board.get(0, Col.BATCH_ROWS) == 0


def test_a_cancelled_row_frees_its_place_while_the_others_go_on(pool, reference):
    clock = Clock()
    keep = submit(pool, clock, "Speaker 1: " + "words to keep " * 5, 71, stream=True)
    drop = submit(pool, clock, "Speaker 1: " + "words to drop " * 20, 72, stream=True)
    wait_until(lambda: clock.count(drop.id) >= 2, 120, interval=0.005, what="2 steps")
    drop.cancel()
    with pytest.raises(m.PoolError) as err:
        drop.result(timeout=30)
    assert err.value.kind is m.ErrorKind.CANCELLED
    wait_until(lambda: pool.board.get(0, Col.BATCH_ROWS) <= 1, 10, what="the freed row")
    assert not keep.done
    assert_alone(reference, keep)


def test_sigkill_mid_batch_replays_every_row_without_repeated_audio(pool, reference):
    clock = Clock()
    lines = ["first row of words " * 4, "the second one " * 5, "third and last " * 3]
    handles = [
        submit(pool, clock, f"Speaker 1: {text}", 80 + i, stream=True)
        for i, text in enumerate(lines)
    ]
    wait_until(
        lambda: all(clock.count(h.id) >= 2 for h in handles), 120, interval=0.005, what="audio"
    )
    pid = int(pool.board.get(0, Col.PID))
    assert pool.board.get(0, Col.BATCH_ROWS) == 3
    os.kill(pid, signal.SIGKILL)
    for h in handles:
        assert_alone(reference, h)  # the audio heard before the kill is not heard again
    assert pool.dispatcher.counters["requeued"] >= 3
    wait_until(lambda: pool.ready_workers() == 1, 60, what="the respawned worker")


def test_with_a_small_memory_budget_a_row_waits_for_one_to_leave(tiny_model_dir, tmp_path):
    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice.engine import VibeVoiceEngine
    from workers.engines.vibevoice.row_memory import MIB

    first_text, second_text = "Speaker 1: " + "first words " * 6, "Speaker 1: second"
    local = VibeVoiceEngine(EngineSpec(engine="vibevoice", model_path=tiny_model_dir))
    local.load()

    def need(text: str) -> int:  # the predicted peak of the row alone, as the worker sees it
        turns = tuple(parse_script(text))
        est = audio_seconds_for("\n".join(t.text for t in turns), 600.0)
        row = local.prepare(m.Request(id="probe", turns=turns, est_audio_s=est))
        return local.steps.peak_bytes([local.steps._shape(row)])

    need = [need(first_text), need(second_text)]
    budget_mb = (max(need) + min(need) // 2) / MIB  # either alone fits, not both
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": tiny_model_dir,
            "gpus": "cpu:1",
            "max_batch_size": 4,
            "mem_budget_mb": budget_mb,
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    small_pool = Pool.start(cfg, model_path=tiny_model_dir)
    try:
        wait_until(lambda: small_pool.ready_workers() == 1, 120, what="the tiny worker")
        clock = Clock()
        first = submit(small_pool, clock, first_text, 91, stream=True)
        second = submit(small_pool, clock, second_text, 92, stream=True)
        first.result(timeout=120)
        assert clock.count(second.id) == 0  # it waited: no audio while the first ran
        second.result(timeout=120)  # then admitted; nothing ran out of memory
        assert first.outcome.audio_s > 0 and second.outcome.audio_s > 0
    finally:
        small_pool.shutdown(grace_s=0)
