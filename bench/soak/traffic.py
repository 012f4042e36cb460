"""One round of mixed traffic against a running server, every kind of call a client
makes: whole and streamed answers in every format, SSE, /v1/synthesize, jobs
(created, followed, fetched, cancelled, deleted), clients that leave mid-stream,
bad requests, voice uploads and deletes, status reads, the page's Generate.

    one_round(url, workdir) -> {"requests": n, "errors": [...unexpected answers]}

Each call checks the status it should get; an unexpected one is listed, not
raised, so a round goes on and the soak reports it.
"""

from __future__ import annotations

import base64
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from vibevoice_pool.audio import demo_tone, encode

SCRIPT = "Speaker 1: A short line for the soak."
TWO = "Speaker 1: One short line.\nSpeaker 2: And a second one."
FORMATS = ("wav", "mp3", "opus", "flac", "aac", "pcm")
COMMON = {"inference_steps": 4, "seed": 7}


def sample_wav(seconds: float = 1.0) -> bytes:
    """A voice sample as a client uploads one: the demo voices' tone, as a WAV."""
    return encode(demo_tone(220.0, seconds), "wav")[0]


class Round:
    def __init__(self, url: str, workdir: Path):
        self.url = url
        self.workdir = workdir
        self.requests = 0
        self.errors: list[str] = []

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def expect(self, r: httpx.Response, *codes: int) -> httpx.Response:
        self.requests += 1
        if r.status_code not in codes:
            try:
                said = r.text[:120]
            except httpx.ResponseNotRead:  # a stream: its status says enough
                said = ""
            self.errors.append(f"{r.request.method} {r.request.url.path}: {r.status_code} {said!r}")
        return r

    # the calls -------------------------------------------------------------------
    def speech_whole(self, fmt: str) -> None:
        body = {"model": "tts-1", "input": SCRIPT, "voice": "alloy", "response_format": fmt}
        with self.client() as c:
            self.expect(c.post("/v1/audio/speech", json={**body, **COMMON, "stream": False}), 200)

    def speech_stream(self, fmt: str, sse: bool = False) -> None:
        body = {"model": "tts-1", "input": SCRIPT, "voice": "alloy", "response_format": fmt}
        body |= {**COMMON, "stream": True, "stream_format": "sse" if sse else "audio"}
        with self.client() as c, c.stream("POST", "/v1/audio/speech", json=body) as r:
            for _ in r.iter_bytes():
                pass
            self.expect(r, 200)

    def synthesize(self, stream: bool) -> None:
        body = {"script": TWO, "format": "wav", "stream": stream, **COMMON}
        with self.client() as c, c.stream("POST", "/v1/synthesize", json=body) as r:
            for _ in r.iter_bytes():
                pass
            self.expect(r, 200)

    def leave_mid_stream(self) -> None:
        """A client that reads the first bytes of a stream and closes its connection."""
        body = {"script": TWO, "format": "mp3", "stream": True, **COMMON}
        with self.client() as c, c.stream("POST", "/v1/synthesize", json=body) as r:
            self.expect(r, 200)
            for _ in r.iter_raw(1024):
                break  # leaving the with block closes the connection mid-stream

    def leave_before_answer(self) -> None:
        """A client that gives up on a whole answer before it comes (its read times out)."""
        body = {"script": TWO, "format": "wav", "stream": False, **COMMON}
        self.requests += 1
        with httpx.Client(base_url=self.url, timeout=0.3) as c:
            try:
                c.post("/v1/synthesize", json=body)
            except httpx.TimeoutException:
                pass  # left, as meant

    def leave_mid_upload(self) -> None:
        """A client that sends half of a large (spooled) body and closes its socket."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        body = b'{"script": "Speaker 1: hi", "speakers": [{"audio": "' + b"A" * 200_000
        head = (
            f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) * 2}\r\n\r\n"
        )
        self.requests += 1
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + body)
            time.sleep(0.2)

    def big_upload(self) -> None:
        """A voice sample larger than the spool threshold, inline in a synthesis."""
        b64 = base64.b64encode(sample_wav(3.0)).decode()  # about 190 KB of JSON
        body = {"script": SCRIPT, "speakers": [{"audio": b64}], **COMMON}
        with self.client() as c:
            self.expect(c.post("/v1/synthesize", json=body), 200)

    def job_followed(self) -> None:
        with self.client() as c:
            r = self.expect(c.post("/v1/jobs", json={"script": SCRIPT, **COMMON}), 202)
            if r.status_code != 202:
                return
            job, token = r.json()["id"], r.headers.get("X-Owner-Token", "")
            auth = {"X-Owner-Token": token}
            c.cookies.clear()
            state, deadline = "", time.monotonic() + 120
            while state not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
                state = self.expect(c.get(f"/v1/jobs/{job}", headers=auth), 200).json()["state"]
                time.sleep(0.2)
            if state == "done":
                self.expect(c.get(f"/v1/jobs/{job}/audio", headers=auth), 200)
                ranged = {**auth, "Range": "bytes=0-99"}
                self.expect(c.get(f"/v1/jobs/{job}/audio", headers=ranged), 206)
            self.expect(c.get("/v1/jobs", headers=auth), 200)
            self.expect(c.delete(f"/v1/jobs/{job}", headers=auth), 200)

    def job_cancelled(self) -> None:
        with self.client() as c:
            r = self.expect(c.post("/v1/jobs", json={"script": TWO, **COMMON}), 202)
            if r.status_code != 202:
                return
            job, auth = r.json()["id"], {"X-Owner-Token": r.headers.get("X-Owner-Token", "")}
            c.cookies.clear()
            self.expect(c.post(f"/v1/jobs/{job}/cancel", headers=auth), 200)
            self.expect(c.delete(f"/v1/jobs/{job}", headers=auth), 200)

    def bad_requests(self) -> None:
        with self.client() as c:
            speech = {"model": "tts-1", "input": SCRIPT, "voice": "alloy"}
            self.expect(c.post("/v1/audio/speech", json={**speech, "response_format": "x"}), 400)
            self.expect(c.post("/v1/audio/speech", json={**speech, "voice": "nobody"}), 400, 404)
            self.expect(c.post("/v1/synthesize", json={"script": "   "}), 400, 422)
            self.expect(c.post("/v1/synthesize", content=b"{not json"), 400, 415, 422)
            self.expect(c.post("/v1/synthesize", json={"script": "x" * 30000}), 400, 413, 422)
            bad_audio = {"script": SCRIPT, "speakers": [{"audio": "bm90IGF1ZGlv"}]}
            self.expect(c.post("/v1/synthesize", json=bad_audio), 400, 415, 422)
            self.expect(c.get("/v1/jobs/nope"), 404)

    def voice_cycle(self) -> None:
        name = f"soak-{uuid.uuid4().hex[:8]}"
        with self.client() as c:
            files = {"file": (f"{name}.wav", sample_wav(), "audio/wav")}
            self.expect(c.post("/v1/voices", files=files, data={"name": name}), 201)
            self.expect(c.get(f"/v1/voices/{name}"), 200)
            b64 = base64.b64encode(sample_wav(0.5)).decode()
            body = {"script": SCRIPT, "speakers": [{"voice": name}], **COMMON}
            self.expect(c.post("/v1/synthesize", json=body), 200)
            body = {"script": SCRIPT, "speakers": [{"audio": b64}], **COMMON}
            self.expect(c.post("/v1/synthesize", json=body), 200)
            self.expect(c.delete(f"/v1/voices/{name}"), 200, 204)

    def reads(self) -> None:
        with self.client() as c:
            for path in ("/metrics", "/v1/pool", "/health", "/ready", "/v1/voices", "/v1/models"):
                self.expect(c.get(path), 200)

    def page_generate(self) -> None:
        """The page's Generate through gradio_client, its live player read to the end."""
        from gradio_client import Client

        folder = self.workdir / "gradio-client"
        folder.mkdir(exist_ok=True)
        client = Client(
            self.url, download_files=str(folder), verbose=False, analytics_enabled=False
        )
        try:
            job = client.submit(SCRIPT, 1, None, None, None, None, 1.3, 4, 7, api_name="/generate")
            job.result(timeout=120)
            self.requests += 1
        except Exception as e:  # noqa: BLE001 - listed, the round goes on
            self.errors.append(f"page generate: {type(e).__name__}: {e}"[:200])
        finally:
            client.close()


def one_round(url: str, workdir: Path, page: bool = True) -> dict:
    r = Round(url, workdir)
    calls = [lambda f=f: r.speech_whole(f) for f in FORMATS]
    calls += [lambda: r.speech_stream("mp3"), lambda: r.speech_stream("wav")]
    calls += [lambda: r.speech_stream("wav", sse=True), lambda: r.speech_stream("opus", sse=True)]
    calls += [lambda: r.synthesize(False), lambda: r.synthesize(True)]
    calls += [r.leave_mid_stream, r.leave_mid_stream, r.job_followed, r.job_cancelled]
    calls += [r.leave_before_answer, r.leave_mid_upload, r.big_upload]
    calls += [r.bad_requests, r.voice_cycle, r.reads, r.reads]
    if page:
        calls.append(r.page_generate)
    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(c) for c in calls]:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - listed, the round goes on
                r.errors.append(f"{type(e).__name__}: {e}"[:200])
    return {"requests": r.requests, "errors": r.errors}
