"""The HTTP API of a real server: /v1/synthesize, /v1/voices, /v1/pool, /health,
/ready, the status CLI, error shapes and statuses, and no CORS by default."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import ROOT, wait_until
from fastapi import FastAPI, Request
from serving import shared_server, wav_bytes

from vibevoice_pool.api.errors import error_response
from workers.wire.messages import ErrorKind, PoolError

SCRIPT = "Speaker 1: Hello there, how are you?\nSpeaker 2: Fine, thank you."


@pytest.fixture(scope="module")
def srv(request, tmp_path_factory):
    return shared_server(request, tmp_path_factory)


def test_health_ready_and_pool_status(srv):
    assert srv.get("/health").json() == {"status": "ok"}
    ready = srv.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["ready_workers"] == 2
    pool = srv.get("/v1/pool").json()
    assert pool["queue"] == {"length": 0, "max": 50}
    assert [w["id"] for w in pool["workers"]] == [0, 1]
    for w in pool["workers"]:
        for key in (
            "device",
            "state",
            "pid",
            "restarts",
            "inflight",
            "queued_work_s",
            "mem_used_bytes",
            "mem_total_bytes",
            "util",
            "heartbeat_age_s",
        ):
            assert key in w
        assert w["state"] == "ready"


def test_synthesize_returns_wav_with_its_headers_and_is_deterministic(srv):
    body = {
        "script": SCRIPT,
        "speakers": [{"voice": "Alice"}, {"voice": "demo-Bob_man"}],
        "seed": 7,
        "format": "wav",
    }
    r = srv.post("/v1/synthesize", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    assert r.headers["x-seed"] == "7"
    assert r.headers["x-worker"] in ("0", "1")
    assert r.headers["x-request-id"]
    pcm, rate = sf.read(io.BytesIO(r.content))
    assert rate == 24000
    assert len(pcm) / rate == pytest.approx(float(r.headers["x-audio-seconds"]), abs=0.01)
    assert np.abs(pcm).max() > 0.05
    again = srv.post("/v1/synthesize", json=body)
    assert again.content == r.content  # same seed, same audio


def test_synthesize_streams_pcm_as_it_is_made(srv):
    body = {"script": SCRIPT, "format": "pcm", "stream": True, "seed": 3}
    with httpx.stream("POST", srv.url + "/v1/synthesize", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "audio/pcm"
        parts = list(r.iter_bytes())
    data = b"".join(parts)
    assert len(data) % 2 == 0 and len(data) > 24000  # more than half a second of 16-bit audio
    whole = srv.post("/v1/synthesize", json=body | {"stream": False})
    assert whole.content == data  # streamed or not, the same samples


def test_voices_list_add_use_and_delete(srv):
    names = [v["name"] for v in srv.get("/v1/voices").json()["voices"]]
    assert "demo-Alice_woman" in names
    r = srv.post(
        "/v1/voices",
        files={"file": ("x.wav", wav_bytes(), "audio/wav")},
        data={"name": "My Voice!"},
    )
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "My_Voice", "renamed": True}
    assert "My_Voice" in [v["name"] for v in srv.get("/v1/voices").json()["voices"]]
    taken = srv.post(
        "/v1/voices", files={"file": ("x.wav", wav_bytes(), "audio/wav")}, data={"name": "My_Voice"}
    )
    assert taken.status_code == 400 and "already exists" in taken.json()["error"]["message"]
    b64 = base64.b64encode(wav_bytes(freq=330)).decode()
    r = srv.post("/v1/voices", json={"name": "json-voice", "audio": b64})
    assert r.status_code == 201 and r.json()["name"] == "json-voice"
    body = {"script": SCRIPT, "speakers": [{"voice": "My_Voice"}, {"voice": "json-voice"}]}
    assert srv.post("/v1/synthesize", json=body).status_code == 200
    assert httpx.delete(srv.url + "/v1/voices/My_Voice").json() == {"deleted": "My_Voice"}
    gone = httpx.delete(srv.url + "/v1/voices/My_Voice")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert "My_Voice" not in [v["name"] for v in srv.get("/v1/voices").json()["voices"]]


def test_an_uploaded_sample_can_be_a_speaker(srv):
    b64 = base64.b64encode(wav_bytes(0.5)).decode()
    body = {"script": "Speaker 1: Using my own voice.", "speakers": [{"audio": b64}]}
    r = srv.post("/v1/synthesize", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"


def test_no_cors_headers_unless_configured(srv):
    pre = httpx.options(
        srv.url + "/v1/synthesize",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers
    r = srv.get("/v1/pool", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_status_cli_prints_a_row_per_worker(srv):
    out = subprocess.run(
        [sys.executable, "-m", "vibevoice_pool", "status", "--url", srv.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"LANG": "C", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "Worker " in line and "cpu:" in line]
    assert len(rows) == 2
    assert all("ready" in row and "GB" in row and "%" in row for row in rows)
    raw = subprocess.run(
        [sys.executable, "-m", "vibevoice_pool", "status", "--url", srv.url, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(json.loads(raw.stdout)["workers"]) == 2


def test_status_cli_into_a_reader_that_left_ends_without_a_traceback(srv):
    """`vibevoice-pool status | head -1`: head leaves after its line, and the command
    printed a BrokenPipeError traceback (and another at the exit's flush)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "vibevoice_pool", "status", "--url", srv.url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # before it prints: the reader is gone when it does
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141, err  # as a command that SIGPIPE ended
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_metrics_of_the_real_server_parse_and_hold_both_workers(srv):
    from prometheus_client.parser import text_string_to_metric_families

    r = srv.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    up = families["vibevoice_pool_worker_up"].samples
    assert sorted(s.labels["worker"] for s in up) == ["0", "1"]
    assert all(s.value == 1 for s in up)


def test_restart_route_brings_a_worker_back_with_a_new_pid(srv):
    before = srv.get("/v1/pool").json()["workers"][1]
    assert srv.post("/v1/pool/workers/1/restart", json={}).json() == {"restarting": 1}

    def back():
        w = srv.get("/v1/pool").json()["workers"][1]
        return w if w["state"] == "ready" and w["pid"] != before["pid"] else None

    after = wait_until(back, 30, 0.2, "worker 1 to come back")
    assert after["restarts"] == before["restarts"] + 1
    missing = srv.post("/v1/pool/workers/9/restart", json={})
    assert missing.status_code == 404 and "no worker 9" in missing.json()["error"]["message"]


@pytest.mark.parametrize(
    "kind,status,retry",
    [
        (ErrorKind.BAD_INPUT, 400, False),
        (ErrorKind.OVERLOADED, 429, True),
        (ErrorKind.UNAVAILABLE, 503, True),
        (ErrorKind.TIMEOUT, 504, False),
    ],
)
def test_errors_have_openai_shape_and_status(kind, status, retry):
    r = error_response(PoolError(kind, "what to do"))
    assert r.status_code == status
    body = json.loads(r.body)
    assert body == {
        "error": {
            "message": "what to do",
            "type": body["error"]["type"],
            "param": None,
            "code": kind.value,
        }
    }
    assert ("retry-after" in r.headers) == retry


class _NoPool:
    """A pool the CORS and body-limit checks never reach."""

    def status(self) -> dict:
        return {"queue": {"length": 0, "max": 1}, "workers": []}


def test_cors_only_for_the_configured_origins(tmp_path):
    from fastapi.testclient import TestClient

    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.api.metrics import Activity
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.config import build
    from vibevoice_pool.voices.library import VoiceLibrary

    voices = VoiceLibrary(tmp_path, max_bytes=1 << 20, max_seconds=60)
    front = Front(
        _NoPool(),
        voices,
        build({"engine": "sim"}),
        activity=Activity(),
        cors_origins=("https://ok.example",),
    )
    with TestClient(create_app(front)) as client:
        for origin, allowed in (("https://ok.example", True), ("https://evil.example", False)):
            pre = client.options(
                "/v1/voices",
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            )
            assert (pre.headers.get("access-control-allow-origin") == origin) == allowed
        # a keyless page on the allowed origin keeps its jobs by the owner token
        jobs = client.options(
            "/v1/jobs",
            headers={
                "Origin": "https://ok.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-owner-token",
            },
        )
        assert jobs.status_code == 200
        # the openai package in a browser (dangerouslyAllowBrowser) sends its own
        # headers on every call: its preflight passes, each header allowed by name
        sdk = [
            "authorization",
            "content-type",
            "openai-organization",
            "openai-project",
            "x-stainless-arch",
            "x-stainless-lang",
            "x-stainless-os",
            "x-stainless-package-version",
            "x-stainless-retry-count",
            "x-stainless-runtime",
            "x-stainless-runtime-version",
            "x-stainless-timeout",
        ]
        speech = client.options(
            "/v1/audio/speech",
            headers={
                "Origin": "https://ok.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": ",".join(sdk),
            },
        )
        assert speech.status_code == 200, speech.text
        allowed = speech.headers["access-control-allow-headers"].lower()
        assert set(sdk) <= {h.strip() for h in allowed.split(",")}
        assert speech.headers["access-control-allow-origin"] == "https://ok.example"
        refused = client.options(  # a method it does not allow: the API's error shape
            "/v1/jobs",
            headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "PUT"},
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "cors_refused"
        assert "Disallowed CORS method" in refused.json()["error"]["message"]
        listed = client.get("/v1/voices", headers={"Origin": "https://ok.example"})
        exposed = listed.headers["access-control-expose-headers"].lower()
        assert {"x-owner-token", "retry-after", "location"} <= set(exposed.split(", "))


def test_body_limit_answers_413_before_or_while_reading():
    from fastapi.testclient import TestClient

    from vibevoice_pool.api.auth import BodyLimitMiddleware

    refused = []
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    app.add_middleware(BodyLimitMiddleware, max_bytes=100, on_refused=refused.append)
    with TestClient(app) as client:
        assert client.post("/v1/echo", content=b"x" * 100).json() == {"bytes": 100}
        declared = client.post("/v1/echo", content=b"x" * 101)
        assert declared.status_code == 413
        assert "over 100 bytes" in declared.json()["error"]["message"]

        def chunks():
            for _ in range(5):
                yield b"y" * 40

        streamed = client.post("/v1/echo", content=chunks())  # no Content-Length
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "too_large"
    assert refused == ["too_large", "too_large"]


def test_synth_cli_writes_the_format_asked_and_refuses_bad_paths_in_one_line(srv, tmp_path):
    script = tmp_path / "s.txt"
    script.write_text("Speaker 1: Hello from the terminal.")

    def synth(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "vibevoice_pool", "synth", "--url", srv.url, *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)

    for fmt, magic in (("opus", b"OggS"), ("wav", b"RIFF"), ("aac", b"\xff")):
        out = tmp_path / f"a.{fmt}"
        p = synth("--script", str(script), "--format", fmt, "-o", str(out), "--seed", "3")
        assert p.returncode == 0, p.stderr
        assert out.read_bytes().startswith(magic), fmt
    raw = tmp_path / "a.pcm"
    assert (
        synth("--script", str(script), "--format", "pcm", "-o", str(raw), "--seed", "3").returncode
        == 0
    )
    wav, _ = sf.read(tmp_path / "a.wav", dtype="int16")
    assert raw.read_bytes() == wav.astype("<i2").tobytes()  # the same samples, headerless
    bad = [
        (("--script", str(tmp_path / "missing.txt"), "-o", str(raw)), "No such file"),
        (("--script", str(script), "-o", str(tmp_path / "no" / "a.wav")), "no folder"),
        (("--script", str(script), "--format", "xyz", "-o", str(raw)), "--format xyz"),
    ]
    for args, words in bad:
        p = synth(*args)
        assert p.returncode == 1 and words in p.stderr and "Traceback" not in p.stderr, p.stderr
        p = synth("--async", *args)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    # a request that fails after its stream began (the sim's [[oom]]): the server was
    # reached, and the terminal says the stream was cut, not "cannot reach"
    cut = tmp_path / "cut.txt"
    cut.write_text("Speaker 1: Hello [[oom]] from the terminal.")
    out = tmp_path / "cut.wav"
    p = synth("--script", str(cut), "-o", str(out))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "stream ended before the audio's end" in p.stderr, p.stderr
    assert "cannot reach" not in p.stderr and not out.exists()
