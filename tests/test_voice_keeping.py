"""Voice keeping: the parent's VoiceSender and the worker's VoiceCache agree."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest

from vibevoice_pool.pool.voice_sender import VoiceSender
from workers.host.voice_cache import VoiceCache
from workers.wire import messages as m


def frozen(value: float, n: int = 4000) -> np.ndarray:
    a = np.full(n, value, dtype=np.float32)
    a.setflags(write=False)
    return a


def request(*voices) -> m.Synthesize:
    return m.Synthesize(m.Request(id="r", turns=(m.Turn(0, "hi"),), voices=tuple(voices)))


def through(sender_log: list, cache: VoiceCache) -> m.Request:
    return cache.resolve(sender_log[-1].request)


def test_a_preset_crosses_once_then_goes_by_reference():
    log, cache = [], VoiceCache()
    send = VoiceSender(log.append)
    alice, upload = frozen(0.1), np.full(4000, 0.2, dtype=np.float32)  # writable: an upload
    send(request(alice, upload, None))
    first = log[-1].request.voices
    assert isinstance(first[0], m.KeptVoice) and first[1] is upload and first[2] is None
    got = through(log, cache).voices
    assert got[0] is alice and got[1] is upload and got[2] is None
    send(request(alice))
    assert isinstance(log[-1].request.voices[0], m.VoiceRef)
    assert through(log, cache).voices[0] is alice


def test_many_voices_in_random_order_always_resolve_to_their_own_samples():
    """More voices than either end keeps, and arrays dropped and made again (whose
    id() may be reused): every request still gets exactly its own samples."""
    rnd = random.Random(4)
    log, cache = [], VoiceCache()
    send = VoiceSender(log.append)
    voices = [frozen(i) for i in range(m.KEPT_VOICES * 2)]
    refs = 0
    for step in range(600):
        if step % 50 == 49:  # a preset file changed: its old array goes, a new one comes
            i = rnd.randrange(len(voices))
            voices[i] = None
            gc.collect()
            voices[i] = frozen(1000 + step)
        chosen = rnd.sample(voices[: m.KEPT_VOICES + 4], 2)
        send(request(*chosen))
        refs += sum(isinstance(v, m.VoiceRef) for v in log[-1].request.voices)
        got = through(log, cache).voices
        for want, have in zip(chosen, got, strict=True):
            assert have[0] == want[0] and have is want
        assert len(cache) <= m.KEPT_VOICES
    assert refs > 300  # most requests named a kept voice instead of sending it


def test_a_reference_the_worker_never_kept_is_a_typed_error():
    cache = VoiceCache()
    with pytest.raises(m.PoolError) as e:
        cache.resolve(request(m.VoiceRef(3)).request)
    assert e.value.kind == m.ErrorKind.ENGINE_ERROR and "never kept" in e.value.message


def test_other_messages_pass_through_untouched():
    log = []
    send = VoiceSender(log.append)
    cancel = m.Cancel("r")
    send(cancel)
    plain = request(None)
    send(plain)
    assert log == [cancel, plain] and log[1] is plain
