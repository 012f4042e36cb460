"""The page's per-tab state: live audio streams and the requests each tab owns.

LiveStreams   a request's audio as it arrives, served at
              /ui/stream/<token>.wav as one growing WAV the browser's
              <audio> plays while it downloads (no ffmpeg, no re-encoding).
              The route is one more reader of the request's handle: it
              waits for each chunk, it does not poll.
              The token is unguessable and only handed to the tab that
              made the request, so with an API key the route needs no
              Bearer header (auth.ApiKeyMiddleware asks `allows`).
TabRequests   Gradio session hash -> the RequestHandles that tab started,
              so Stop cancels this tab's request and nobody else's.
"""

from __future__ import annotations

import html
import secrets
import threading
import time

from fastapi import APIRouter

from vibevoice_pool import audio
from vibevoice_pool.api.errors import plain_error
from vibevoice_pool.api.speech import WatchedStream
from vibevoice_pool.pool.handle import RequestHandle
from workers.wire import messages as m

PREFIX = "/ui/stream/"
KEEP_S = 300.0  # a finished stream stays playable this long


class LiveStreams:
    """Stream token -> the RequestHandle whose audio it plays."""

    def __init__(self, keep_s: float = KEEP_S):
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._live: dict[str, RequestHandle] = {}

    def add(self, handle: RequestHandle) -> str:
        """A new unguessable token for `handle`'s audio."""
        self.prune()
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._live[token] = handle
        return token

    def get(self, token: str) -> RequestHandle | None:
        with self._lock:
            return self._live.get(token)

    def prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            for token in [
                k
                for k, h in self._live.items()
                if h.finished_at is not None and now - h.finished_at >= self.keep_s
            ]:
                del self._live[token]

    def allows(self, path: str) -> bool:
        """Whether `path` is the stream of a live (or recent) request."""
        if not path.startswith(PREFIX):
            return False
        return self.get(path[len(PREFIX) :].removesuffix(".wav")) is not None

    @staticmethod
    def url(token: str) -> str:
        return f"{PREFIX.lstrip('/')}{token}.wav"  # relative: works under a proxy prefix

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get(PREFIX + "{name}", include_in_schema=False)
        async def stream(name: str):
            handle = self.get(name.removesuffix(".wav"))
            if handle is None:
                return plain_error(404, "not_found", "no such audio stream (it may have expired)")

            async def body():
                yield audio.wav_header_for_stream()
                try:
                    async for pcm in handle.stream():
                        yield audio.to_int16(pcm).astype("<i2").tobytes()
                except m.PoolError:
                    pass  # the page's Generate handler says why; the player just ends

            return WatchedStream(
                body(), media_type="audio/wav", headers={"Cache-Control": "no-store"}
            )

        return router


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


def player_html(token: str, request_id: str) -> str:
    """The page's live player: an <audio> on the request's growing WAV."""
    url = LiveStreams.url(token)
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
