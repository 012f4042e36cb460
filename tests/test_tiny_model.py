"""The real VibeVoice code (the tiny random model) through real worker processes."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import ROOT, wait_until

from vibevoice_pool.config import build
from vibevoice_pool.pool.facade import Pool
from vibevoice_pool.script import parse_script
from workers.checkpoints.convert import make_original_layout_checkpoint
from workers.wire import messages as m
from workers.wire.estimate import audio_seconds_for

pytestmark = pytest.mark.slow

HOP = 3200


def expected_samples(script: str, cap: float | None = None) -> int:
    """The tiny model makes the estimated length of the spoken text, in whole audio tokens."""
    spoken = "\n".join(t.text for t in parse_script(script))
    est = audio_seconds_for(spoken, cap)
    return max(1, int(est * m.SAMPLE_RATE // HOP)) * HOP


@pytest.fixture(scope="module")
def tiny_pool(tiny_model_dir, tmp_path_factory):
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": tiny_model_dir,
            "gpus": "cpu:2",
            "max_batch_size": 4,
            "cache_dir": str(tmp_path_factory.mktemp("cache")),
        }
    )
    pool = Pool.start(cfg, model_path=tiny_model_dir)
    wait_until(lambda: pool.ready_workers() == 2, 120, what="both tiny workers")
    yield pool
    pool.shutdown(grace_s=0)


def submit(pool, text, seed=1, **kw):
    return pool.submit(pool.make_request(parse_script(text), seed=seed, **kw))


def wav_b64(seconds=1.0, rate=16000, channels=2) -> str:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x] * channels, axis=1), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_burst_of_four_lengths_runs_as_one_batch_with_rows_of_their_own_length(tiny_pool):
    slot = 0
    tiny_pool.dispatcher.drain(1)  # everything to worker 0
    try:
        tiny_pool.supervisor.restart(slot)  # the burst queues while worker 0 restarts
        wait_until(
            lambda: tiny_pool.status()["workers"][slot]["state"] != "ready", 10, what="restart"
        )
        texts = [f"Speaker 1: {'word ' * n}" for n in (3, 6, 9, 12)]
        handles = [submit(tiny_pool, t, seed=i) for i, t in enumerate(texts)]
        for h, t in zip(handles, texts, strict=True):
            assert len(h.result(timeout=120)) == expected_samples(t)
        assert {h.worker for h in handles} == {slot}
        lengths = {len(h.audio()) for h in handles}
        assert len(lengths) == 4  # four different lengths
    finally:
        tiny_pool.dispatcher.undrain(1)


def test_streaming_chunks_add_up_to_the_unstreamed_audio(tiny_pool):
    text = "Speaker 1: a streamed line that takes a few audio tokens to say"
    streamed = submit(tiny_pool, text, seed=3, stream=True)
    chunks_before_end = []

    def two_chunks():
        if not streamed.done:
            chunks_before_end.append(len(streamed._chunks))
        return streamed.done

    wait_until(two_chunks, 120, interval=0.005, what="the stream to end")
    assert max(chunks_before_end) >= 2
    plain = submit(tiny_pool, text, seed=3).result(timeout=120)
    np.testing.assert_array_equal(streamed.result(0), plain)


def submit_to(pool, slot, text, seed):
    """Submit while every other worker is draining, so `slot` takes it."""
    others = [i for i in pool.live_slots() if i != slot]
    for i in others:
        pool.dispatcher.drain(i)
    try:
        return submit(pool, text, seed=seed)
    finally:
        for i in others:
            pool.dispatcher.undrain(i)


def test_the_same_seed_on_two_workers_gives_identical_audio(tiny_pool):
    text = "Speaker 1: the same words with the same seed"
    a, b = submit_to(tiny_pool, 0, text, 11), submit_to(tiny_pool, 1, text, 11)
    xa, xb = a.result(timeout=120), b.result(timeout=120)
    assert (a.worker, b.worker) == (0, 1)
    np.testing.assert_array_equal(xa, xb)


def test_a_kept_voice_sounds_the_same_as_the_voice_sent_whole(tiny_pool):
    """A read-only voice (a preset) crosses worker 0's queue once as KeptVoice, then
    as VoiceRef; the audio must equal what the same samples sent whole (a writable
    copy) give, and another voice must give other audio."""
    t = np.arange(2 * m.SAMPLE_RATE) / m.SAMPLE_RATE
    preset = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    preset.setflags(write=False)
    other = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    other.setflags(write=False)
    sent = []
    wait_until(lambda: 0 in tiny_pool.dispatcher._links, 120, what="worker 0 attached")
    link = tiny_pool.dispatcher._links[0]
    put = link._put
    link._put = lambda msg: (sent.append(msg), put(msg))[1]
    text = "Speaker 1: a voice the worker keeps"

    def run(voice):
        others = [i for i in tiny_pool.live_slots() if i != 0]
        for i in others:
            tiny_pool.dispatcher.drain(i)
        try:
            req = tiny_pool.make_request(parse_script(text), (voice,), seed=9)
            handle = tiny_pool.submit(req)
        finally:
            for i in others:
                tiny_pool.dispatcher.undrain(i)
        audio = handle.result(timeout=120)
        assert handle.worker == 0
        return audio

    try:
        first, again, whole, changed = run(preset), run(preset), run(preset.copy()), run(other)
    finally:
        link._put = put
    kinds = [type(msg.request.voices[0]).__name__ for msg in sent]
    assert kinds == ["KeptVoice", "VoiceRef", "ndarray", "KeptVoice"]
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, whole)
    assert len(changed) == len(first) and not np.array_equal(changed, first)


def test_cancel_mid_generation_frees_the_slot(tiny_pool):
    long = submit(tiny_pool, "Speaker 1: " + "many words " * 60, seed=5)
    wait_until(lambda: len(long.audio()) > 0, 120, interval=0.01, what="the first chunk")
    t0 = time.monotonic()
    long.cancel()
    with pytest.raises(m.PoolError) as e:
        long.result(timeout=30)
    assert e.value.kind == m.ErrorKind.CANCELLED and time.monotonic() - t0 < 10
    assert len(long.audio()) < expected_samples("Speaker 1: " + "many words " * 60)
    assert tiny_pool.board.get(long.worker, 24) == 0  # Col.INFLIGHT: the slot is free
    assert len(submit(tiny_pool, "Speaker 1: next", seed=1).result(timeout=120)) > 0


def test_the_server_serves_the_tiny_model_over_http(server, tmp_path, tiny_model_dir, tiny_cache):
    args = ("--tiny-model", "--gpus", "cpu:2", "--max-batch-size", "4")
    s = server(*args, "--cache-dir", str(tiny_cache))
    pids = sorted(s.worker_pids())
    text = "Speaker 1: Hello from the tiny model.\nSpeaker 2: And hello back."
    r = s.post("/v1/synthesize", json={"script": text, "seed": 4}, timeout=180)
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 24000 and audio.ndim == 1
    assert len(audio) == expected_samples(text)
    assert float(r.headers["x-audio-seconds"]) == pytest.approx(len(audio) / rate, abs=1e-3)

    voices = s.get("/v1/voices").json()
    preset = voices["voices"][0]["name"] if isinstance(voices, dict) else voices[0]
    body = {"script": text, "speakers": [{"voice": preset}, {"audio": wav_b64()}]}
    r = s.post("/v1/synthesize", json=body, timeout=180)
    assert r.status_code == 200, r.text

    body = {
        "script": text,
        "speakers": [{"voice": preset}, {"audio": base64.b64encode(b"RIFF garbage").decode()}],
    }
    r = s.post("/v1/synthesize", json=body, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_audio"
    assert "speakers[1]" in r.json()["error"]["message"]
    assert sorted(s.worker_pids()) == pids  # no worker died for it
    assert s.get("/ready").status_code == 200

    script = tmp_path / "script.txt"
    script.write_text("Speaker 1: Written by the synth command.")
    out = tmp_path / "out.wav"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "vibevoice_pool",
            "synth",
            "--url",
            s.url,
            "--script",
            str(script),
            "--voice",
            preset,
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    assert "s of audio" in p.stderr  # the progress line
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == expected_samples(script.read_text())
    assert "tiny random model" in s.log().lower() or "noise, not speech" in s.log()


def test_an_original_layout_checkpoint_is_refused_with_the_command_that_converts_it(
    tmp_path, tiny_model_dir
):
    src = make_original_layout_checkpoint(tmp_path / "original")
    cmd = [
        sys.executable,
        "-m",
        "vibevoice_pool",
        "launch",
        "--model_path",
        str(src),
        "--gpus",
        "cpu:1",
        "--port",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 2  # refused before any worker boots
    assert "vibevoice-pool convert" in p.stderr and "Initialising" not in p.stderr
    dst = tmp_path / "converted"
    c = subprocess.run(
        [sys.executable, "-m", "vibevoice_pool", "convert", str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert c.returncode == 0, c.stderr
    assert (dst / "config.json").is_file()


def test_convert_takes_the_converters_tokenizer_flag(tmp_path, monkeypatch):
    """`vibevoice-pool convert` had no --tokenizer (the converter's own main had), so a
    checkpoint whose tokenizer is elsewhere could not be converted from the command."""
    from vibevoice_pool import cli
    from workers.checkpoints import convert

    seen = {}
    monkeypatch.setattr(
        convert,
        "convert_checkpoint",
        lambda s, d, tokenizer=None: seen.update(src=s, dst=d, tokenizer=tokenizer),
    )
    src = tmp_path / "orig"
    src.mkdir()
    args = ["convert", str(src), str(tmp_path / "out"), "--tokenizer", "Qwen/Qwen2.5-7B"]
    assert cli.main(args) == 0
    assert seen == {"src": str(src), "dst": str(tmp_path / "out"), "tokenizer": "Qwen/Qwen2.5-7B"}
