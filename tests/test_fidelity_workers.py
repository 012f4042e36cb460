"""A row's audio is its own, through real worker processes: the same request and seed
give the same audio alone, batched beside a longer request, and replayed after its
worker was SIGKILLed mid-generation. The checkpoint's tokenizer is saved padding on
the right, which the engine must not follow (microsoft always pads left)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import wait_until
from test_fidelity import V0, V1, right_padded_copy

from vibevoice_pool.config import build
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.script import parse_script
from workers.wire import messages as m

pytestmark = pytest.mark.slow

MINE = (
    "Speaker 1: This is the request we follow, long enough to be stopped in the middle "
    "of its speech by a killed worker, then replayed."
)
LONGER = "Speaker 1: " + "A longer neighbour that shares the batch and pads it. " * 4


@pytest.fixture(scope="module")
def pool(tiny_model_dir, tmp_path_factory):
    path = right_padded_copy(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "right")
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": path,
            "gpus": "cpu:1",
            "max_batch_size": 2,
            "cache_dir": str(tmp_path_factory.mktemp("cache")),
        }
    )
    p = Pool.start(cfg, model_path=path)
    wait_until(lambda: p.ready_workers() == 1, 120, what="the worker")
    yield p
    p.shutdown(grace_s=0)


def submit(pool, text, seed, stream=False):
    """Each script brings its own voice sample: its latent noise must be the row's own."""
    voice = V1 if text == MINE else V0
    request = pool.make_request(parse_script(text), (voice,), seed=seed, stream=stream)
    return pool.submit(request)


def started_at(handle) -> float:
    """The worker's time of the step boundary the row joined at (rows admitted
    together share it)."""
    return max(e.at for e in list(handle._events) if isinstance(e, m.Started))


def close(a, b) -> None:
    assert len(a) == len(b) > 0
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()


def test_same_seed_same_audio_alone_batched_and_replayed_after_a_sigkill(pool):
    alone = submit(pool, MINE, seed=21)
    reference = alone.result(timeout=180)

    # Batched: both queue while the worker takes no work, then leave together.
    pool.dispatcher.drain(0)
    try:
        longer, mine = submit(pool, LONGER, seed=5), submit(pool, MINE, seed=21)
    finally:
        pool.dispatcher.undrain(0)
    batched = mine.result(timeout=180)
    assert len(longer.result(timeout=180)) > len(batched)
    assert started_at(mine) == started_at(longer)  # they joined the running set together
    close(reference, batched)

    # Replayed: SIGKILL the worker once the row has sent audio; the pool runs it again
    # on the new worker with the same seed and skips what was sent.
    wait_until(lambda: pool.ready_workers() == 1, 120, what="the worker")
    victim = pool.status()["workers"][0]["pid"]
    streamed = submit(pool, MINE, seed=21, stream=True)
    wait_until(lambda: len(streamed._chunks) >= 2, 120, interval=0.002, what="first audio")
    sent_before = len(streamed.audio())
    os.kill(victim, signal.SIGKILL)
    replayed = streamed.result(timeout=240)
    assert pool.status()["workers"][0]["pid"] != victim
    assert 0 < sent_before < len(replayed)  # killed mid-speech, then finished
    assert isinstance(streamed.outcome, m.Done)
    close(reference, replayed)
