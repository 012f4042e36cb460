"""VibeVoiceEngine in-process, on the tiny random model (real transformers code, CPU).

The tiny model is built once per session; every test drives the engine through a
recording sink, the way the worker loop does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: E402

from workers.checkpoints import (
    convert,
    tiny,  # noqa: E402
    weight_names,
)
from workers.engines.contract import EngineSpec
from workers.engines.vibevoice.engine import HOP_SAMPLES, VibeVoiceEngine  # noqa: E402
from workers.engines.vibevoice.prompt import build_inputs
from workers.host.step_host import StepHost
from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError, Request, Turn

ROOT = Path(__file__).resolve().parents[1]


class RecordingSink:
    """A host sink that records every call in order; it can cancel rows on a rule."""

    def __init__(self, cancel_after: dict[str, int] | None = None, cancel_all: bool = False):
        self.calls: list[tuple] = []
        self.reasons: dict[str, str] = {}
        self.steps = 0
        self.cancel_after = cancel_after or {}
        self.cancel_all = cancel_all

    def started(self, request_id, at, from_samples=0):
        self.calls.append(("started", request_id))

    def chunk(self, request_id, pcm, history=None):
        assert isinstance(pcm, np.ndarray) and pcm.dtype == np.float32 and pcm.ndim == 1
        self.calls.append(("chunk", request_id, pcm))

    def finish(self, request_id, stop_reason="eos"):
        self.calls.append(("finish", request_id))
        self.reasons[request_id] = stop_reason

    def fail(self, request_id, error):
        assert isinstance(error, PoolError)
        self.calls.append(("fail", request_id, error))

    def cancelled(self, request_id):
        if self.cancel_all and self.steps >= 1:
            return True
        limit = self.cancel_after.get(request_id)
        return limit is not None and len(self.chunks(request_id)) >= limit

    def step(self):
        self.steps += 1

    def chunks(self, request_id):
        return [c[2] for c in self.calls if c[0] == "chunk" and c[1] == request_id]

    def audio(self, request_id):
        return np.concatenate(self.chunks(request_id))

    def outcome(self, request_id):
        ends = [c for c in self.calls if c[0] in ("finish", "fail") and c[1] == request_id]
        assert len(ends) == 1, f"{request_id} ended {len(ends)} times"
        return ends[0]


def req(rid, *turns, **kw):
    turns = turns or ((0, "Hello there, how are you today?"),)
    return Request(id=rid, turns=tuple(Turn(s, t) for s, t in turns), **kw)


def run(engine, batch, **sink_kw):
    """Drive the engine as a worker does (workers/host/step_host.StepHost): every request
    submitted at once, a cancel rule applied between steps, until all rows ended."""
    sink = RecordingSink(**sink_kw)
    host = sink.host = StepHost(engine, sink)
    for r in batch:
        host.submit(r)
    while not host.idle:
        host.run_step()
        for rid in list(host.running):
            if sink.cancelled(rid):
                host.cancel(rid)
    return sink


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny.ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def engine(tiny_dir):
    eng = VibeVoiceEngine(EngineSpec(engine="vibevoice", model_path=tiny_dir, max_batch_size=4))
    info = eng.load()
    assert info.engine == "vibevoice" and info.device == "cpu" and info.name == "CPU"
    assert info.max_batch_size == 4 and "noise, not speech" in info.note
    return eng


def test_tiny_model_is_cached_and_reused(tiny_dir):
    marker = Path(tiny_dir, tiny.TINY_MARKER)
    before = marker.stat().st_mtime_ns
    assert tiny.ensure_tiny_model(Path(tiny_dir).parent) == tiny_dir
    assert marker.stat().st_mtime_ns == before
    gen = json.loads(Path(tiny_dir, "generation_config.json").read_text())
    assert gen["_from_model_config"] is False and gen["num_diffusion_steps"] == 10
    assert gen["sequence_bias"] and gen["noise_scheduler_class"] == "DPMSolverMultistepScheduler"


def test_importing_the_engine_does_not_import_torch():
    code = "import sys, workers.engines.vibevoice.engine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_one_speaker_gives_audio_of_the_capped_length(engine):
    sink = run(engine, [req("a", est_audio_s=1.0)])
    assert sink.outcome("a")[0] == "finish"
    audio = sink.audio("a")
    assert len(audio) == int(1.0 * SAMPLE_RATE // HOP_SAMPLES) * HOP_SAMPLES  # 7 tokens
    assert np.all(np.isfinite(audio)) and 1e-3 < np.abs(audio).max() <= 10
    assert sink.steps >= 7
    # max_audio_s caps below the estimate
    sink = run(engine, [req("b", est_audio_s=5.0, max_audio_s=0.5)])
    assert len(sink.audio("b")) == 3 * HOP_SAMPLES


def test_two_speakers_use_the_given_voice(engine):
    sr = SAMPLE_RATE
    voice_a = (0.2 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr)).astype(np.float32)
    voice_b = np.random.RandomState(3).uniform(-0.3, 0.3, sr // 2).astype(np.float32)
    turns = ((0, "Hi, I am the first speaker."), (1, "And I am the second."), (0, "Bye."))
    prompt = build_inputs(engine.processor, [req("x", *turns, voices=(voice_a, None))])
    assert prompt.voice_rows == [0] and prompt.voice_tokens == [SAMPLE_RATE // HOP_SAMPLES + 1]
    assert prompt.inputs["input_values"].shape[0] == 1  # speaker 2 brings no sample: no voice
    with_a = run(engine, [req("a", *turns, voices=(voice_a, None), est_audio_s=0.8)])
    with_b = run(engine, [req("b", *turns, voices=(voice_b, None), est_audio_s=0.8)])
    assert with_a.outcome("a")[0] == with_b.outcome("b")[0] == "finish"
    assert len(with_a.audio("a")) == len(with_b.audio("b")) == 6 * HOP_SAMPLES
    assert not np.array_equal(with_a.audio("a"), with_b.audio("b"))  # the voice conditions it


def test_batch_of_four_rows_end_on_their_own(engine):
    lengths = {"r1": 0.4, "r2": 0.8, "r3": 1.2, "r4": 1.6}  # 3, 6, 9, 12 tokens
    batch = [req(rid, est_audio_s=s, stream=True) for rid, s in lengths.items()]
    sink = run(engine, batch)
    for rid, s in lengths.items():
        assert sink.outcome(rid)[0] == "finish"
        assert len(sink.audio(rid)) == int(s * SAMPLE_RATE // HOP_SAMPLES) * HOP_SAMPLES
    pos = {c[1]: i for i, c in enumerate(sink.calls) if c[0] == "finish"}
    last_chunk_r4 = max(i for i, c in enumerate(sink.calls) if c[0] == "chunk" and c[1] == "r4")
    assert pos["r1"] < pos["r2"] < pos["r3"] < last_chunk_r4 < pos["r4"]


def test_streaming_sends_chunks_before_finish_and_they_make_the_whole_audio(engine):
    streamed = run(engine, [req("s", est_audio_s=1.0, stream=True, seed=5)])
    finish_at = streamed.calls.index(("finish", "s"))
    before = [c for c in streamed.calls[:finish_at] if c[0] == "chunk"]
    assert len(before) >= 2 and all(len(c[2]) == HOP_SAMPLES for c in before)
    whole = run(engine, [req("w", est_audio_s=1.0, stream=False, seed=5)])
    assert len(whole.chunks("w")) == 1
    assert np.array_equal(streamed.audio("s"), whole.audio("w"))


def test_cancel_stops_the_row_within_a_step(engine):
    batch = [req("keep", est_audio_s=1.2, stream=True), req("stop", est_audio_s=1.2, stream=True)]
    sink = run(engine, batch, cancel_after={"stop": 2})
    kind, _, err = sink.outcome("stop")
    assert kind == "fail" and err.kind is ErrorKind.CANCELLED
    assert len(sink.chunks("stop")) == 2
    assert sink.outcome("keep")[0] == "finish" and len(sink.audio("keep")) == 9 * HOP_SAMPLES
    # every row cancelled: generation stops instead of running to the cap
    sink = run(engine, [req("c1", est_audio_s=3.0), req("c2", est_audio_s=3.0)], cancel_all=True)
    assert all(sink.outcome(r)[2].kind is ErrorKind.CANCELLED for r in ("c1", "c2"))
    assert sink.steps <= 2


def test_same_seed_same_audio_even_in_a_fresh_process(engine, tiny_dir, tmp_path):
    batch = [req("a", est_audio_s=0.8, seed=11), req("b", est_audio_s=0.4, seed=11)]
    first, second = run(engine, batch), run(engine, batch)
    assert np.array_equal(first.audio("a"), second.audio("a"))
    other = run(engine, [req("a", est_audio_s=0.8, seed=12), req("b", est_audio_s=0.4, seed=12)])
    assert not np.array_equal(first.audio("a"), other.audio("a"))
    script = (
        "import sys, numpy as np\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_vibevoice_engine import req, run\n"
        "from workers.engines.contract import EngineSpec\n"
        "from workers.engines.vibevoice.engine import VibeVoiceEngine\n"
        "e = VibeVoiceEngine(EngineSpec(engine='vibevoice', model_path=sys.argv[2], max_batch_size=4))\n"
        "e.load()\n"
        "s = run(e, [req('a', est_audio_s=0.8, seed=11), req('b', est_audio_s=0.4, seed=11)])\n"
        "np.save(sys.argv[3], s.audio('a'))\n"
    )
    out = tmp_path / "a.npy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", script, str(ROOT), tiny_dir, str(out)], env=env, check=True
    )
    assert np.load(out).tobytes() == first.audio("a").tobytes()


def test_a_rows_audio_depends_on_its_seed_not_on_its_batch_mates(engine):
    """Per-row noise (workers/engines/vibevoice/noise.py) and per-row state: what a replay needs."""
    mine = dict(seed=5, est_audio_s=1.5)
    alone = run(engine, [req("me", **mine)]).audio("me")
    others = [req("a", (0, "Another line"), seed=9, est_audio_s=2.0), req("me", **mine)]
    others.append(req("b", (0, "x y z"), seed=11, est_audio_s=1.0))
    batched = run(engine, others).audio("me")
    assert len(alone) == len(batched)
    # Not bit-identical (padding in a batch changes the arithmetic a little), but the same audio:
    assert np.abs(alone - batched).max() < 1e-4 * np.abs(alone).max()
    other_seed = run(engine, [req("me", seed=6, est_audio_s=1.5)]).audio("me")
    assert abs(np.corrcoef(alone, other_seed)[0, 1]) < 0.5


def test_a_bad_row_fails_alone(engine):
    voice = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    batch = [
        req("too-many-voices", voices=(voice,) * 5),
        req("ok", est_audio_s=0.4),
        req("empty-text", (0, "   ")),
        req("bad-speaker", (7, "Hello")),
        req("nan-voice", voices=(np.full(800, np.nan, dtype=np.float32),)),
        req("bad-steps", inference_steps=0),
    ]
    sink = run(engine, batch)
    assert sink.outcome("ok")[0] == "finish" and len(sink.audio("ok")) == 3 * HOP_SAMPLES
    for rid in ("too-many-voices", "empty-text", "bad-speaker", "nan-voice", "bad-steps"):
        kind, _, err = sink.outcome(rid)
        assert kind == "fail" and err.kind is ErrorKind.BAD_INPUT and err.message
        assert not sink.chunks(rid)


SPECIAL_NAMES = ("<|vision_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")


def test_a_script_that_writes_special_tokens_is_read_as_text(engine):
    """A turn holding a special token's name is encoded as those characters: the special
    ids appear only where the prompt format puts them, and the row runs beside another
    (a stray speech_diffusion placeholder failed the prefill of every row joining it)."""
    from workers.engines.vibevoice.prompt import PromptTokens, prompt_ids, voice_tokens

    voice = (0.2 * np.sin(2 * np.pi * 200 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(
        np.float32
    )
    text = "Hello " + " and ".join(SPECIAL_NAMES) + " there."
    tokens = PromptTokens.from_processor(engine.processor)
    ids = prompt_ids(tokens, req("p", (0, text), voices=(voice,)))
    assert ids.count(tokens.speech_diffusion) == voice_tokens(len(voice))
    assert ids.count(tokens.speech_start) == 2 and ids.count(tokens.speech_end) == 1
    eos = engine.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eos not in ids
    batch = [
        req("odd", (0, text), voices=(voice,), est_audio_s=0.4),
        req("ok", voices=(voice,), est_audio_s=0.4),
    ]
    sink = run(engine, batch)
    for rid in ("odd", "ok"):
        assert sink.outcome(rid)[0] == "finish", sink.outcome(rid)
        assert len(sink.audio(rid)) == 3 * HOP_SAMPLES


def test_a_row_whose_prefill_raises_fails_alone_and_the_others_go_on(engine, monkeypatch):
    """A newcomer whose prompt cannot be built (any bug) fails by itself: the row already
    running and the newcomer that joined beside it make the audio they make alone."""
    steps = engine.steps
    real = steps.prompts.batch

    def batch(requests, *args, **kw):
        if any(r.id == "poison" for r in requests):
            raise RuntimeError("simulated: a prompt that cannot be built")
        return real(requests, *args, **kw)

    alone = {
        rid: run(engine, [req(rid, seed=seed, est_audio_s=1.2)]).audio(rid)
        for rid, seed in (("long", 3), ("mate", 4))
    }
    monkeypatch.setattr(steps.prompts, "batch", batch)
    sink = RecordingSink()
    host = sink.host = StepHost(engine, sink)
    host.submit(req("long", seed=3, est_audio_s=1.2))
    host.run_step()
    host.run_step()  # long runs; then two newcomers join together
    host.submit(req("poison", seed=5, est_audio_s=0.4))
    host.submit(req("mate", seed=4, est_audio_s=1.2))
    while not host.idle:
        host.run_step()
    kind, _, err = sink.outcome("poison")
    assert kind == "fail" and err.kind is ErrorKind.ENGINE_ERROR and "simulated" in err.message
    assert not sink.chunks("poison")
    for rid in ("long", "mate"):
        assert sink.outcome(rid)[0] == "finish", sink.outcome(rid)
        got = sink.audio(rid)
        assert len(got) == len(alone[rid])
        assert np.abs(got - alone[rid]).max() < 1e-4 * np.abs(alone[rid]).max()
    assert steps.live == 0 and steps.kv.held_blocks() == 0  # nothing left held


def test_a_row_that_runs_out_of_memory_joining_fails_as_out_of_memory_alone(engine, monkeypatch):
    """A resumed row's rebuild happens when it joins (admit): out of device memory there
    fails that row with out_of_memory, not engine_error, and the others go on."""
    steps = engine.steps
    real = steps.admit

    def admit(row):
        if row.id == "big":
            raise torch.cuda.OutOfMemoryError("simulated")
        real(row)

    monkeypatch.setattr(steps, "admit", admit)
    sink = run(engine, [req("big", est_audio_s=0.4), req("ok", est_audio_s=0.4)])
    kind, _, err = sink.outcome("big")
    assert kind == "fail" and err.kind is ErrorKind.OUT_OF_MEMORY
    assert sink.outcome("ok")[0] == "finish" and len(sink.audio("ok")) == 3 * HOP_SAMPLES
    assert steps.live == 0


def test_out_of_memory_halves_the_rows_then_fails_the_row_alone(engine, monkeypatch):
    steps = engine.steps
    monkeypatch.setattr(steps, "max_rows", steps.max_rows)  # restored after the test
    real = steps._step

    def tight(sink):
        rows = steps.rows + steps.joining
        if len(rows) > 1 or any("HUGE" in r.request.text for r in rows):
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(sink)

    monkeypatch.setattr(steps, "_step", tight)
    batch = [req(f"r{i}", est_audio_s=0.4) for i in range(3)] + [req("big", (0, "HUGE text"))]
    sink = run(engine, batch)
    for rid in ("r0", "r1", "r2"):
        assert sink.outcome(rid)[0] == "finish" and len(sink.audio(rid)) == 3 * HOP_SAMPLES
    kind, _, err = sink.outcome("big")
    assert kind == "fail" and err.kind is ErrorKind.OUT_OF_MEMORY
    assert sink.host.max_rows == 1 and steps.live == 0


def test_original_layout_is_refused_then_converted(engine, tiny_dir, tmp_path):
    from transformers import VibeVoiceForConditionalGeneration

    src = Path(convert.make_original_layout_checkpoint(tmp_path / "orig"))
    assert convert.looks_like_original_layout(src)
    assert not convert.looks_like_original_layout(tiny_dir)
    names = json.loads((src / "config.json").read_text())
    assert "decoder_config" in names and "text_config" not in names
    with pytest.raises(PoolError) as refused:
        VibeVoiceEngine(EngineSpec(engine="vibevoice", model_path=str(src))).load()
    assert refused.value.kind is ErrorKind.BAD_INPUT
    assert f"vibevoice-pool convert {src} DST" in refused.value.message

    dst = convert.convert_checkpoint(src, tmp_path / "hf")
    assert not convert.looks_like_original_layout(dst)
    converted = VibeVoiceForConditionalGeneration.from_pretrained(dst).state_dict()
    reference = engine.model.state_dict()
    assert set(converted) == set(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    gen = json.loads(Path(dst, "generation_config.json").read_text())
    assert gen["noise_scheduler_config"]["beta_schedule"] == "squaredcos_cap_v2"
    info = VibeVoiceEngine(EngineSpec(engine="vibevoice", model_path=dst)).load()
    assert info.engine == "vibevoice"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(dst).padding_side == "left"  # saved, not assumed


def test_weight_names_round_trip():
    keys = [
        "model.audio_tower.encoder.stem.conv.conv.weight",
        "model.audio_tower.decoder.conv_layers.2.convtr.convtr.bias",
        "model.semantic_tokenizer_encoder.conv_layers.0.stage.1.mixer.conv.weight",
        "model.audio_tower.decoder.head.conv.weight",
        "model.diffusion_head.layers.3.linear.weight",
        "model.diffusion_head.final_layer.linear_2.weight",
        "model.multi_modal_projector.act.weight",
        "model.latent_scaling_factor",
    ]
    expected = [
        "model.acoustic_tokenizer.encoder.downsample_layers.0.0.conv.conv.weight",
        "model.acoustic_tokenizer.decoder.upsample_layers.3.0.convtr.convtr.bias",
        "model.semantic_tokenizer.encoder.stages.1.1.mixer.conv.conv.conv.weight",
        "model.acoustic_tokenizer.decoder.head.conv.conv.weight",
        "model.prediction_head.layers.3.adaLN_modulation.1.weight",
        "model.prediction_head.final_layer.linear.weight",
        "model.acoustic_connector.norm.weight",
        "model.speech_scaling_factor",
    ]
    assert [weight_names.hf_to_original_key(k) for k in keys] == expected
    assert [weight_names.original_to_hf_key(k) for k in expected] == keys


def test_row_cap_is_the_smallest_limit_and_names_it():
    from workers.engines.vibevoice.engine import row_cap

    r = req("r", est_audio_s=3.0, max_audio_s=600.0)
    # the runaway cap in steps: 2 x the longest of the prompt (microsoft's), the estimate
    # (3 s = 22.5 tokens) and the 5 s floor (37.5 tokens / 2)
    cap = row_cap(r, prompt_tokens=40)
    assert (cap.steps, cap.step_reason, cap.tokens, cap.reason) == (
        80,
        "runaway_cap",
        4500,
        "max_audio",
    )
    assert row_cap(r, prompt_tokens=10).steps == 45  # 2 x 22.5 tokens: the estimate
    assert row_cap(r, prompt_tokens=10, runaway_factor=0.5).steps == 38  # the 5 s floor
    assert row_cap(r, prompt_tokens=10, runaway_factor=1.5).steps == 38  # 1.5 x 3 s, floor
    assert row_cap(r, prompt_tokens=100, runaway_factor=1.5).steps == 150
    scripted = row_cap(r, prompt_tokens=40, scripted_end=True)
    assert (scripted.tokens, scripted.reason) == (22, "estimate")  # the tiny model's EOS
    capped = req("c", est_audio_s=2.0, max_audio_s=2.0)  # the pool caps the estimate
    assert row_cap(capped, prompt_tokens=40, scripted_end=True).reason == "max_audio"
    short = req("s", est_audio_s=3.0, max_audio_s=2.0)
    assert (row_cap(short, prompt_tokens=40).tokens, row_cap(short, prompt_tokens=40).reason) == (
        15,
        "max_audio",
    )
    ctx = row_cap(r, prompt_tokens=40, context_limit=100)
    assert (ctx.steps, ctx.step_reason) == (60, "context")
    with pytest.raises(PoolError) as full:
        row_cap(r, prompt_tokens=50, context_limit=50)
    assert full.value.kind is ErrorKind.BAD_INPUT


def test_the_runaway_cap_cuts_a_model_that_never_ends_and_says_so(engine, monkeypatch):
    """The tiny weights served as real weights (no scripted end at the estimate) never
    draw EOS: the runaway cap stops them, at 2 x the longest of the prompt, the estimate
    and the floor, in steps; on its capping step the row ends before it diffuses."""
    from workers.engines.vibevoice.engine import RUNAWAY_FLOOR_S, TOKENS_PER_S

    monkeypatch.setattr(engine, "is_tiny", False)
    r = req("cut", est_audio_s=2.0, seed=3)
    prompt = engine.steps.prompts.length(r)
    steps = 2 * max(prompt, 2.0 * TOKENS_PER_S, RUNAWAY_FLOOR_S * TOKENS_PER_S / 2)
    sink = run(engine, [r, req("short", est_audio_s=0.2, max_audio_s=0.5)])
    assert sink.outcome("cut")[0] == "finish" and sink.reasons["cut"] == "runaway_cap"
    assert len(sink.audio("cut")) == int(steps) * HOP_SAMPLES
    assert sink.steps == int(steps) + 1  # the capping step ran, and made no audio
    assert sink.reasons["short"] == "max_audio" and len(sink.audio("short")) == 3 * HOP_SAMPLES
    # the tiny model ends at its scripted end, and the cut audio starts the same way
    monkeypatch.setattr(engine, "is_tiny", True)
    whole = run(engine, [req("cut", est_audio_s=2.0, seed=3)])
    assert whole.reasons["cut"] == "estimate" and len(whole.audio("cut")) == 15 * HOP_SAMPLES
    np.testing.assert_allclose(sink.audio("cut")[: 15 * HOP_SAMPLES], whole.audio("cut"), atol=1e-5)


def test_a_voiced_row_beside_a_prefill_that_raises_keeps_its_own_voice_noise(engine, monkeypatch):
    """The joining rows' batched prefill draws each voice's latent noise from its row's
    generator before it raises; the rows prefilled again one by one must draw it again
    from the same state, so that a voiced row beside a bad one sounds as it does alone."""
    steps = engine.steps
    sr = SAMPLE_RATE
    voice = (0.2 * np.sin(2 * np.pi * 180 * np.arange(sr * 7 // 10) / sr)).astype(np.float32)
    mate = req("voiced", (0, "Short one."), seed=4, est_audio_s=1.0, voices=(voice,))
    alone = run(engine, [mate]).audio("voiced")
    real = steps._run_prefill

    def prefill(rows, *args, **kw):  # raises after the prompt embeds (and the noise)
        if any(r.id == "poison" for r in rows):
            raise RuntimeError("simulated: a prefill that raises")
        return real(rows, *args, **kw)

    monkeypatch.setattr(steps, "_run_prefill", prefill)
    sink = run(engine, [req("poison", seed=5, est_audio_s=0.4), mate])
    assert sink.outcome("poison")[0] == "fail"
    got = sink.audio("voiced")
    assert len(got) == len(alone)
    assert np.abs(got - alone).max() < 1e-4 * np.abs(alone).max()
    assert steps.live == 0 and steps.kv.held_blocks() == 0
