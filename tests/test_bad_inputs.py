"""Bad inputs, one table: each gets the right status and a message that says what
to fix; afterwards the server is ready, and no worker restarted or changed pid."""

from __future__ import annotations

import base64

import httpx
import pytest
from conftest import wait_until
from serving import MAX_TEXT_CHARS, shared_server, wav_bytes

OK = "Speaker 1: Hello there.\nSpeaker 2: Hi!"
MAX_CHARS = MAX_TEXT_CHARS


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def synth(**fields) -> dict:
    return {"json": {"script": OK} | fields}


def upload(name: str, data: bytes) -> dict:
    return {"files": {"file": ("sample.wav", data, "audio/wav")}, "data": {"name": name}}


# error.code by status: a missing voice and bytes that are no audio have their own
CODES = {400: "bad_input", 404: "voice_not_found", 413: "too_large", 415: "unsupported_audio"}
BIG = b"RIFF" + b"\0" * (11 * 1024 * 1024)  # over the 10 MB upload limit

# (what, method, path, request kwargs, status, words the message must hold)
CASES = [
    ("empty text", "POST", "/v1/synthesize", synth(script="  \n "), 400, "script is empty"),
    ("text over the limit", "POST", "/v1/synthesize", synth(script="Speaker 1: " + "a" * 600),
     400, f"the limit is {MAX_CHARS}"),
    ("five speakers listed", "POST", "/v1/synthesize", synth(speakers=[{"voice": "Alice"}] * 5),
     400, "at most 4"),
    ("a fifth speaker in the script", "POST", "/v1/synthesize",
     synth(script="Speaker 1: a\nSpeaker 5: b"), 400, "numbered 1-4"),
    ("unknown voice", "POST", "/v1/synthesize", synth(speakers=[{"voice": "Nobody"}]), 404,
     "unknown voice 'Nobody'; available voices: demo-"),
    ("unknown voice in a job", "POST", "/v1/jobs", synth(speakers=[{"voice": "Nobody"}]), 404,
     "unknown voice 'Nobody'"),
    ("corrupt upload", "POST", "/v1/synthesize",
     synth(speakers=[{"audio": b64(wav_bytes()[:30])}]), 415,
     "could not be read as audio"),
    ("non-audio upload", "POST", "/v1/synthesize",
     synth(speakers=[{"audio": b64(b"%PDF-1.4 not a voice at all")}]), 415,
     "send a wav, mp3, flac or ogg file"),
    ("voice and audio both", "POST", "/v1/synthesize",
     synth(speakers=[{"voice": "Alice", "audio": b64(wav_bytes())}]), 400,
     "give voice or audio, not both"),
    ("seed with a fraction", "POST", "/v1/synthesize", synth(seed=4.5), 400,
     "seed: Input should be a valid integer"),
    ("seed that is a flag", "POST", "/v1/synthesize", synth(seed=True), 400,
     "seed: Input should be a valid integer"),
    ("upload that is not base64", "POST", "/v1/synthesize", synth(speakers=[{"audio": "@@@"}]),
     400, "not valid base64"),
    ("non-audio voice file", "POST", "/v1/voices", upload("notes", b"just some text\n" * 50),
     415, "could not be read as audio"),
    ("non-audio voice as JSON", "POST", "/v1/voices",
     {"json": {"name": "notes", "audio": b64(b"just some text")}}, 415, "could not be read"),
    ("empty voice file", "POST", "/v1/voices", upload("nothing", b""), 400, "is empty"),
    ("oversized voice file", "POST", "/v1/voices", upload("big", BIG), 413, "the limit is 10 MB"),
    ("oversized base64 upload", "POST", "/v1/synthesize", synth(speakers=[{"audio": b64(BIG)}]),
     413, "the limit is 10 MB"),
    ("voice name with ../", "POST", "/v1/voices", upload("../../evil", wav_bytes()), 400,
     "is not allowed: no '/'"),
    ("delete a name with ../", "DELETE", "/v1/voices/..%2F..%2Fetc%2Fpasswd", {}, 400,
     "is not allowed"),
    ("a speaker's voice with ../", "POST", "/v1/synthesize",
     synth(speakers=[{"voice": "../../etc/passwd"}]), 404, "unknown voice"),
    ("JSON sent as text/plain", "POST", "/v1/synthesize",
     {"content": b'{"script": "Speaker 1: hi"}', "headers": {"content-type": "text/plain"}},
     400, "send it as JSON, with Content-Type: application/json"),
    ("an OpenAI body that is no object", "POST", "/v1/audio/speech", {"json": [1]}, 400,
     '{"model": "tts-1", "input": "Hello", "voice": "alloy"}'),
    ("invalid JSON", "POST", "/v1/synthesize",
     {"content": b'{"script": "Speaker 1: hi",', "headers": {"content-type": "application/json"}},
     400, "not valid JSON"),
    ("body not an object", "POST", "/v1/synthesize", {"json": ["Speaker 1: hi"]}, 400,
     "must be a JSON object"),
    ("script of the wrong type", "POST", "/v1/synthesize", {"json": {"script": 5}}, 400,
     "script: Input should be a valid string"),
    ("cfg_scale of the wrong type", "POST", "/v1/synthesize", synth(cfg_scale="loud"), 400,
     "cfg_scale: Input should be a valid number"),
    ("a misspelt field", "POST", "/v1/synthesize", synth(sead=4), 400, "sead: unknown field"),
    ("unsupported format", "POST", "/v1/synthesize", synth(format="vorbis"), 400,
     "use one of: wav, mp3, flac, opus, aac, pcm"),
    ("unsupported OpenAI format", "POST", "/v1/audio/speech",
     {"json": {"model": "m", "input": "hi", "voice": "alloy", "response_format": "vorbis"}}, 400,
     "use one of: wav, mp3, flac, opus, aac, pcm"),
    ("an empty base64 voice", "POST", "/v1/synthesize", synth(speakers=[{"audio": ""}]), 400,
     "speakers[0].audio is empty"),
    ("steps too few", "POST", "/v1/synthesize", synth(inference_steps=0), 400,
     "inference_steps: Input should be greater than or equal to 1"),
    ("steps too many", "POST", "/v1/synthesize", synth(inference_steps=1000), 400,
     "inference_steps: Input should be less than or equal to 100"),
    ("missing script", "POST", "/v1/synthesize", {"json": {"speakers": []}}, 400,
     "script: required"),
]  # fmt: skip


@pytest.fixture(scope="module")
def srv(request, tmp_path_factory):
    s = shared_server(request, tmp_path_factory)
    wait_until(lambda: s.get("/ready").json()["ready_workers"] == 2, 60, 0.2, "both workers")
    s.before = s.get("/v1/pool").json()["workers"]
    return s


@pytest.mark.parametrize("what,method,path,kwargs,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_message_that_says_what_to_fix(
    srv, what, method, path, kwargs, status, words
):
    r = httpx.request(method, srv.url + path, timeout=60, **kwargs)
    assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert words in err["message"], f"{what}: {err['message']!r}"
    assert err["code"] == CODES[status]
    assert err["type"] == "invalid_request_error"


def test_afterwards_the_server_is_ready_and_no_worker_restarted(srv):
    assert srv.get("/ready").status_code == 200
    after = srv.get("/v1/pool").json()["workers"]
    assert [(w["pid"], w["restarts"]) for w in after] == [
        (w["pid"], w["restarts"]) for w in srv.before
    ]
    assert all(w["state"] == "ready" for w in after)
    assert not list(srv.log_path.parent.rglob("evil*"))  # the ../ name wrote nothing anywhere
    good = srv.post("/v1/synthesize", json={"script": OK})
    assert good.status_code == 200 and good.content.startswith(b"RIFF")
