"""Compressed formats stream while they are made: the official `openai` client
gets mp3, opus and aac bytes long before generation ends, and what it gets
decodes. A server whose simulated GPU makes audio at about three times real
time, so a request of ~10 s of audio takes ~3.5 s to make."""

from __future__ import annotations

import io
import time

import av
import numpy as np
import openai
import pytest
import soundfile as sf
from serving import running_server

TEXT = "This sentence is long enough to make a few seconds of simulated speech. " * 2
SIM_RTF = 0.35  # wall seconds per audio second
SIM_CHUNK_S = 0.5  # audio seconds per step: the first chunk is ready after ~0.2 s


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    args = ("--sim-rtf", str(SIM_RTF), "--sim-chunk-s", str(SIM_CHUNK_S))
    with running_server(tmp_path_factory.mktemp("streaming"), *args) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield c
        c.close()


def _timed(client, fmt: str, **extra) -> tuple[float, float, bytes, dict]:
    """(seconds to the first body bytes, seconds to the end, the body, headers)."""
    start = time.perf_counter()
    first = None
    parts = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format=fmt, **extra
    ) as resp:
        headers = dict(resp.headers)
        for part in resp.iter_bytes(1024):
            if first is None:
                first = time.perf_counter() - start
            parts.append(part)
    return first, time.perf_counter() - start, b"".join(parts), headers


def _decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt in ("mp3", "opus"):
        return sf.read(io.BytesIO(data), dtype="float32")
    with av.open(io.BytesIO(data), format={"aac": "aac", "flac": "flac"}[fmt]) as c:
        rate = c.streams.audio[0].rate
        return np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)]), rate


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac"])
def test_openai_client_gets_audio_long_before_generation_ends(client, fmt):
    first, total, data, headers = _timed(client, fmt)
    print(f"{fmt}: first bytes after {first:.2f} s, the end after {total:.2f} s")
    assert "x-audio-seconds" not in headers  # streamed: the length is not known up front
    assert headers["x-accel-buffering"] == "no"  # nor should a proxy hold it back
    assert total > 3.0, "the request must take seconds to make, or the check means nothing"
    assert first < 0.3 * total and first < 1.5
    pcm, rate = _decode(data, fmt)
    assert len(pcm) / rate == pytest.approx(total / SIM_RTF, rel=0.35)  # all of it arrived
    assert np.abs(pcm).max() > 0.05  # a tone, not silence


def test_flac_is_one_whole_file_unless_streaming_is_asked_for(client):
    first, total, whole, headers = _timed(client, "flac")
    assert float(headers["x-audio-seconds"]) > 5  # buffered: the length is known
    assert first > 0.7 * total
    pcm, rate = sf.read(io.BytesIO(whole), dtype="float32")  # libsndfile needs the length
    first, total, streamed, _ = _timed(client, "flac", extra_body={"stream": True})
    assert first < 0.3 * total
    assert len(_decode(streamed, "flac")[0]) == len(pcm)  # the same samples, sent early


def test_a_stream_whose_request_fails_after_its_headers_ends_incomplete(tmp_path):
    """A streamed answer has no length, so a request that fails once its 200 and
    headers are out must not end like a whole one: the connection closes without
    the body's last chunk, and the client's HTTP library says so."""
    import httpx
    from conftest import wait_until

    body = {"script": "Speaker 1: this one kills its workers [[crash]]", "stream": True}
    with running_server(tmp_path, "--sim-rtf", "0.05") as s:
        for fmt in ("pcm", "mp3"):
            with httpx.stream(
                "POST", s.url + "/v1/synthesize", json=body | {"format": fmt}, timeout=60
            ) as r:
                assert r.status_code == 200  # started on a worker, then that worker died
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete"):
                    for _ in r.iter_bytes():
                        pass
            wait_until(lambda: s.get("/ready").json()["ready_workers"] == 2, 30, 0.2, "respawns")
        whole = s.post("/v1/synthesize", json={"script": "Speaker 1: still serving"})
        assert whole.status_code == 200 and len(whole.content) > 1000
        log = s.log()
        assert log.count("failed after its headers (worker_lost") == 2
        assert "without completing response" not in log  # the cut is meant: no error line


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/synthesize", {"script": "Speaker 1: " + TEXT, "stream": True}),
        (
            "/v1/audio/speech",
            {"model": "tts-1", "input": TEXT, "voice": "alloy", "stream_format": "sse"},
        ),
    ],
)
def test_a_stream_whose_client_leaves_while_it_waits_gives_its_place_up(tmp_path, path, body):
    """A streaming client that gives up while its request waits in the queue (a read
    timeout, then a retry, as OpenAI's client does) cancels it there: it must not hold
    its place in the queue, then run on a worker for nobody."""
    import httpx
    from conftest import wait_until

    hold = {"script": "Speaker 1: " + TEXT * 20, "stream": True}  # ~200 s of audio: ~40 s
    args = ("--sim-rtf", "0.2", "--gpus", "cpu:1", "--max-batch-size", "1")
    with running_server(tmp_path, *args) as s:
        with httpx.stream("POST", s.url + "/v1/synthesize", json=hold, timeout=60) as r:
            assert r.status_code == 200  # its worker runs it: the next one waits
            with pytest.raises(httpx.ReadTimeout):  # it waits behind the holder: gives up
                httpx.post(s.url + path, json=body, timeout=httpx.Timeout(1.0, connect=10))

            def gone() -> bool:
                return s.get("/v1/pool").json()["queue"]["length"] == 0

            wait_until(gone, 10, 0.2, "the abandoned request to leave the queue")
            worker = s.get("/v1/pool").json()["workers"][0]
            assert worker["inflight"] == 1 and worker["completed"] == 0  # the holder, alone
        assert "the client went away; cancelling" in s.log()
