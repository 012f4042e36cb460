"""The page's pure parts, without a server: the panel's states and formats, the
language choice, the charts' sampler, the request activity, the live streams."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from vibevoice_pool.api.metrics import Activity
from vibevoice_pool.jobs.records import JobErrorKind
from vibevoice_pool.pool import events as ev
from vibevoice_pool.pool.states import shown_state
from vibevoice_pool.ui.charts import History, render
from vibevoice_pool.ui.i18n import EN, ZH, ZH_ERRORS, explain, pick_language
from vibevoice_pool.ui.live import LiveStreams, TabRequests
from vibevoice_pool.ui.panel import render_html, render_table, views
from workers.wire import messages as m


def worker(i: int, state: str = "ready", restarts: int = 0, **extra) -> dict:
    return {
        "id": i,
        "device": f"cuda:{i}",
        "name": "NVIDIA H100",
        "state": state,
        "pid": 100 + i,
        "restarts": restarts,
        "inflight": 1,
        "mem_used_bytes": 16.2e9,
        "mem_total_bytes": 40e9,
        "util": 50.2,
        "current_request": 12,
        "error": "",
    } | extra


def status(*workers) -> dict:
    return {"queue": {"length": 3, "max": 50}, "policy": "least_work", "workers": list(workers)}


@pytest.mark.parametrize(
    "state,restarts,shown",
    [
        ("ready", 0, "ready"),
        ("busy", 0, "busy"),
        ("backoff", 1, "recovering"),
        ("starting", 0, "starting"),
        ("starting", 2, "recovering"),  # a respawn on its way up
        ("failed", 3, "failed"),
        ("unavailable", 0, "unavailable"),
        ("something-new", 0, "starting"),
    ],
)
def test_shown_state(state, restarts, shown):
    assert shown_state({"state": state, "restarts": restarts}) == shown


def test_panel_html_has_the_old_demos_content_per_worker():
    html = render_html(status(worker(0), worker(1, "backoff", restarts=1)), "zh")
    blocks = re.findall(r'<div class="vv-worker[^"]*" data-worker="(\d)" data-state="(\w+)"', html)
    assert blocks == [("0", "ready"), ("1", "recovering")]
    assert "✅ GPU 0: NVIDIA H100 [就绪]" in html
    assert "♻️ GPU 1: NVIDIA H100 [恢复中]" in html
    assert "📊 队列: 1 | 内存: [████████░░░░░░░░░░░░] 40.5% (16.2/40.0GB)" in html
    assert "⚡ 利用率: [██████████░░░░░░░░░░] 50.2%" in html
    assert "🔁 重启: 1 | 🎙️ 当前请求: #12" in html
    assert "等待队列: 3/50" in html


def test_a_cpu_workers_label_is_in_the_pages_language():
    cpu = worker(0, device="cpu:0", name="SimEngine x1")
    assert "工作进程 0 (cpu:0): SimEngine x1" in render_html(status(cpu), "zh")
    assert "Worker 0 (cpu:0)" in render_html(status(cpu), "en")
    assert [v.short for v in views(status(cpu), "zh")] == ["工作进程 0"]


def test_panel_html_escapes_what_it_shows():
    html = render_html(status(worker(0, name="<script>x</script>")))
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_table_has_a_row_per_worker_and_two_gpus_share_a_label_with_ids():
    text = render_table(
        status(
            worker(0), worker(1, device="cuda:0", state="failed", error="CUDA error: boot failed")
        )
    )
    rows = [line for line in text.splitlines() if line.startswith(("✅", "❌"))]
    assert len(rows) == 2
    assert rows[0].startswith("✅ GPU 0 #0: NVIDIA H100") and "ready" in rows[0]
    assert rows[1].startswith("❌ GPU 0 #1") and "failed" in rows[1]
    assert "⚠️ CUDA error: boot failed" in text
    assert [v.short for v in views(status(worker(0)))] == ["GPU 0"]


@pytest.mark.parametrize(
    "header,lang",
    [
        (None, "en"),
        ("", "en"),
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        ("en-US,en;q=0.9,zh-CN;q=0.8", "en"),
        ("fr-FR,zh-TW;q=0.7,en;q=0.5", "zh"),
        ("de", "en"),
        ("zh;q=0,en;q=0.1", "en"),
        ("zh;q=oops", "en"),
    ],
)
def test_language_follows_accept_language(header, lang):
    assert pick_language(header) == lang


def test_both_languages_have_every_string():
    assert EN.keys() == ZH.keys()
    for key in EN:
        assert set(re.findall(r"{(\w+)", EN[key])) == set(re.findall(r"{(\w+)", ZH[key])), key


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _handle(rid: str, slot: int | None, samples: int = 0, submitted: float = 100.0):
    return SimpleNamespace(
        request=SimpleNamespace(id=rid, priority=m.Priority.INTERACTIVE.value),
        worker=slot,
        submitted_at=submitted,
        samples=samples,
        queue_s=lambda: 0.0,  # the latency histograms (test_latency_metrics.py)
        started_at=None,
        finished_at=None,
    )


def test_activity_counts_busy_time_outcomes_and_delivered_audio():
    clock = _Clock()
    a = Activity(clock=clock)
    h1, h2 = _handle("a", 0), _handle("b", 0)
    for h in (h1, h2):
        a.on_event(ev.Dispatched(h.request, h, 0, 0.0, 0))
        a.on_event(ev.Started(h.request, h, 0, 0.0))
    clock.now = 102.0
    h1.samples = m.SAMPLE_RATE  # one second handed to the client so far
    assert a.busy_seconds(0) == pytest.approx(2.0)
    assert a.delivered_seconds() == pytest.approx(1.0)
    a.on_event(ev.Finished(h1.request, h1, m.Done("a", 1.0, 2.0)))
    clock.now = 103.0
    a.on_event(ev.Finished(h2.request, h2, m.Failed("b", m.ErrorKind.CANCELLED, "cancelled")))
    clock.now = 110.0  # idle time is not busy time
    assert a.busy_seconds(0) == pytest.approx(3.0)  # two overlapping requests: 3 s, not 5
    outcomes, _, audio = a.snapshot()
    assert outcomes == {("0", "completed"): 1, ("0", "cancelled"): 1}
    assert audio == {0: 1.0}
    a.refused("bad_input")
    assert a.snapshot()[1] == {"bad_input": 1}


def test_history_keeps_recent_samples_and_computes_audio_per_second():
    clock = _Clock()
    delivered = [0.0]
    pool = SimpleNamespace(status=lambda: status(worker(0), worker(1, util=0.0)))
    activity = SimpleNamespace(delivered_seconds=lambda: delivered[0])
    h = History(pool, activity, keep_s=10, clock=clock)
    for _ in range(20):
        clock.now += 1
        delivered[0] += 2.0  # two seconds of audio each second
        h.sample_once()
    samples = h.samples()
    assert len(samples) == 11  # the last 10 s
    assert samples[-1].rate == pytest.approx(2.0)
    assert samples[-1].util == {0: 50.2, 1: 0.0}
    assert samples[-1].mem[0] == pytest.approx(40.5)
    html = render(samples, {0: "GPU 0", 1: "GPU 1"}, "en", span_s=10)
    assert html.count("<svg") == 4 and html.count("<polyline") == 2 + 2 + 1 + 1  # a line per worker
    assert "collecting" in render([], {}, "en")


def test_live_streams_and_tabs():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vibevoice_pool.pool.handle import RequestHandle

    streams = LiveStreams(keep_s=0)
    handle = RequestHandle(m.Request(id="r1", turns=(m.Turn(0, "hi"),), seed=1), lambda _: None)
    url = "/" + LiveStreams.url(streams.add(handle))
    assert streams.allows(url) and not streams.allows("/ui/stream/guess.wav")
    app = FastAPI()
    app.include_router(streams.router())
    handle.push(m.Started("r1"))
    handle.push(m.Chunk("r1", 0, np.full(10, 0.5, dtype=np.float32)))
    handle.push(m.Done("r1", 10 / m.SAMPLE_RATE, 0.1))
    with TestClient(app) as client:
        wav = client.get(url).content
    assert len(wav) == 44 + 20  # the header, then ten 16-bit samples
    streams.prune()
    assert not streams.allows(url)  # kept 0 s after it ended

    tabs = TabRequests()
    cancelled = []

    class Handle:
        def __init__(self, name):
            self.name = name

        def cancel(self):
            cancelled.append(self.name)

    mine, theirs = Handle("mine"), Handle("theirs")
    tabs.add("tab-a", mine)
    tabs.add("tab-b", theirs)
    assert tabs.cancel("tab-a") == 1 and cancelled == ["mine"]
    tabs.remove("tab-a", mine)
    assert tabs.cancel("tab-a") == 0 and cancelled == ["mine"]


def test_the_progress_line_marks_a_resumed_row():
    from types import SimpleNamespace

    from vibevoice_pool.ui.page import Page

    page = SimpleNamespace(where=lambda slot: f"worker {slot}")
    fresh = SimpleNamespace(id="a", worker=1, resumed=0)
    again = SimpleNamespace(id="b", worker=0, resumed=1)
    assert "resumed" not in Page._running(page, "en", fresh, 24_000, 10.0)
    assert "resumed from its last step" in Page._running(page, "en", again, 24_000, 10.0)
    assert "继续" in Page._running(page, "zh", again, 24_000, 10.0)


def test_every_error_code_reads_in_chinese_with_the_servers_own_detail():
    codes = {k.value for k in m.ErrorKind} | {k.value for k in JobErrorKind}
    assert codes <= ZH_ERRORS.keys()
    said = explain("zh", "overloaded", "the queue is full (64 waiting)")
    assert said == "服务器繁忙，请稍后再试：the queue is full (64 waiting)"
    assert explain("en", "overloaded", "the queue is full") == "the queue is full"


def test_a_page_request_lets_its_audio_go_once_its_replay_time_is_over(sim_pool, tmp_path):
    """The live player may replay a request's audio for keep_s after it ends; then the
    handle (all its audio) must go, also when no later Generate comes to prune it."""
    import asyncio
    import re

    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.ui.page import Page
    from vibevoice_pool.voices.library import VoiceLibrary, ensure_demo_voices

    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:1", sim_rtf=0.01) as pool:
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        front = Front(pool, voices, pool.cfg)
        create_app(front)  # (its activity)
        page = Page(front)
        page.streams.keep_s = 0.5

        async def generate_then_idle():
            script = "Speaker 1: a few words for the page"
            outs = [o async for o in page.generate(script, 1, None, None, None, None, 1.3, 5, 7)]
            url = "/" + re.search(r'src="([^"]+)"', outs[0][0]).group(1)
            assert page.streams.allows(url)  # replayable for a while
            await asyncio.sleep(2.0)  # the page stays idle: no other Generate
            return url, outs[-1][2]

        url, (rate, pcm) = asyncio.run(generate_then_idle())
        assert rate == m.SAMPLE_RATE and len(pcm) > 0  # it made its audio
        assert not page.streams.allows(url)  # and let it go


def test_the_page_keeps_the_state_of_a_bounded_number_of_sessions(sim_pool, tmp_path):
    """Each page session (a tab, a gradio_client) left its state in the server, about
    125 KiB, until Gradio's default of 10,000 sessions: the parent's slow climb in the
    soak (bench/soak), up to about 1.2 GB. The page now keeps the PAGE_SESSIONS used
    most recently; an older one gets a fresh state if it comes back."""
    from starlette.routing import Mount

    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.ui.layout import PAGE_SESSIONS
    from vibevoice_pool.ui.page import mount
    from vibevoice_pool.voices.library import VoiceLibrary, ensure_demo_voices

    ensure_demo_voices(tmp_path / "voices")
    with sim_pool(gpus="cpu:1") as pool:
        voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
        front = Front(pool, voices, pool.cfg)
        app = mount(create_app(front), front)
        gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == "")
        held = gradio_app.state_holder
        for i in range(PAGE_SESSIONS + 50):  # what each session's first event does
            held[f"session-{i}"]
        assert len(held.session_data) == PAGE_SESSIONS
        assert "session-0" not in held and f"session-{PAGE_SESSIONS + 49}" in held
