"""What a streaming client that leaves mid-answer leaves behind in the parent: nothing.

A request's handle holds all the audio the request has made. Once the request has
ended, nothing may keep it alive, not even until the next full garbage collection: on
an idle server that collection never comes, and a long request's audio is hundreds of
megabytes. The app is driven as uvicorn drives it (ASGI spec 2.3: the client's leaving
is an http.disconnect from `receive`), with the garbage collector off.
"""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import pytest
from conftest import wait_until

from vibevoice_pool.api.app import create_app
from vibevoice_pool.api.speech import Front
from vibevoice_pool.voices.library import VoiceLibrary, ensure_demo_voices

LONG = "a long story that takes some time to tell. " * 40  # ~115 s of audio


async def _leave_after(app, path: str, body: dict, pieces: int) -> list[dict]:
    """POST `body`, take `pieces` pieces of the answer's body, then leave."""
    raw = json.dumps(body).encode()
    got: list[dict] = []
    asked = False
    left = asyncio.Event()

    async def receive():
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        got.append(message)
        if sum(m["type"] == "http.response.body" for m in got) >= pieces:
            left.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 60)
    return got


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/synthesize", {"script": "Speaker 1: " + LONG, "stream": True, "format": "pcm"}),
        ("/v1/audio/speech", {"model": "tts-1", "input": LONG, "voice": "alloy", "stream": True}),
        (
            "/v1/audio/speech",
            {"model": "tts-1", "input": LONG, "voice": "alloy", "stream_format": "sse"},
        ),
    ],
)
def test_a_stream_whose_client_left_frees_its_audio_at_once(sim_pool, tmp_path, path, body):
    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:1", sim_rtf=0.05) as pool:
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        app = create_app(Front(pool, voices, pool.cfg))
        handles: list[weakref.ref] = []
        pool.subscribe(lambda e: e.kind == "dispatched" and handles.append(weakref.ref(e.handle)))
        gc.collect()
        gc.disable()
        try:
            got = asyncio.run(_leave_after(app, path, body, pieces=4))
            assert got[0]["status"] == 200 and len(got) >= 5  # it streamed, then the client left
            wait_until(lambda: len(handles) == 1, 10, what="the request's dispatch")

            def ended() -> bool:
                handle = handles[0]()
                return handle is None or handle.done  # (no reference kept here)

            wait_until(ended, 30, 0.05, "the cancelled request to end")
            wait_until(lambda: pool.dispatcher.pending() == 0, 10, what="the pool to let it go")
            assert handles[0]() is None, "the handle (all its audio) outlived its request"
        finally:
            gc.enable()
