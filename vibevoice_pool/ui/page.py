"""The Gradio page at `/`, mounted on the API's FastAPI app (server.build_app).

    script, 1-4 speakers with a voice each, cfg / steps / seed
      -> Generate: Front.build_request -> Pool.submit -> a RequestHandle, read twice:
         the <audio> player streams ui/stream/<token>.wav (live.py), and Generate
         waits on its events: progress (audio seconds made against the estimate),
         then Done -> the complete audio (download)
      -> Stop: cancels the RequestHandles of this tab (Gradio session) only
    GPU status panel (panel.py) every second, charts (charts.py) every 3 s:
      gr.Timer ticks with queue=False, so they keep updating when the queue is full
    voice upload -> VoiceLibrary.add (the same checks as POST /v1/voices)

Queue: Gradio's queue is sized from the pool (max_size = max_queue,
default_concurrency_limit = total worker slots), and Generate may run up to
slots + max_queue at once, so a page request goes straight into the pool's one
admission queue and waits there in order with the API's requests: the page
never holds a second queue of its own. A full pool queue is an error on the page.
Languages: i18n.py (labels by the browser's language, server text by its
Accept-Language).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.routing import Mount

from vibevoice_pool import audio
from vibevoice_pool.api.auth import page_login
from vibevoice_pool.api.live_keys import LiveKeys, PageSessions
from vibevoice_pool.api.speech import Speaker, SynthesizeBody, describe_invalid
from vibevoice_pool.script import MAX_SPEAKERS
from vibevoice_pool.ui.charts import History, render
from vibevoice_pool.ui.i18n import explain, gradio_i18n, language_of, t
from vibevoice_pool.ui.layout import PAGE_CSS, PAGE_HEAD, build
from vibevoice_pool.ui.live import LiveStreams, TabRequests, player_html, progress_html
from vibevoice_pool.ui.panel import render_html, views
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool")

# Stop reasons the status line explains: a cap ended the speech, not the model.
CUT_REASONS = (
    m.StopReason.RUNAWAY_CAP.value,
    m.StopReason.MAX_AUDIO.value,
    m.StopReason.CONTEXT.value,
)
PROGRESS_EVERY_S = 0.3  # at most this often a progress update goes to the browser


def total_slots(front) -> int:
    """Requests the pool can run at once: every worker's batch size."""
    return max(1, len(front.pool.status()["workers"]) * front.cfg.max_batch_size)


class Page:
    """The page's handlers and per-tab state; layout.build() lays them out."""

    def __init__(self, front):
        self.front = front
        self.pool = front.pool
        self.streams = LiveStreams()
        self.tabs = TabRequests()
        self.history = History(front.pool, front.activity)
        # Generate may run this many at once: every slot plus the pool's whole queue,
        # so page requests wait in the pool's admission queue, not in Gradio's.
        self.generate_limit = total_slots(front) + front.cfg.max_queue

    # ---- status ----------------------------------------------------------

    def panel(self, request: gr.Request = None) -> str:
        return render_html(self.pool.status(), language_of(request))

    def charts(self, request: gr.Request = None) -> str:
        status, lang = self.pool.status(), language_of(request)
        labels = {v.id: v.short for v in views(status, lang)}
        return render(self.history.samples(), labels, lang)

    def where(self, slot: int | None) -> str:
        return self.pool.where(slot)

    # ---- voices ----------------------------------------------------------

    def voice_names(self) -> list[str]:
        return self.front.voices.names()

    def default_voice(self, speaker: int) -> str | None:
        """A speaker's voice until one is chosen: a preset, as the API's defaults
        (never someone's upload that sorts first); any voice when none is a preset."""
        names = self.front.voices.presets() or self.voice_names()
        return names[speaker % len(names)] if names else None

    def refresh_voices(self, *current):
        names = self.voice_names()
        out = []
        for i in range(MAX_SPEAKERS):
            keep = current[i] if i < len(current) and current[i] in names else None
            default = self.default_voice(i)
            out.append(gr.update(choices=names, value=keep or default))
        return out

    def job_voices(self, chosen):
        """The Jobs tab's voice list: every voice now, what was chosen kept."""
        names = self.voice_names()
        return gr.update(choices=names, value=[v for v in chosen or () if v in names])

    async def add_voice(self, path, name, v1, v2, v3, v4, request: gr.Request = None):
        """A refused sample is a toast and a line under the form; the speakers' voices
        stay as they are (an error event would mark every dropdown failed)."""
        lang = language_of(request)  # named voices: Gradio passes no request after *args
        current = (v1, v2, v3, v4)
        if not path:
            return self._voice_refused(lang, t(lang, "no_voice_file"))
        data = await asyncio.to_thread(Path(path).read_bytes)
        try:
            stored = await asyncio.to_thread(
                self.front.voices.add,
                (name or "").strip() or Path(path).stem,
                data,
                owner=self._uploader(request),
            )
        except m.PoolError as e:
            self.front.refused(e)
            return self._voice_refused(lang, explain(lang, e.kind.value, e.message))
        return [*self.refresh_voices(*current), t(lang, "voice_added", name=stored)]

    def _uploader(self, request) -> str:
        """A login under a key's name uploads as that key (its voices, as by the API)."""
        keys = getattr(self.front, "keys", None)
        caller = keys.by_name(getattr(request, "username", None)) if keys else None
        return caller.owner if caller is not None else "page"

    @staticmethod
    def _voice_refused(lang: str, message: str) -> list:
        gr.Warning(message, title=t(lang, "toast.warning"))
        return [gr.skip()] * MAX_SPEAKERS + [t(lang, "voice_refused", message=message)]

    # ---- generate / stop ---------------------------------------------------

    def _body(self, script, speakers, voices, cfg_scale, steps, seed) -> SynthesizeBody:
        n = min(MAX_SPEAKERS, max(1, int(speakers or 1)))
        seed = None if seed is None or float(seed) < 0 else int(seed)
        return SynthesizeBody(
            script=script or "",
            speakers=[Speaker(voice=v or None) for v in list(voices)[:n]],
            cfg_scale=float(cfg_scale),
            inference_steps=int(steps) if steps else None,
            seed=seed,
            stream=True,
        )

    async def generate(
        self, script, speakers, v1, v2, v3, v4, cfg_scale, steps, seed, request: gr.Request = None
    ):
        lang = language_of(request)
        tab = getattr(request, "session_hash", None) or ""
        refused = None
        try:
            body = self._body(script, speakers, (v1, v2, v3, v4), cfg_scale, steps, seed)
            req = await asyncio.to_thread(self.front.build_request, body)
            handle = self.pool.submit(req)
        except ValidationError as e:
            self.front.activity.refused(m.ErrorKind.BAD_INPUT.value)
            refused = explain(lang, m.ErrorKind.BAD_INPUT.value, describe_invalid(e.errors()))
        except m.PoolError as e:
            self.front.refused(e)
            refused = explain(lang, e.kind.value, e.message)
        if refused is not None:  # the last run's result goes: it is not this input's
            yield "", progress_html("failed", t(lang, "failed", message=refused), 0, ""), None
            raise gr.Error(refused, title=t(lang, "toast.error"))
        live = self.streams.add(handle)  # its <audio> reads the handle too
        self.tabs.add(tab, handle)
        est = max(0.5, req.est_audio_s * self.pool.work_ratio())
        t0 = last = time.monotonic()
        got = 0
        try:
            waiting = t(lang, "waiting", n=self.pool.queue_length())
            yield (
                player_html(live, handle.id),
                progress_html("waiting", waiting, 0, handle.id),
                None,
            )
            try:
                await handle.started()
                yield gr.skip(), self._running(lang, handle, 0, est), gr.skip()
                async for pcm in handle.stream():
                    got += len(pcm)
                    if time.monotonic() - last >= PROGRESS_EVERY_S:
                        last = time.monotonic()
                        yield gr.skip(), self._running(lang, handle, got, est), gr.skip()
            except m.PoolError as e:
                if e.kind != m.ErrorKind.CANCELLED:
                    said = explain(lang, e.kind.value, e.message)
                    text = t(lang, "failed", message=said)
                    yield gr.skip(), progress_html("failed", text, 0, handle.id), None
                    raise gr.Error(said, title=t(lang, "toast.error")) from None
                pcm = audio.to_int16(handle.audio())
                text = t(lang, "stopped", secs=len(pcm) / m.SAMPLE_RATE)
                partial = (m.SAMPLE_RATE, pcm) if len(pcm) else None
                yield gr.skip(), progress_html("stopped", text, 0, handle.id), partial
                return
            done = handle.outcome
            pcm = await asyncio.to_thread(lambda: audio.to_int16(handle.audio()))
            text = t(
                lang,
                "done",
                secs=len(pcm) / m.SAMPLE_RATE,
                seed=handle.seed,
                wall=time.monotonic() - t0,
                where=self.where(handle.worker),
            )
            if done.stop_reason in CUT_REASONS:  # say when a cap, not the model, ended it
                factor = self.front.cfg.runaway_factor
                text += t(lang, f"cut.{done.stop_reason}", factor=factor)
            yield gr.skip(), progress_html("done", text, 100, handle.id), (m.SAMPLE_RATE, pcm)
        finally:
            self.tabs.remove(tab, handle)
            if not handle.done:
                handle.cancel()  # the tab went away, or Gradio ended the event
            # Its player may replay it for keep_s; after that its audio goes, even when
            # no other Generate comes to prune it (an idle page held it for ever).
            asyncio.get_running_loop().call_later(self.streams.keep_s + 1, self.streams.prune)

    def _running(self, lang: str, handle, got: int, est: float) -> str:
        """The progress bar while a worker makes the audio (`got` samples so far)."""
        secs = got / m.SAMPLE_RATE
        pct = min(99.0, 100 * secs / est)
        text = t(
            lang, "running", got=secs, est=max(est, secs), pct=pct, where=self.where(handle.worker)
        )
        if handle.resumed:  # it lost its worker, was preempted or moved, and went on
            text += t(lang, "resumed")
        return progress_html("running", text, pct, handle.id)

    def stop(self, request: gr.Request = None) -> None:
        """Cancel what this tab (and only this tab) is generating, and say so."""
        tab = getattr(request, "session_hash", None) or ""
        n = self.tabs.cancel(tab)
        log.info("Stop from a tab: %d request(s) cancelled", n)
        lang = language_of(request)
        gr.Info(t(lang, "stopping" if n else "nothing_to_stop"), title=t(lang, "toast.info"))


def _open_share_link(host: str, port: int) -> None:
    """Ask Gradio's share server for a public link (only with --share)."""
    import secrets

    from gradio import networking

    try:
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = networking.setup_tunnel(local, port, secrets.token_urlsafe(32), None, None)
        log.warning("🌍 Public share link (anyone with it can use this server): %s", url)
    except Exception as e:  # no network, blocked, or the share server refused
        log.error("Could not open a share link: %s: %s", type(e).__name__, e)


def mount(app: FastAPI, front) -> FastAPI:
    """Add the page's audio stream route, then mount the page at `/`, last (it
    answers every path no route took), and return the app."""
    page = Page(front)
    cfg = front.cfg
    demo = page.blocks = build(page)
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=total_slots(front))
    app.router.routes.extend(page.streams.router().routes)  # as create_app adds its routers
    front.stream_tokens = page.streams
    key = front.keys or cfg.api_key  # auth.KeyRing: every key logs in
    # a keys file read again: a login ends with its key (live_keys.PageSessions)
    sessions = PageSessions() if isinstance(front.keys, LiveKeys) else None
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        server_name=cfg.host,
        server_port=cfg.port,
        auth=page_login(key, sessions.logged_in if sessions else None) if key else None,
        auth_message=(
            "Password: an API key of this server. User name: your key's name to share "
            "its jobs with the API, or any other name. / 密码：本服务器的 API 密钥。"
            "用户名：填密钥的名称可与 API 共用其任务，或填任意其他名称。"
        )
        if key
        else None,
        max_file_size=cfg.max_upload_bytes,
        i18n=gradio_i18n(),
        css=PAGE_CSS,
        head=PAGE_HEAD,
        footer_links=["api", "settings"],
        run_history=False,
        ssr_mode=False,
        mcp_server=False,
    )
    gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == "")
    if sessions is not None:
        sessions.app = gradio_app
        front.keys.on_revoke(sessions.revoke)
    # Idle tabs hold a keep-alive stream open for ever; end those when the server stops.
    app.state.on_stopping.append(gradio_app.stop_event.set)
    if cfg.share and not key:
        log.warning("--share without --api-key: anyone with the link can use these GPUs")
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        page.history.start()
        if cfg.share:
            threading.Thread(
                target=_open_share_link, args=(cfg.host, cfg.port), daemon=True
            ).start()
        try:
            async with inner(a) as state:
                yield state
        finally:
            page.history.stop()

    app.router.lifespan_context = lifespan
    app.state.page = page
    return app
