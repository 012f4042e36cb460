"""The page's per-tab state: live audio streams and the requests each tab owns.

LiveStreams   a request's audio as it arrives, served at
              /ui/stream/<token>.wav as one growing WAV the browser's
              <audio> plays while it downloads (no ffmpeg, no re-encoding).
              The token is unguessable and only handed to the tab that
              made the request, so with an API key the route needs no
              Bearer header (auth.ApiKeyMiddleware asks `allows`).
TabRequests   Gradio session hash -> the RequestHandles that tab started,
              so Stop cancels this tab's request and nobody else's.
"""

from __future__ import annotations

import asyncio
import html
import secrets
import threading
import time

import numpy as np
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from vibevoice_pool import audio
from vibevoice_pool.api.errors import plain_error

PREFIX = "/ui/stream/"
KEEP_S = 300.0  # a finished stream stays playable this long
POLL_S = 0.05


class LiveAudio:
    """One request's audio so far, as 16-bit PCM chunks."""

    def __init__(self, token: str):
        self.token = token
        self._chunks: list[bytes] = []
        self.done = False
        self.closed_at = 0.0

    def push(self, pcm: np.ndarray) -> None:
        self._chunks.append(audio.to_int16(pcm).astype("<i2").tobytes())

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.closed_at = time.monotonic()

    def chunks_from(self, index: int) -> list[bytes]:
        return self._chunks[index:]


class LiveStreams:
    def __init__(self, keep_s: float = KEEP_S):
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._live: dict[str, LiveAudio] = {}

    def new(self) -> LiveAudio:
        self.prune()
        live = LiveAudio(secrets.token_urlsafe(24))
        with self._lock:
            self._live[live.token] = live
        return live

    def get(self, token: str) -> LiveAudio | None:
        with self._lock:
            return self._live.get(token)

    def prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            for token in [
                k for k, v in self._live.items() if v.done and now - v.closed_at > self.keep_s
            ]:
                del self._live[token]

    def allows(self, path: str) -> bool:
        """Whether `path` is the stream of a live (or recent) request."""
        if not path.startswith(PREFIX):
            return False
        return self.get(path[len(PREFIX) :].removesuffix(".wav")) is not None

    @staticmethod
    def url(live: LiveAudio) -> str:
        return f"{PREFIX.lstrip('/')}{live.token}.wav"  # relative: works under a proxy prefix

    def install(self, app: FastAPI) -> None:
        @app.get(PREFIX + "{name}", include_in_schema=False)
        async def stream(name: str):
            live = self.get(name.removesuffix(".wav"))
            if live is None:
                return plain_error(404, "not_found", "no such audio stream (it may have expired)")

            async def body():
                yield audio.wav_header_for_stream()
                sent = 0
                while True:
                    fresh = live.chunks_from(sent)
                    for data in fresh:
                        yield data
                    sent += len(fresh)
                    if live.done and not live.chunks_from(sent):
                        return
                    await asyncio.sleep(POLL_S)

            return StreamingResponse(
                body(), media_type="audio/wav", headers={"Cache-Control": "no-store"}
            )


class TabRequests:
    """Which requests each browser tab (Gradio session) has running."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_tab: dict[str, set] = {}

    def add(self, tab: str, handle) -> None:
        if not tab:
            return  # no session to stop it from: nobody else's Stop may reach it
        with self._lock:
            self._by_tab.setdefault(tab, set()).add(handle)

    def remove(self, tab: str, handle) -> None:
        with self._lock:
            handles = self._by_tab.get(tab)
            if handles is not None:
                handles.discard(handle)
                if not handles:
                    del self._by_tab[tab]

    def cancel(self, tab: str) -> int:
        """Cancel this tab's requests; returns how many were running."""
        if not tab:
            return 0
        with self._lock:
            handles = list(self._by_tab.get(tab, ()))
        for handle in handles:
            handle.cancel()
        return len(handles)


def player_html(live, request_id: str) -> str:
    """The page's live player: an <audio> on the request's growing WAV."""
    url = LiveStreams.url(live)
    return (
        f'<div class="vv-live" data-request="{request_id}">'
        f'<audio controls autoplay preload="auto" src="{url}"></audio></div>'
    )


def progress_html(state: str, text: str, pct: float, request_id: str) -> str:
    """Progress of a request: `state` is waiting, running, done, stopped or failed."""
    return (
        f'<div class="vv-progress" data-state="{state}" data-request="{request_id}">'
        f"{html.escape(text)}"
        f'<div class="vv-progress-bar"><div style="width:{pct:.0f}%"></div></div></div>'
    )
