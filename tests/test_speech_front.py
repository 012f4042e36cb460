"""Front.build_request (api/speech.py), the one place every front end turns a body
into a pool Request: which voice each speaker gets."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from vibevoice_pool.api.speech import Front, SynthesizeBody
from vibevoice_pool.config import PoolConfig
from vibevoice_pool.voices.library import VoiceLibrary, VoiceNotFound
from workers.wire.messages import SAMPLE_RATE, PoolError


def wav(freq: float, seconds: float = 0.5) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    sf.write(
        buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SAMPLE_RATE, format="WAV"
    )
    return buf.getvalue()


class Pool:
    """Only what build_request asks of the pool: the voices it was handed."""

    def make_request(self, turns, voices=(), **kw):
        return voices


@pytest.fixture
def front(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    for name, freq in (("en-Alice_woman", 220.0), ("en-Bob_man", 110.0)):
        (folder / f"{name}.wav").write_bytes(wav(freq))
    lib = VoiceLibrary(folder, max_bytes=1_000_000, max_seconds=10.0)
    return Front(pool=Pool(), voices=lib, cfg=PoolConfig())


def test_a_speaker_left_to_the_defaults_gets_a_preset_never_an_upload(front):
    lib = front.voices
    alice, bob = lib.resolve("en-Alice_woman"), lib.resolve("en-Bob_man")
    script = "Speaker 1: Hello.\nSpeaker 2: Hi."
    assert [v.tolist() for v in front.build_request(SynthesizeBody(script=script))] == [
        alice.tolist(),
        bob.tolist(),
    ]
    for name in ("0-first", "AAA"):  # uploads that sort before every preset
        lib.add(name, wav(440.0), owner="mallory")
    voices = front.build_request(SynthesizeBody(script=script))
    assert [v.tolist() for v in voices] == [alice.tolist(), bob.tolist()]
    named = front.build_request(SynthesizeBody(script=script, speakers=[{"voice": "AAA"}]))
    assert named[0].tolist() == lib.resolve("AAA").tolist()  # asked for by its name: used
    assert named[1].tolist() == bob.tolist()


def test_a_speaker_the_script_does_not_use_is_still_checked(front):
    one = "Speaker 1: Hello."
    with pytest.raises(VoiceNotFound):
        front.build_request(SynthesizeBody(script=one, speakers=[{}, {"voice": "nobody"}]))
    with pytest.raises(PoolError, match=r"speakers\[1\]\.audio"):
        front.build_request(SynthesizeBody(script=one, speakers=[{}, {"audio": "AAAA"}]))
    with pytest.raises(PoolError, match="not both"):
        both = {"voice": "en-Bob_man", "audio": "AAAA"}
        front.build_request(SynthesizeBody(script=one, speakers=[{}, both]))
    ok = front.build_request(SynthesizeBody(script=one, speakers=[{}, {"voice": "Bob"}]))
    assert len(ok) == 1  # checked, and left out of the request


def test_the_pages_voice_dropdowns_start_on_presets_too(front):
    from types import SimpleNamespace

    from vibevoice_pool.ui.page import Page

    lib = front.voices
    lib.add("0-first", wav(440.0), owner="mallory")
    page = SimpleNamespace(front=front, voice_names=lib.names)
    assert [Page.default_voice(page, i) for i in range(3)] == [
        "en-Alice_woman",
        "en-Bob_man",
        "en-Alice_woman",
    ]


def test_a_broken_voice_file_on_the_server_is_the_servers_error_not_the_clients(front, caplog):
    from vibevoice_pool.api.errors import error_code, status_for
    from vibevoice_pool.voices.library import VoiceUnreadable

    (front.voices.folder / "en-Zed_man.wav").write_bytes(b"RIFF junk that is no wav at all")
    body = SynthesizeBody(script="Speaker 1: Hi.", speakers=[{"voice": "en-Zed_man"}])
    with pytest.raises(VoiceUnreadable) as e:
        front.build_request(body)
    assert (status_for(e.value), error_code(e.value)) == (500, "voice_unreadable")
    assert "choose another voice" in e.value.message
    assert "en-Zed_man.wav" in caplog.text  # the operator is told which file
    assert len(front.build_request(SynthesizeBody(script="Speaker 1: Hi."))) == 1  # others serve
