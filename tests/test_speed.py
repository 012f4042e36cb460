"""OpenAI's `speed` on /v1/audio/speech: the audio plays that many times faster with
its pitch kept, whole and streamed (audio and sse), in wav and a compressed format.

The stretch itself (tempo.py) on a sine: the length is exactly the input's over the
factor and the dominant frequency stays. A real server on the tiny model: the answer
at each speed is the speed-1.0 answer's length over the factor (the same seed makes
the same audio), X-Audio-Seconds and usage.audio_seconds say so, and a stream's
first audio leaves before the worker has made its last (the worker is stopped with
SIGSTOP once the first audio arrives, and its request is still in flight). The sim
server's tone keeps its pitch through the whole route."""

from __future__ import annotations

import base64
import io
import json
import os
import signal

import httpx
import numpy as np
import pytest
import soundfile as sf
from serving import shared_server

from vibevoice_pool.api import tempo
from workers.wire.messages import ErrorKind, PoolError

SR = 24000
MP3_FRAME = 1152  # samples in one mp3 frame: the compressed answers' tolerance is two
TEXT = "Hello from the pool. This sentence is long enough to make a second of audio."
LONG = " ".join([TEXT] * 6)  # about 20 s of audio: time to stop its worker mid-way
SPEEDS = (0.5, 1.5, 2.0, 4.0)


def _sine(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _pitch(x: np.ndarray) -> float:
    """The dominant frequency, within a tenth of a hertz (zero-padded FFT)."""
    n = 1 << 20
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    return float(np.argmax(spectrum) * SR / n)


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.5, 2.0, 3.0, 4.0])
def test_stretch_keeps_pitch_and_divides_length(factor):
    x = _sine(2.0, 330.0)
    y = tempo.stretch(x, factor)
    assert len(y) == round(len(x) / factor)
    assert _pitch(y) == pytest.approx(330.0, abs=1.0)
    assert np.abs(y[-SR // 10 :]).max() > 0.25  # the last input is kept, not silence


@pytest.mark.parametrize("factor", [0.25, 2.0, 4.0])
def test_streamed_stretch_gives_audio_as_it_comes_and_matches_the_whole(factor):
    x = _sine(3.0, 220.0)
    st = tempo.Stretcher(factor)
    pieces = [st.push(x[i : i + 3200]) for i in range(0, len(x), 3200)]  # one token's hop
    ready = [len(p) for p in pieces]
    pieces.append(st.end())
    assert sum(ready[:4]) > 0  # output long before the input ends (22 pushes)
    assert all(n > 0 for n in ready[4:])
    whole = np.concatenate(pieces)
    np.testing.assert_array_equal(whole, tempo.stretch(x, factor))
    assert st.samples_out == len(whole) == st.target == round(len(x) / factor)


@pytest.mark.parametrize("value", [0.2, 4.01, float("nan")])
def test_speed_out_of_range_is_bad_input(value):
    with pytest.raises(PoolError) as err:
        tempo.check_speed(value)
    assert err.value.kind is ErrorKind.BAD_INPUT
    assert "0.25-4.0" in err.value.message


def test_steps_stay_in_one_filter_range():
    for factor in (0.25, 0.3, 0.5, 0.9, 1.5, 2.0, 2.5, 4.0):
        parts = tempo.steps(factor)
        assert all(0.5 - 1e-9 <= p <= 2.0 + 1e-9 for p in parts)
        assert np.prod(parts) == pytest.approx(factor)


# ---- a real server on the tiny model ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_cache, tmp_path_factory):
    from test_fidelity_server import serve

    tmp = tmp_path_factory.mktemp("speed-server")
    yield from serve(["--tiny-model", "--cache-dir", str(tiny_cache)], tmp)


def _body(fmt: str, speed: float, mode: str, text: str = TEXT) -> dict:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "seed": 7}
    body |= {"response_format": fmt, "speed": speed}
    if mode == "whole":
        body["stream"] = False
    elif mode == "stream":
        body["stream"] = True
    else:
        body["stream_format"] = "sse"
    return body


def _samples(data: bytes, fmt: str, streamed: bool) -> int:
    if fmt == "wav" and streamed:  # sizes of "as long as it goes": the samples after
        assert data[:4] == b"RIFF" and data[36:40] == b"data"
        return (len(data) - 44) // 2
    pcm, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == SR
    return len(pcm)


def _ask(srv, body: dict) -> tuple[bytes, dict, dict | None]:
    """(the audio file, the headers, the done event's usage or None)."""
    r = srv.post("/v1/audio/speech", json=body, timeout=300)
    assert r.status_code == 200, r.text
    if body.get("stream_format") != "sse":
        return r.content, r.headers, None
    events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    return audio, r.headers, events[-1]["usage"]


@pytest.fixture(scope="module")
def made(tiny):
    """The speed-1.0 answer's samples (wav, whole), and its usage's output tokens."""
    data, headers, _ = _ask(tiny, _body("wav", 1.0, "whole"))
    n = _samples(data, "wav", False)
    assert float(headers["x-audio-seconds"]) == pytest.approx(n / SR, abs=1e-3)
    _, _, use = _ask(tiny, _body("pcm", 1.0, "sse"))
    return n, use["output_tokens"]


# Every speed, format and mode at least twice, not their whole product (24 answers).
CASES = [
    (0.5, "wav", "whole"),
    (0.5, "mp3", "sse"),
    (1.5, "mp3", "stream"),
    (1.5, "wav", "sse"),
    (2.0, "wav", "stream"),
    (2.0, "mp3", "whole"),
    (4.0, "wav", "whole"),
    (4.0, "mp3", "stream"),
]
assert {c[0] for c in CASES} == set(SPEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("speed,fmt,mode", CASES)
def test_answer_is_the_speed_one_answer_over_the_factor(tiny, made, speed, fmt, mode):
    n1, tokens = made
    want = round(n1 / speed)
    data, headers, use = _ask(tiny, _body(fmt, speed, mode))
    got = _samples(data, fmt, streamed=mode != "whole")
    if fmt == "wav":
        assert got == want
    else:  # the encoder's delay and its last frame's padding
        assert abs(got - want) <= 2 * MP3_FRAME, (got, want)
    if mode == "whole":
        assert float(headers["x-audio-seconds"]) == pytest.approx(want / SR, abs=1e-3)
    if use is not None:
        assert use["audio_seconds"] == pytest.approx(want / SR, abs=1e-3)
        assert use["output_tokens"] == tokens  # what the model made, at every speed


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["whole", "sse"])
def test_flac_comes_whole_and_stretched(tiny, made, mode):
    """flac is one whole file (also in SSE's pieces): stretched once it is all made."""
    n1, _ = made
    data, _, use = _ask(tiny, _body("flac", 2.0, mode))
    assert data.startswith(b"fLaC")
    assert _samples(data, "flac", streamed=False) == round(n1 / 2.0)
    if use is not None:
        assert use["audio_seconds"] == pytest.approx(round(n1 / 2.0) / SR, abs=1e-3)


def _first_audio_then_stop(srv, body: dict, enough: int) -> tuple[bytes, list[dict]]:
    """Stream `body`; once `enough` bytes arrived, SIGSTOP the worker and read the pool
    (its request still in flight or not), SIGCONT it, and read the rest."""
    (pid,) = srv.worker_pids()
    got = b""
    with httpx.stream("POST", srv.url + "/v1/audio/speech", json=body, timeout=300) as r:
        assert r.status_code == 200
        pieces = r.iter_bytes()
        for piece in pieces:
            got += piece
            if len(got) >= enough:
                break
        os.kill(pid, signal.SIGSTOP)
        try:
            workers = srv.get("/v1/pool").json()["workers"]
        finally:
            os.kill(pid, signal.SIGCONT)
        for piece in pieces:
            got += piece
    return got, workers


@pytest.mark.slow
@pytest.mark.parametrize("fmt,speed", [("wav", 2.0), ("mp3", 0.5)])
def test_a_stretched_stream_sends_audio_before_the_last_is_made(tiny, fmt, speed):
    body = _body(fmt, speed, "stream", text=LONG)
    enough = 44 + SR // 5 if fmt == "wav" else 4096  # audio, not only a header
    data, workers = _first_audio_then_stop(tiny, body, enough)
    assert workers[0]["inflight"] == 1  # its worker had not made the last audio yet
    assert _samples(data, fmt, streamed=True) > 5 * SR  # and the rest arrived


@pytest.mark.slow
def test_a_stretched_sse_stream_sends_deltas_before_the_last_is_made(tiny):
    body = _body("pcm", 1.5, "sse", text=LONG)
    data, workers = _first_audio_then_stop(tiny, body, 8192)
    assert workers[0]["inflight"] == 1
    assert data.rstrip().endswith(b"}") and b"speech.audio.done" in data


# ---- the sim server's tone: the pitch through the whole route ------------------------


@pytest.fixture(scope="module")
def sim(request, tmp_path_factory):
    return shared_server(request, tmp_path_factory)


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_the_route_keeps_the_pitch(sim, speed):
    def answer(s: float) -> np.ndarray:
        body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "seed": 3}
        r = sim.post("/v1/audio/speech", json=body | {"response_format": "wav", "speed": s})
        assert r.status_code == 200, r.text
        return sf.read(io.BytesIO(r.content), dtype="float32")[0]

    normal, fast = answer(1.0), answer(speed)
    assert len(fast) == round(len(normal) / speed)
    assert _pitch(fast) == pytest.approx(_pitch(normal), abs=1.0)
    assert _pitch(normal) == pytest.approx(110.0 + 3 * 20.0, abs=1.0)  # the sim's tone
