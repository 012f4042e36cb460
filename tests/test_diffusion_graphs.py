"""The diffusion loop and the audio decode/encode shaped for captured graphs
(workers/engines/vibevoice/diffusion.py, graphs.py, audio.Speech), on CPU: the
precomputed DPM-Solver++ coefficients equal diffusers' step, row buckets, padded rows,
engine_mode graphs against eager through the whole step engine, the fallback to eager
when a captured graph disagrees, and torch.compile(fullgraph=True) over the loop and
the conv stacks (no graph break, no data-dependent shape).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from test_step_engine import drive, req, voice

from workers.engines.contract import EngineSpec
from workers.engines.vibevoice import conv_stacks
from workers.engines.vibevoice.audio import Speech
from workers.engines.vibevoice.diffusion import diffusion_loop, sub_steps
from workers.engines.vibevoice.engine import VibeVoiceEngine
from workers.engines.vibevoice.graphs import Graph, Mismatch, bucket_for


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """One tiny-model engine of up to 4 rows per engine_mode."""
    out = {}
    for mode in ("eager", "graphs"):
        spec = EngineSpec(
            engine="vibevoice", model_path=tiny_model_dir, max_batch_size=4, engine_mode=mode
        )
        out[mode] = VibeVoiceEngine(spec)
        out[mode].load()
    return out


def rows_of_three():
    """Three rows joining at steps 0, 2 and 5: the speaking set goes 1, 2, 3, then down
    as they end (buckets 1, 2, 4), two step counts (two groups), cfg scales apart."""
    a = req("a", seed=21, est_audio_s=1.6)
    b = req("b", "Short one.", seed=22, est_audio_s=0.8, voices=(voice(),), cfg_scale=2.0)
    c = req("c", seed=23, est_audio_s=1.0, inference_steps=4)
    return {0: [a], 2: [b], 5: [c]}


def rows_in_full_buckets():
    """Four rows whose speaking set is always 1, 2 or 4 rows (no padding): a alone,
    then b, then c and d; all four end in the same step. Two step counts: (a, b) and
    (c, d) diffuse in two groups of two."""
    a = req("a", seed=31, est_audio_s=1.6)  # 12 tokens from step 0
    b = req("b", "Short one.", seed=32, est_audio_s=1.3334, voices=(voice(),), cfg_scale=2.0)
    c = req("c", seed=33, est_audio_s=1.0, inference_steps=4)  # 7 tokens from step 5
    d = req("d", "Another line.", seed=34, est_audio_s=1.0, inference_steps=4, cfg_scale=1.1)
    return {0: [a], 2: [b], 5: [c, d]}


def test_the_coefficients_equal_diffusers_step_exactly():
    from diffusers import DPMSolverMultistepScheduler

    base = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    for steps in (1, 2, 3, 10, 20):
        subs, _ = sub_steps(base, steps)
        sched = copy.deepcopy(base)
        sched.set_timesteps(num_inference_steps=steps)
        g = torch.Generator().manual_seed(steps)
        want = torch.randn(3, 64, generator=g)
        got, previous = want.clone(), None
        assert [s.second for s in subs] == [0 < i < steps - 1 for i in range(steps)]
        for i, t in enumerate(sched.timesteps):
            v = torch.randn(3, 64, generator=g)
            want = sched.step(v, t, want).prev_sample
            s = subs[i]
            x0 = s.alpha * got - s.sigma * v
            got = s.c1 * got - s.c2 * x0 - (s.c3 * (s.k * (x0 - previous)) if s.second else 0)
            previous = x0
            assert torch.equal(got, want), (steps, i)


def test_other_scheduler_settings_are_refused():
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(ValueError, match="prediction_type"):
        sub_steps(DPMSolverMultistepScheduler(prediction_type="epsilon"), 10)
    with pytest.raises(ValueError, match="solver_order"):
        sub_steps(DPMSolverMultistepScheduler(prediction_type="v_prediction", solver_order=3), 10)


def test_buckets_pick_the_smallest_size_that_holds_the_rows():
    want = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 16: 16, 17: 32, 32: 32, 33: 64, 65: 96}
    assert {n: bucket_for(n) for n in want} == want


class _Rows:
    """What Speech.diffuse reads of a row: request.inference_steps/cfg_scale, and
    state.generator."""

    def __init__(self, seed, cfg=1.3, steps=10):
        from types import SimpleNamespace

        self.request = SimpleNamespace(inference_steps=steps, cfg_scale=cfg)
        self.state = SimpleNamespace(generator=torch.Generator().manual_seed(seed))


def test_padded_rows_do_not_change_the_real_rows(engines):
    speech = engines["graphs"].steps.speech
    hidden = speech.head.cond_proj.in_features
    g = torch.Generator().manual_seed(5)
    pos, neg = torch.randn(3, hidden, generator=g), torch.randn(3, hidden, generator=g)
    with torch.no_grad():
        first = speech.diffuse([_Rows(s) for s in (1, 2, 3)], pos, neg).clone()
        graph = speech.graphs[("diffuse", 10, 4)]
        graph.inputs["packed"][3].fill_(1e3)  # the padded row: other inputs
        graph.inputs["cond"][3].fill_(-7.0)
        graph.inputs["cond"][7].fill_(9.0)
        again = speech.diffuse([_Rows(s) for s in (1, 2, 3)], pos, neg)
        assert graph.inputs["packed"][3, 0] == 1e3  # the padding was not refilled
        assert torch.equal(first, again)
        # the decode: the padded row writes the scratch slot only
        slots = [store.clone() for store in speech.acoustic.store.values()]
        latents = torch.randn(3, 1, speech.width, generator=g)
        speech.decode([0, 1, 2], latents)
        for before, store in zip(slots, speech.acoustic.store.values(), strict=True):
            assert torch.equal(before[3:-1], store[3:-1])  # slot 3 (no row here) kept
            assert not torch.equal(before[:3], store[:3])


def test_engine_mode_graphs_rows_equal_eager_rows_exactly_on_cpu(engines):
    """Where a bucket holds exactly the speaking rows, graphs mode is bit for bit the
    eager mode."""
    sinks = {mode: drive(eng, rows_in_full_buckets()) for mode, eng in engines.items()}
    graphs = engines["graphs"].steps.speech
    assert graphs.mode == "graphs"
    made = {("diffuse", 10, 1), ("diffuse", 10, 2), ("diffuse", 4, 2), ("decode", 4)}
    assert made <= set(graphs.graphs)
    assert not engines["eager"].steps.speech.graphs  # eager makes none
    assert [sinks[m].end_step for m in sinks] == [dict.fromkeys("abcd", 11)] * 2
    for rid in "abcd":
        got, want = sinks["graphs"].pcm(rid), sinks["eager"].pcm(rid)
        assert len(want) > 0 and np.array_equal(got, want), rid


def test_padded_buckets_differ_from_eager_by_float_rounding_only(engines):
    """Three rows run in a bucket of 4: a matmul of 4 rows and one of 3 may round a
    row's last bit apart on CPU (the BLAS blocks by row count), so here the rows are
    equal to float32 rounding, not bit for bit (the padded row's values never matter:
    test_padded_rows_do_not_change_the_real_rows)."""
    sinks = {mode: drive(eng, rows_of_three()) for mode, eng in engines.items()}
    assert ("decode", 4) in engines["graphs"].steps.speech.graphs
    for rid in ("a", "b", "c"):
        got, want = sinks["graphs"].pcm(rid), sinks["eager"].pcm(rid)
        assert len(got) == len(want) > 0
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), rid


def test_a_graph_that_disagrees_with_eager_falls_back_to_eager(
    engines, monkeypatch, caplog, tiny_model_dir
):
    want = drive(engines["eager"], rows_of_three())
    spec = EngineSpec(
        engine="vibevoice", model_path=tiny_model_dir, max_batch_size=4, engine_mode="graphs"
    )
    eng = VibeVoiceEngine(spec)
    eng.load()
    run = Graph.run

    def off_by_a_little(self):  # a replay that is wrong by more than the tolerance
        return tuple(t + 0.01 * t.abs().max() for t in run(self))

    monkeypatch.setattr(Graph, "run", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        got = drive(eng, rows_of_three())
    assert "this worker goes on eager" in caplog.text
    assert eng.steps.speech.mode == "eager" and not eng.steps.speech.graphs
    for rid in ("a", "b", "c"):
        assert np.array_equal(got.pcm(rid), want.pcm(rid)), rid


def test_the_check_passes_a_graph_that_agrees(engines, caplog):
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        drive(engines["graphs"], rows_of_three())
    assert "goes on eager" not in caplog.text
    assert engines["graphs"].steps.speech.mode == "graphs"


def test_engine_mode_auto_is_eager_on_cpu(engine):
    assert engine.steps.speech.mode == "eager"


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["gpu-kernels", "cpu-kernels"])
def test_the_loop_and_the_conv_stacks_compile_with_fullgraph(engines, cpu_kernels, monkeypatch):
    """torch.compile(fullgraph=True) raises at the first graph break. The backend is
    aot_eager: it traces the whole function through dynamo and AOTAutograd (what
    fullgraph proves: one graph, no break, no data-dependent shape) without inductor's
    code generation, which takes minutes on one CPU core. Static shapes (dynamic=False),
    as a captured bucket has. The conv stacks both ways: the conv kernels a GPU's
    captured graph holds, and the CPU's own operators (conv_stacks.CPU_KERNELS)."""
    monkeypatch.setattr(conv_stacks, "CPU_KERNELS", cpu_kernels)
    speech: Speech = engines["eager"].steps.speech
    torch._dynamo.reset()
    hidden = speech.head.cond_proj.in_features
    g = torch.Generator().manual_seed(9)
    packed = torch.cat([torch.randn(4, speech.width, generator=g), torch.full((4, 1), 1.3)], 1)
    cond = torch.randn(8, hidden, generator=g)
    schedule = speech.schedule(10)
    with torch.no_grad():
        loop = torch.compile(diffusion_loop, fullgraph=True, backend="aot_eager", dynamic=False)
        assert torch.equal(
            loop(speech.head, schedule, packed, cond),
            diffusion_loop(speech.head, schedule, packed, cond),
        )
        slots = torch.tensor([0, 2, 1, speech.acoustic.scratch])
        latents = torch.randn(4, 1, speech.width, generator=g)
        stores = [*speech.acoustic.store.values(), *speech.semantic.store.values()]
        start = [t.clone() for t in stores]
        want = speech.decode_rows(slots, latents)
        after = [t.clone() for t in stores]
        for t, s in zip(stores, start, strict=True):
            t.copy_(s)
        decode = torch.compile(
            speech.decode_rows, fullgraph=True, backend="aot_eager", dynamic=False
        )
        got = decode(slots, latents)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        for t, a in zip(stores, after, strict=True):  # the slots moved in place, the same
            assert torch.equal(t, a)
    torch._dynamo.reset()


def test_a_checked_run_compares_from_the_same_state_and_skips_the_scratch_row():
    """Graph.checked_run: the eager call starts from the state the run started from
    (a function that accumulates into its state gives the same answer twice), and a
    difference in the scratch row alone is no mismatch."""
    state = torch.zeros(3, 2)
    x = torch.ones(3, 2)
    calls = []

    def accumulate(x):
        calls.append(1)
        state.add_(x)
        if len(calls) == 1:  # the run writes something else into the scratch row
            state[-1] += 5
        return (state.sum(dim=1),)

    graph = Graph(accumulate, {"x": x}, [state], scratch_last=True)
    with pytest.raises(Mismatch):  # its output read the scratch row
        graph.checked_run(1e-6)
    state.zero_()
    calls.clear()

    def rows_only(x):
        calls.append(1)
        state.add_(x)
        if len(calls) == 1:
            state[-1] += 5
        return (state[:-1].sum(dim=1),)

    graph = Graph(rows_only, {"x": x}, [state], scratch_last=True)
    (out,) = graph.checked_run(1e-6)
    assert torch.equal(out, torch.full((2,), 2.0)) and len(calls) == 2
    assert torch.equal(state[:-1], torch.ones(2, 2))  # once, not twice


def test_the_conv_stacks_equal_transformers_forwards_chunk_after_chunk(engines):
    """conv_stacks.run_stack on stream slots against transformers' decoder and encoder
    forwards on their own padding cache, over successive chunks (the streaming state
    carried in place): equal to float32 rounding, 1e-5 of the peak (the BLAS and conv
    kernels a CPU picks round apart through the stacks' depth)."""
    from transformers.models.vibevoice_acoustic_tokenizer import (
        modeling_vibevoice_acoustic_tokenizer as mod,
    )

    from workers.engines.vibevoice.conv_stacks import run_stack

    speech: Speech = engines["eager"].steps.speech
    m = speech.model.model
    slots = torch.tensor([2, 0])
    speech.zero(slots)
    theirs = [mod.VibeVoiceAcousticTokenizerConv1dPaddingCache() for _ in range(2)]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, speech.width, 1, generator=g)
            want = m.audio_tower.decoder(x, padding_cache=theirs[0], use_cache=True).audio
            got = run_stack(m.audio_tower.decoder, x, speech.acoustic.at(slots))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
            enc = m.semantic_tokenizer_encoder
            want = enc(want, padding_cache=theirs[1], use_cache=True).latents
            got = run_stack(enc, got, speech.semantic.at(slots)).permute(0, 2, 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    speech.zero(slots)


def test_a_capture_that_raises_at_load_leaves_the_worker_on_eager(
    engines, monkeypatch, caplog, tiny_model_dir
):
    """A CUDA capture can raise (an operator that syncs, out of memory). On CPU the
    capture step is not reached, so it is made to raise as CUDA's would: the engine
    still loads, logs why, and its rows are exactly eager's."""
    want = drive(engines["eager"], rows_of_three())
    calls = []

    def capture_fails(self, *args, **kwargs):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(Graph, "__init__", capture_fails)
    spec = EngineSpec(
        engine="vibevoice", model_path=tiny_model_dir, max_batch_size=4, engine_mode="graphs"
    )
    eng = VibeVoiceEngine(spec)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        eng.load()
        got = drive(eng, rows_of_three())
    assert len(calls) == 1, "the first failed capture turns graphs off; none is tried again"
    assert "capturing failed (RuntimeError: operation not permitted" in caplog.text
    assert "this worker goes on eager" in caplog.text
    assert eng.steps.speech.mode == "eager" and not eng.steps.speech.graphs
    for rid in ("a", "b", "c"):
        assert np.array_equal(got.pcm(rid), want.pcm(rid)), rid


def test_a_capture_that_raises_in_a_step_serves_that_step_eagerly(
    engines, monkeypatch, caplog, tiny_model_dir
):
    """A bucket first needed mid-run (not made at load) whose capture raises: that very
    step runs eagerly and every row still equals eager's."""
    want = drive(engines["eager"], rows_of_three())
    spec = EngineSpec(
        engine="vibevoice", model_path=tiny_model_dir, max_batch_size=4, engine_mode="graphs"
    )
    eng = VibeVoiceEngine(spec)
    eng.load()
    speech = eng.steps.speech
    made = set(speech.graphs)
    assert ("decode", 2) in made
    del speech.graphs[("decode", 2)]  # as if bucket 2 had not been made at load
    real = Graph.__init__

    def fails_for_two(self, fn, inputs, *args, **kwargs):
        if next(iter(inputs.values())).shape[0] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (capture of bucket 2)")
        real(self, fn, inputs, *args, **kwargs)

    monkeypatch.setattr(Graph, "__init__", fails_for_two)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        got = drive(eng, rows_of_three())
    assert "capturing failed (OutOfMemoryError" in caplog.text
    assert speech.mode == "eager" and not speech.graphs
    for rid in ("a", "b", "c"):
        assert np.array_equal(got.pcm(rid), want.pcm(rid)), rid
