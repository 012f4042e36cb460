"""An answer sent whole keeps its audio in memory up to a minute, past that in a
temporary file (api/whole.py), and is the same answer, byte for byte."""

from __future__ import annotations

import errno
import io

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from vibevoice_pool.api import whole
from vibevoice_pool.api.app import create_app
from vibevoice_pool.api.speech import Front
from vibevoice_pool.voices.library import VoiceLibrary, ensure_demo_voices

TEXT = "a story told whole, in one answer. " * 8  # about 20 s of audio from the sim
SPILL = 24_000  # a second of audio in memory, in these tests


def chunks(n: int, size: int = 480) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.uniform(-0.5, 0.5, size).astype(np.float32) for _ in range(n)]


def test_past_its_limit_the_audio_goes_to_a_file_and_comes_back_whole():
    kept, parts = whole.AnswerAudio(spill=1000), chunks(20)
    for pcm in parts:
        kept.add(pcm)
    assert kept.spilled and kept.peak <= 1000 + 480
    assert kept.made - kept.on_disk <= 1000  # what memory holds now
    assert np.array_equal(kept.whole(), np.concatenate(parts))
    kept.close()


def test_a_temporary_folder_without_room_keeps_the_audio_in_memory(monkeypatch):
    class Full(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 4000:  # room for a little, then none
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(whole.tempfile, "TemporaryFile", lambda **kw: Full())
    kept, parts = whole.AnswerAudio(spill=500), chunks(12)
    for pcm in parts:
        kept.add(pcm)
    assert np.array_equal(kept.whole(), np.concatenate(parts))  # nothing lost
    assert kept.on_disk * 4 <= 4000


@pytest.fixture
def app_of(sim_pool, tmp_path):
    ensure_demo_voices(tmp_path / "voices")

    def make(pool):
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        return create_app(Front(pool, voices, pool.cfg))

    return make


ASKS = [
    ("/v1/synthesize", {"script": "Speaker 1: " + TEXT, "format": "wav", "seed": 3}),
    ("/v1/synthesize", {"script": "Speaker 1: " + TEXT, "format": "flac", "seed": 3}),
    ("/v1/synthesize", {"script": "Speaker 1: " + TEXT, "format": "mp3", "seed": 3}),
    (
        "/v1/audio/speech",
        {"input": TEXT, "voice": "alloy", "response_format": "pcm", "stream": False},
    ),
    ("/v1/audio/speech", {"input": TEXT, "voice": "alloy", "stream": False, "speed": 1.5}),
    ("/v1/audio/speech", {"input": TEXT, "voice": "alloy", "response_format": "flac"}),
    (
        "/v1/audio/speech",
        {"input": TEXT, "voice": "alloy", "response_format": "flac", "stream_format": "sse"},
    ),
]


def test_a_long_whole_answer_is_held_on_disk_and_is_the_same_answer(sim_pool, app_of, monkeypatch):
    """A whole answer kept every chunk in its request's handle until it ended, then
    joined, stretched and encoded them: 96 KB a second of audio, 518 MB for 90 minutes,
    about three times that at its peak. Now the handle lets each chunk go as it is read,
    memory holds at most a minute (here a second) and the rest waits in a temporary
    file; the answer is the one the server always sent."""
    kept: list[whole.AnswerAudio] = []

    class Recorded(whole.AnswerAudio):
        def __init__(self, spill=None):
            super().__init__(spill)
            kept.append(self)

    with sim_pool(gpus="cpu:1", sim_rtf=0.005) as pool:
        handles = []
        pool.subscribe(lambda e: e.kind == "dispatched" and handles.append(e.handle))
        with TestClient(app_of(pool)) as client:
            for path, body in ASKS:
                body = {**body, "model": "tts-1", "seed": 3} if "input" in body else body
                monkeypatch.setattr(whole, "AnswerAudio", Recorded)
                monkeypatch.setattr(whole, "SPILL_SAMPLES", SPILL)
                spilled = client.post(path, json=body)
                assert spilled.status_code == 200, spilled.text
                handle = handles[-1]
                assert handle.done and len(handle.audio()) == 0  # it let each chunk go
                first = kept[0]
                assert first.spilled and first.peak <= SPILL + 24_000, (path, body)
                kept.clear()
                monkeypatch.setattr(whole, "SPILL_SAMPLES", 1 << 40)  # all in memory
                held = client.post(path, json=body)
                assert held.status_code == 200 and not kept[0].spilled
                kept.clear()
                assert spilled.headers["content-type"] == held.headers["content-type"]
                assert spilled.headers.get("x-audio-seconds") == held.headers.get("x-audio-seconds")
                assert spilled.content == held.content, (path, body)
                if body.get("format") in ("wav", "flac"):
                    pcm, rate = sf.read(io.BytesIO(spilled.content))
                    assert rate == 24_000 and len(pcm) > 10 * 24_000
