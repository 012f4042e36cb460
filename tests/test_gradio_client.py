"""gradio_client drives the page's public generate endpoint and gets audio; the
status refreshes stay out of the public API."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import soundfile as sf
from gradio_client import Client
from serving import running_server, shared_server

SCRIPT = "Speaker 1: Hello from the page.\nSpeaker 2: And hello back, from the second voice."


@pytest.fixture(scope="module")
def srv(request, tmp_path_factory):
    return shared_server(request, tmp_path_factory)


@pytest.fixture
def client(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    c = Client(srv.url, download_files=str(tmp_path), verbose=False, analytics_enabled=False)
    yield c
    c.close()


def test_generate_endpoint_returns_the_complete_audio(client):
    job = client.submit(
        SCRIPT,
        2,
        "demo-Alice_woman",
        "demo-Dave_man",
        None,
        None,
        1.3,
        10,
        42,
        api_name="/generate",
    )
    _, progress, audio_path = job.result(timeout=120)
    assert 'data-state="done"' in progress and "seed 42" in progress
    first_live = job.outputs()[0][0]
    assert "ui/stream/" in first_live  # the live player, streaming while it is made
    pcm, rate = sf.read(audio_path)
    assert rate == 24000
    assert len(pcm) / rate > 1.0
    assert abs(pcm).max() > 0.05


def test_only_generate_is_public(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert "/generate" in api["named_endpoints"]
    assert not api["unnamed_endpoints"]
    params = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert params[:2] == ["script", "speakers"]


def test_bad_input_through_the_page_is_an_error_saying_what_to_fix(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict("   ", 1, None, None, None, None, 1.3, 10, -1, api_name="/generate")
    assert "script is empty" in str(err.value)


def test_the_pages_steps_take_the_launchs_default_steps(tmp_path, monkeypatch):
    """`--inference_steps 60` (the old demo's flag): the page's steps slider started at
    60 but ended at 50, so Generate, untouched, failed with "Value 60 is greater than
    maximum value 50". It spans what a request may ask (1-100), as the API does."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with running_server(tmp_path, "--inference_steps", "60", "--sim-rtf", "0.01") as s:
        c = Client(s.url, download_files=str(tmp_path), verbose=False, analytics_enabled=False)
        steps = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
        steps = steps["/generate"]["parameters"][7]
        assert steps["parameter_default"] == 60
        _, progress, audio = c.predict(
            "Speaker 1: Hi.", 1, "demo-Alice_woman", None, None, None, 1.3, 60, 1,
            api_name="/generate",
        )  # fmt: skip
        assert 'data-state="done"' in progress and sf.info(audio).duration > 0
        c.close()


class _FakePool:
    """Just what the page reads of a pool: three workers, nothing running."""

    def __init__(self, n: int, max_queue: int):
        self.n, self.max_queue = n, max_queue

    def status(self) -> dict:
        workers = [
            {"id": i, "device": f"cuda:{i}", "name": "GPU", "state": "ready"} for i in range(self.n)
        ]
        return {"queue": {"length": 0, "max": self.max_queue}, "workers": workers}


def _page(tmp_path, workers: int = 3, max_queue: int = 7):
    from fastapi import FastAPI

    from vibevoice_pool.api.metrics import Activity
    from vibevoice_pool.api.speech import Front
    from vibevoice_pool.config import build
    from vibevoice_pool.ui import page as ui
    from vibevoice_pool.voices.library import VoiceLibrary

    cfg = build({"engine": "sim", "max_queue": max_queue, "max_batch_size": 2})
    voices = VoiceLibrary(tmp_path / "voices", max_bytes=1 << 20, max_seconds=60)
    front = Front(_FakePool(workers, max_queue), voices, cfg, activity=Activity())
    app = FastAPI()
    app.state.on_stopping = []
    ui.mount(app, front)
    return app.state.page


def test_gradio_queue_is_sized_from_the_pool(tmp_path):
    """max_size = the pool's queue, default concurrency = its slots, and Generate may
    run slots + queue at once: page requests wait in the pool's one queue."""
    demo = _page(tmp_path, workers=3, max_queue=7).blocks
    assert demo._queue.max_size == 7
    assert demo._queue.default_concurrency_limit == 3 * 2
    generate = next(f for f in demo.fns.values() if f.api_name == "generate")
    assert generate.concurrency_limit == 3 * 2 + 7
    quiet = [f for f in demo.fns.values() if f.api_name in ("panel", "charts")]
    assert len(quiet) == 2
    assert all(not f.queue and f.concurrency_limit is None for f in quiet)


def test_a_voice_added_on_the_page_is_checked_and_offered_to_every_speaker(tmp_path):
    import asyncio

    import gradio as gr
    from serving import wav_bytes

    page = _page(tmp_path)
    good, bad = tmp_path / "take 1.wav", tmp_path / "notes.wav"
    good.write_bytes(wav_bytes())
    bad.write_bytes(b"not audio at all" * 10)
    *updates, message = asyncio.run(page.add_voice(str(good), "", None, None, None, None))
    assert "take_1" in message
    assert all("take_1" in u["choices"] for u in updates) and len(updates) == 4
    # refused: a line under the form, and the speakers' dropdowns left as they are (an
    # error event would mark every one of them failed and hide the chosen voices)
    *updates, message = asyncio.run(page.add_voice(str(bad), "notes", "take_1", None, None, None))
    assert "could not be read as audio" in message
    assert updates == [gr.skip()] * 4
    *updates, message = asyncio.run(page.add_voice(None, "", None, None, None, None))
    assert "Choose an audio file" in message and updates == [gr.skip()] * 4
    zh = SimpleNamespace(headers={"accept-language": "zh-CN,zh;q=0.9"})  # a Chinese browser
    *updates, message = asyncio.run(
        page.add_voice(str(bad), "notes", None, None, None, None, request=zh)
    )
    assert message.startswith("❌ 输入有误：") and "could not be read as audio" in message
    listed = page.job_voices(["take_1", "gone"])  # the Jobs tab's list follows the uploads
    assert "take_1" in listed["choices"] and listed["value"] == ["take_1"]


def test_the_pages_files_stay_in_this_servers_private_folder(srv, client):
    """Gradio kept the page's audio in <tmp>/gradio: shared by every server on the
    machine (a server that stops deletes its files, which another may serve) and
    open to other users. Each server now has its own, mode 0700."""
    import os

    client.predict(SCRIPT, 2, None, None, None, None, 1.3, 10, 7, api_name="/generate")
    tmp = srv.log_path.parent  # the server's TMPDIR
    private = tmp / f"vibevoice-pool-{os.getuid()}"
    assert private.stat().st_mode & 0o777 == 0o700
    made = list((private / f"gradio-{srv.port}").rglob("*.wav"))
    assert made, sorted(p.name for p in tmp.iterdir())
    assert not (tmp / "gradio").exists()
