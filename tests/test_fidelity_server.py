"""A real server on the tiny model: a script that is not valid Unicode is refused with
400 on every route before any worker sees it; the length estimate knows the script
(an English and a Chinese dialogue within 30% of their natural length). And on the
tiny weights served as real weights (no scripted end, so nothing but a cap ends a
row): a row cut by the runaway cap says so (X-Stop-Reason, the OpenAI stream's done
event, the page's status line, a job's view), and a Chinese script is never cut before
twice its natural length."""

from __future__ import annotations

import base64
import io
import json
import math
from urllib.parse import unquote

import httpx
import pytest
import soundfile as sf
from conftest import Server, pid_alive, wait_until

from vibevoice_pool.script import parse_script
from workers.engines.vibevoice.engine import RUNAWAY_FLOOR_S, TOKENS_PER_S
from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import Request, Turn

pytestmark = pytest.mark.slow

HOP = 3200
FACTOR = 2.0  # the default runaway factor (microsoft's max_length_times)
SURROGATE = "Speaker 1: Hello \ud800 there"
# 50 words: about 20 s at 150 words a minute
ENGLISH = (
    "Speaker 1: Did you finish the report for tomorrow's meeting?\n"
    "Speaker 2: Almost. I still need the sales figures from March, and a chart or two.\n"
    "Speaker 1: I can send those tonight. Do you want the regional numbers as well?\n"
    "Speaker 2: Yes, please. The board will ask about the north first, so put that on top."
)
# 76 Han characters: about 17 s at 4-5 characters a second
CHINESE = (
    "Speaker 1: 你今天下午有空吗？我们一起去看电影吧。\n"
    "Speaker 2: 好啊，不过我要先把工作做完，大概五点以后才能出门。\n"
    "Speaker 1: 没关系，我们可以看七点那场，看完再去吃晚饭。\n"
    "Speaker 2: 太好了，那就这么定了，我到时候给你打电话。"
)
NATURAL_S = {"english": 50 / 2.5, "chinese": 76 / 4.5}


def serve(args: list[str], tmp):
    s = Server([*args, "--gpus", "cpu:1", "--data-dir", str(tmp / "data")], tmp)
    pids: list[int] = []
    try:
        s.wait_ready(timeout=180)
        pids = s.worker_pids()
        yield s
    finally:
        s.stop()
        for pid in pids:
            wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")


@pytest.fixture(scope="module")
def srv(tiny_cache, tmp_path_factory):
    """The tiny model: it ends each row at its estimated length (its stand-in for EOS)."""
    tmp = tmp_path_factory.mktemp("fidelity-server")
    yield from serve(["--tiny-model", "--cache-dir", str(tiny_cache)], tmp)


@pytest.fixture(scope="module")
def never_ends(tiny_model_dir, tmp_path_factory):
    """The tiny weights without their marker, served as real weights: no scripted end,
    and random weights never draw EOS, so only a cap ends a row."""
    import shutil

    tmp = tmp_path_factory.mktemp("never-ends")
    weights = tmp / "weights"
    shutil.copytree(tiny_model_dir, weights, ignore=shutil.ignore_patterns("TINY_MODEL"))
    args = ["--model_path", str(weights), "--voices-dir", str(tmp / "voices")]
    yield from serve([*args, "--cache-dir", str(tmp / "cache")], tmp)


def prompt_tokens(model_dir: str, script: str) -> int:
    """The prompt's length in tokens, as microsoft's processor builds it."""
    from transformers import VibeVoiceProcessor

    from workers.engines.vibevoice.prompt import PromptTokens, prompt_ids

    tokens = PromptTokens.from_processor(VibeVoiceProcessor.from_pretrained(model_dir))
    turns = tuple(Turn(t.speaker, t.text) for t in parse_script(script))
    return len(prompt_ids(tokens, Request(id="p", turns=turns)))


def raw_json(obj: dict) -> dict:
    """The body as JSON text with \\uXXXX escapes: a lone surrogate is valid JSON."""
    body = json.dumps(obj, ensure_ascii=True).encode("ascii")
    return {"content": body, "headers": {"content-type": "application/json"}}


def workers_failed(s: Server) -> list[int]:
    return [w["failed"] for w in s.get("/v1/pool").json()["workers"]]


ROUTES = {
    "synthesize": ("/v1/synthesize", {"script": SURROGATE}),
    "speech": ("/v1/audio/speech", {"model": "tts-1", "input": SURROGATE, "voice": "alloy"}),
    "jobs": ("/v1/jobs", {"script": SURROGATE}),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_lone_surrogate_is_a_400_on_every_http_route(srv, route):
    pids = sorted(srv.worker_pids())
    path, body = ROUTES[route]
    r = httpx.post(srv.url + path, timeout=30, **raw_json(body))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "lone surrogate" in error["message"] and "UTF-8" in error["message"]
    assert error["code"] == "bad_input"
    assert sorted(srv.worker_pids()) == pids and workers_failed(srv) == [0]
    assert srv.get("/ready").status_code == 200
    assert "UnicodeEncodeError" not in srv.log()


def test_a_lone_surrogate_through_the_page_says_what_to_fix(srv):
    """The page's generate call, as a browser sends it (JSON.stringify writes a lone
    surrogate as \\ud800; gradio_client cannot even encode it)."""
    pids = sorted(srv.worker_pids())
    data = [SURROGATE, 1, None, None, None, None, 1.3, 10, 1]
    r = httpx.post(srv.url + "/gradio_api/call/generate", timeout=30, **raw_json({"data": data}))
    assert r.status_code == 200, r.text
    event_id = r.json()["event_id"]
    with httpx.stream("GET", f"{srv.url}/gradio_api/call/generate/{event_id}", timeout=60) as r:
        lines = list(r.iter_lines())
    events = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    assert events[-1] == "error", lines
    assert any("lone surrogate" in line for line in lines), lines
    assert sorted(srv.worker_pids()) == pids and workers_failed(srv) == [0]
    assert "UnicodeEncodeError" not in srv.log()


def estimate_s(script: str) -> float:
    return audio_seconds_for("\n".join(t.text for t in parse_script(script)))


def cut_samples(model_dir: str, script: str) -> int:
    """Where the runaway cap cuts a row that never ends: FACTOR x the longest of its
    prompt, its estimate and the floor, in steps (each one audio token here)."""
    longest = max(
        prompt_tokens(model_dir, script),
        estimate_s(script) * TOKENS_PER_S,
        RUNAWAY_FLOOR_S * TOKENS_PER_S / FACTOR,
    )
    return math.ceil(FACTOR * longest) * HOP


@pytest.mark.parametrize("language", ["english", "chinese"])
def test_the_estimate_of_a_dialogue_is_within_30_percent_of_its_natural_length(srv, language):
    script = {"english": ENGLISH, "chinese": CHINESE}[language]
    r = srv.post("/v1/synthesize", json={"script": script, "seed": 5}, timeout=180)
    assert r.status_code == 200, r.text
    assert r.headers["x-stop-reason"] == "estimate"  # the tiny model ends at its estimate
    audio_s = float(r.headers["x-audio-seconds"])
    assert abs(audio_s - estimate_s(script)) <= HOP / 24000
    natural = NATURAL_S[language]
    assert 0.7 * natural <= audio_s <= 1.3 * natural, (language, audio_s, natural)


def test_a_chinese_script_is_never_cut_before_twice_its_natural_length(never_ends, tiny_model_dir):
    r = never_ends.post("/v1/synthesize", json={"script": CHINESE, "seed": 5}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-stop-reason"] == "runaway_cap"
    audio, _ = sf.read(io.BytesIO(r.content), dtype="float32")
    assert len(audio) == cut_samples(tiny_model_dir, CHINESE)
    assert len(audio) / 24000 >= 2 * NATURAL_S["chinese"]


def test_a_row_cut_by_the_runaway_cap_says_so_on_every_route(
    never_ends, tiny_model_dir, tmp_path, monkeypatch
):
    srv = never_ends
    script = "Speaker 1: The tiny model never ends its speech by itself, so the cap must."
    r = srv.post("/v1/synthesize", json={"script": script, "seed": 3}, timeout=180)
    assert r.status_code == 200, r.text
    assert r.headers["x-stop-reason"] == "runaway_cap"
    audio, _ = sf.read(io.BytesIO(r.content), dtype="float32")
    assert len(audio) == cut_samples(tiny_model_dir, script)

    speech = {"model": "tts-1", "input": script, "voice": "alloy", "stream_format": "sse"}
    with httpx.stream("POST", srv.url + "/v1/audio/speech", json=speech, timeout=180) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["stop_reason"] == "runaway_cap"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert pcm  # audio came before the done event

    from gradio_client import Client

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client = Client(srv.url, download_files=str(tmp_path), verbose=False, analytics_enabled=False)
    try:
        _, progress, _ = client.predict(
            script, 1, None, None, None, None, 1.3, 10, 3, api_name="/generate"
        )
    finally:
        client.close()
    assert "runaway cap" in progress and f"{FACTOR:g}x" in progress


def test_real_weights_get_no_synthetic_voices_and_say_whose_voice_speaks(tiny_model_dir, tmp_path):
    """A checkpoint that is not the tiny model (the tiny weights without their marker)
    stands for real weights: the tone presets are neither written nor offered, even when
    a tiny-model run left them in the folder, and a speaker without a sample speaks in
    the model's own voice (no voice prompt)."""
    import shutil

    from vibevoice_pool.voices.library import ensure_demo_voices

    real = tmp_path / "real-weights"
    shutil.copytree(tiny_model_dir, real, ignore=shutil.ignore_patterns("TINY_MODEL"))
    voices = tmp_path / "voices"
    ensure_demo_voices(voices)  # left behind by an earlier tiny-model run
    args = ["--model_path", str(real), "--gpus", "cpu:1", "--voices-dir", str(voices)]
    s = Server(args, tmp_path)
    try:
        s.wait_ready(timeout=180)
        listed = s.get("/v1/voices").json()
        assert listed["voices"] == [] and "model's own voice" in listed["note"]
        assert f"No voice presets in {voices}" in s.log() and "POST /v1/voices" in s.log()
        r = s.post("/v1/synthesize", json={"script": "Speaker 1: Hi.", "seed": 1}, timeout=180)
        assert r.status_code == 200, r.text
        body = {"model": "tts-1", "input": "Hello.", "voice": "alloy", "response_format": "wav"}
        r = s.post("/v1/audio/speech", json=body, timeout=180)
        assert r.status_code == 200, r.text
        assert unquote(r.headers["x-voice"]) == "none (the model's own voice)"
        r = s.post(
            "/v1/synthesize",
            json={"script": "Speaker 1: Hi.", "speakers": [{"voice": "demo-Alice_woman"}]},
            timeout=30,
        )
        assert r.status_code == 404 and "unknown voice" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_a_job_cut_by_the_runaway_cap_says_so_and_a_job_not_cut_gives_its_own_reason(
    never_ends, tiny_model_dir
):
    srv = never_ends
    script = "Speaker 1: A durable job on the tiny model runs into the cap as well."
    cut = srv.post("/v1/jobs", json={"script": script, "seed": 3})
    short = srv.post("/v1/jobs", json={"script": script, "seed": 3, "max_audio_s": 0.2})
    assert cut.status_code == 202 and short.status_code == 202, (cut.text, short.text)
    views = {}

    def finished() -> bool:
        for name, r in (("cut", cut), ("short", short)):
            views[name] = srv.get(f"/v1/jobs/{r.json()['id']}").json()
        return all(v["state"] in ("done", "failed", "cancelled") for v in views.values())

    wait_until(finished, 180, what="both jobs to finish")
    assert views["cut"]["state"] == "done" and views["cut"]["stop_reason"] == "runaway_cap"
    audio = srv.get(views["cut"]["result"]["url"], timeout=30)
    assert audio.headers["x-stop-reason"] == "runaway_cap"
    assert len(sf.read(io.BytesIO(audio.content))[0]) == cut_samples(tiny_model_dir, script)
    # a job that the cap did not cut reports the reason the synchronous answer gives
    same = srv.post("/v1/synthesize", json={"script": script, "seed": 3, "max_audio_s": 0.2})
    assert same.status_code == 200 and same.headers["x-stop-reason"] != "runaway_cap"
    assert views["short"]["state"] == "done"
    assert views["short"]["stop_reason"] == same.headers["x-stop-reason"]
