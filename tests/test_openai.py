"""The official `openai` package against /v1/audio/speech: every format, streaming,
OpenAI's voice names, and a clear 400 for what is not supported."""

from __future__ import annotations

import base64
import io
import json
import math

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from serving import shared_server

TEXT = "Hello from the pool. This sentence is long enough to make a second of audio."


@pytest.fixture(scope="module")
def srv(request, tmp_path_factory):
    return shared_server(request, tmp_path_factory)


@pytest.fixture(scope="module")
def client(srv):
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def _decode(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768
    if fmt == "aac":  # libsndfile has no AAC: FFmpeg's decoder, through PyAV
        with av.open(io.BytesIO(data), format="aac") as c:
            assert c.streams.audio[0].rate == 24000
            return np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)])
    pcm, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate in (24000, 48000)  # opus decodes at 48 kHz
    return pcm


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac", "pcm"])
def test_openai_client_gets_valid_audio_in_every_format(client, fmt):
    speech = client.audio.speech.create(
        model="tts-1", voice="demo-Alice_woman", input=TEXT, response_format=fmt
    )
    data = speech.read()
    magic = {"wav": b"RIFF", "flac": b"fLaC", "opus": b"OggS", "aac": b"\xff\xf1"}  # ADTS sync
    if fmt in magic:
        assert data.startswith(magic[fmt])
    pcm = _decode(data, fmt)
    assert len(pcm) > 0.5 * 24000
    assert np.abs(pcm).max() > 0.05  # a tone, not silence


def test_openai_voice_names_map_to_presets(client):
    raw = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="wav"
    )
    assert raw.headers["x-voice"].startswith("demo-")
    assert raw.content.startswith(b"RIFF")


def test_streaming_response_arrives_in_pieces(client):
    with client.audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="demo-Bob_man",
        input=TEXT * 3,
        response_format="pcm",
        extra_body={"stream": True},
    ) as resp:
        chunks = list(resp.iter_bytes(4800))
    assert len(chunks) > 2
    assert len(b"".join(chunks)) > 24000 * 2  # over a second of 16-bit audio


def test_sse_stream_format_sends_openai_events(srv):
    body = {
        "model": "tts-1",
        "input": TEXT,
        "voice": "demo-Bob_man",
        "response_format": "pcm",
        "stream_format": "sse",
    }
    events = []
    with httpx.stream("POST", srv.url + "/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["type"] == "speech.audio.done"
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(deltas) > 1 and len(audio) > 24000
    # OpenAI's usage: clients typed from its spec require the three token counts
    usage = events[-1]["usage"]
    counts = [usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")]
    assert all(isinstance(n, int) and n >= 0 for n in counts)
    assert counts[2] == counts[0] + counts[1]
    seconds = len(audio) / 2 / 24000
    assert usage["audio_seconds"] == pytest.approx(seconds, abs=1e-3)
    assert usage["output_tokens"] == math.ceil(round(seconds * 7.5, 6))  # 7.5 audio tokens/s


def test_unsupported_format_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(
            model="tts-1", voice="alloy", input=TEXT, response_format="vorbis"
        )
    assert err.value.status_code == 400
    message = err.value.body["message"]
    assert "'vorbis' is not supported" in message
    assert "wav, mp3, flac, opus, aac, pcm" in message


@pytest.mark.parametrize(
    "change,status,needle",
    [
        ({"voice": "nobody-like-this"}, 404, "unknown voice"),  # code voice_not_found
        ({"input": "   "}, 400, "input is empty"),
        ({"speed": 4.5}, 400, "speed: Input should be less than or equal to 4"),
        ({"speed": 0.1}, 400, "speed: Input should be greater than or equal to 0.25"),
        ({"model": ""}, 400, "model"),
        ({"voice": ""}, 400, "voice is empty"),  # one line, not a line per union branch
    ],
)
def test_bad_speech_requests_say_what_to_fix(srv, change, status, needle):
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy"} | change
    r = srv.post("/v1/audio/speech", json=body)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]
    assert "VoiceId" not in r.json()["error"]["message"]
    assert "constrained" not in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == ("voice_not_found" if status == 404 else "bad_input")
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_models_and_voices_in_the_shapes_clients_read(srv, client):
    models = client.models.list()  # OpenAI's own shape, read by the official client
    ids = [m.id for m in models.data]
    assert "tts-1" in ids and "vibevoice" in ids
    assert client.models.retrieve("tts-1").owned_by == "vibevoice-pool"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # Open WebUI: {"models": [{"id"}]} and {"voices": [{"id", "name"}]}
    assert {"id": "tts-1", "name": "tts-1"} in srv.get("/v1/audio/models").json()["models"]
    voices = srv.get("/v1/audio/voices").json()["voices"]
    assert {"id": "demo-Alice_woman", "name": "demo-Alice_woman"} in voices
    names = srv.get("/v1/audio/voices", params={"names": "true"}).json()["voices"]
    assert names == [v["id"] for v in voices]  # Kokoro-FastAPI's older list of names
    # A listed voice is one the speech route takes.
    raw = client.audio.speech.with_raw_response.create(
        model=ids[0], voice=voices[0]["id"], input=TEXT, response_format="wav"
    )
    assert raw.headers["x-voice"] == voices[0]["id"]
    # /openapi.json types the lists, for clients generated from it
    spec = srv.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/models/{model_id}", "/v1/audio/models", "/v1/audio/voices"):
        schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        assert schema["schema"].get("$ref", "").startswith("#/components/schemas/"), path


def test_null_is_unset_for_every_optional_field(srv):
    """OpenAI's API reads null as unset; clients that send every option send nulls."""
    nulls = {"speed": None, "response_format": None, "stream_format": None, "cfg_scale": None}
    nulls |= {"instructions": None, "seed": None, "stream": None, "inference_steps": None}
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy"} | nulls
    r = srv.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mpeg"  # the default format
    assert len(r.content) > 1000


def test_sse_flac_is_one_whole_file_libsndfile_reads(srv):
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "flac"}
    body["stream_format"] = "sse"
    with httpx.stream("POST", srv.url + "/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    pcm, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24000
    assert len(pcm) / rate == pytest.approx(events[-1]["usage"]["audio_seconds"], abs=1e-3)
