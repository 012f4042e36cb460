"""The step engine in process, on the tiny model: each row equals transformers'
`generate` for that row alone (tests/vibevoice_reference.py says how the
reference follows microsoft's loop), whatever joins or leaves beside it.

Rows are driven step by step through workers/host/step_host.StepHost, as a worker
drives them, so "joins at step 3" means exactly the third step boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vibevoice_reference import Reference

from workers.engines.vibevoice.engine import HOP_SAMPLES
from workers.host.step_host import StepHost
from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError, Request, Turn

TOL = 1e-4  # of the row's peak, float32


class Sink:
    def __init__(self):
        self.audio: dict[str, list[np.ndarray]] = {}
        self.ends: dict[str, object] = {}
        self.steps = 0
        self.first_chunk_step: dict[str, int] = {}  # 0-based index of the step
        self.end_step: dict[str, int] = {}

    def started(self, rid, at, from_samples=0):
        assert rid not in self.audio and rid not in self.ends

    def chunk(self, rid, pcm, history=None):
        self.audio.setdefault(rid, []).append(pcm)
        self.first_chunk_step.setdefault(rid, self.steps)

    def finish(self, rid, stop_reason="eos"):
        assert rid not in self.ends
        self.ends[rid] = stop_reason
        self.end_step[rid] = self.steps  # 0-based index of the step it ended in

    def fail(self, rid, error):
        assert rid not in self.ends and isinstance(error, PoolError)
        self.ends[rid] = error

    def step(self):
        self.steps += 1

    def pcm(self, rid) -> np.ndarray:
        return np.concatenate(self.audio[rid])


def req(rid, text="Hello there, how are you today?", **kw) -> Request:
    kw.setdefault("stream", True)
    return Request(id=rid, turns=(Turn(0, text),), **kw)


def voice(seconds=0.7, f=180.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.2 * np.sin(2 * np.pi * f * t)).astype(np.float32)


@pytest.fixture(scope="module", params=["eager", "graphs"])
def engine(request, tiny_model_dir):
    """The tiny model's engine of up to 4 rows, in each engine mode: "graphs" runs the
    diffusion loop and the audio decode/encode through their static per-bucket buffers
    (on CPU the plain calls a CUDA graph would capture), so everything here holds in
    both modes."""
    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice.engine import VibeVoiceEngine

    spec = EngineSpec(
        engine="vibevoice",
        model_path=tiny_model_dir,
        max_batch_size=4,
        engine_mode=request.param,
    )
    eng = VibeVoiceEngine(spec)
    eng.load()
    assert eng.steps.speech.mode == request.param
    return eng


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def drive(engine, joins: dict[int, list[Request]], cancels: dict[int, list[str]] | None = None):
    """Run until every row ended; requests in joins[k] are submitted at step boundary k,
    cancels[k] are cancelled there."""
    sink = Sink()
    host = sink.host = StepHost(engine, sink)
    boundary = 0
    while True:
        for r in joins.get(boundary, []):
            host.submit(r)
        for rid in (cancels or {}).get(boundary, []):
            host.cancel(rid)
        if host.idle and boundary >= max(joins):
            return sink
        host.run_step()
        boundary += 1
        assert boundary < 500, "the rows never ended"


def assert_alone(reference, sink, r: Request) -> None:
    got = sink.pcm(r.id)
    want = reference.audio(r, len(got) // HOP_SAMPLES)
    assert len(got) == len(want) and len(got) % HOP_SAMPLES == 0
    peak = np.abs(want).max()
    assert peak > 1e-3
    assert np.abs(got - want).max() < TOL * peak, f"{r.id} differs from its solo run"


def test_a_row_alone_equals_transformers_generate(engine, reference):
    rows = [
        req("plain", seed=1, est_audio_s=1.2),
        req("voiced", "Short one.", seed=2, voices=(voice(),), est_audio_s=0.8),
        req("cfg-steps", seed=3, cfg_scale=2.0, inference_steps=4, est_audio_s=0.6),
    ]
    for r in rows:
        sink = drive(engine, {0: [r]})
        assert sink.ends[r.id] == "estimate"
        assert len(sink.pcm(r.id)) == int(r.est_audio_s * SAMPLE_RATE // HOP_SAMPLES) * HOP_SAMPLES
        assert_alone(reference, sink, r)


def test_rows_joining_at_steps_0_3_and_10_and_ending_early_each_sound_as_alone(engine, reference):
    long = req("long", seed=11, est_audio_s=3.0)  # 22 tokens
    early = req("early", "Quick.", seed=12, est_audio_s=0.5, voices=(voice(0.5, 230.0),))
    late = req("late", seed=13, cfg_scale=1.8, inference_steps=6, est_audio_s=1.0, stream=False)
    other = req("other", "Yet another speaker line.", seed=14, est_audio_s=0.4)
    sink = drive(engine, {0: [long], 3: [early], 10: [late, other]})
    # each row's first audio comes in the very step it joined
    assert sink.first_chunk_step["long"] == 0 and sink.first_chunk_step["early"] == 3
    assert sink.first_chunk_step["other"] == 10
    assert list(sink.ends) == ["early", "other", "late", "long"]  # short rows leave first
    for r in (long, early, late, other):
        assert_alone(reference, sink, r)
    assert engine.steps.kv.rows == 0 and engine.live == 0


def test_a_cancelled_row_frees_its_place_for_a_waiting_one(engine, reference, monkeypatch):
    monkeypatch.setattr(engine.steps, "max_rows", 2)
    a = req("a", seed=21, est_audio_s=2.0)
    b = req("b", seed=22, est_audio_s=2.0)
    c = req("c", seed=23, est_audio_s=0.8)
    sink = drive(engine, {0: [a, b], 1: [c]}, cancels={5: ["b"]})
    err = sink.ends["b"]
    assert isinstance(err, PoolError) and err.kind is ErrorKind.CANCELLED
    assert len(sink.pcm("b")) == 5 * HOP_SAMPLES  # nothing after the cancel
    assert sink.first_chunk_step["c"] == 5  # joined at the boundary where b left
    for r in (a, c):
        assert_alone(reference, sink, r)


FIDELITY = 1e-5  # conditions and audio, absolute, float32


class Forced:
    """The step engine along forced token paths (the tiny model never picks speech_end,
    speech_start or EOS itself): `plans[row id]` maps a row's step (0-based) to the token
    it draws there; `caps[row id]` is a row's step cap. Records, per row, each
    diffusion's (positive, negative) conditions."""

    def __init__(self, engine, monkeypatch, plans, caps):
        self.plans, self.caps = plans, caps
        self.conditions: dict[str, list] = {}
        steps = engine.steps
        choose, diffuse, prepare = steps._choose, steps.speech.diffuse, engine.prepare

        def forced_choose(hidden):
            tokens = choose(hidden)
            for i, row in enumerate(steps.rows):
                token = self.plans.get(row.id, {}).get(row.steps)
                if token is not None:
                    tokens[i] = token
            return tokens

        def recorded_diffuse(rows, pos, neg):
            for k, row in enumerate(rows):
                self.conditions.setdefault(row.id, []).append((pos[k].clone(), neg[k].clone()))
            return diffuse(rows, pos, neg)

        def capped_prepare(request):
            row = prepare(request)
            if request.id in self.caps:
                row.max_steps = self.caps[request.id]
            return row

        monkeypatch.setattr(steps, "_choose", forced_choose)
        monkeypatch.setattr(steps.speech, "diffuse", recorded_diffuse)
        monkeypatch.setattr(engine, "prepare", capped_prepare)


def assert_as_reference(reference, forced, sink, r: Request, max_new_tokens: int) -> int:
    """The row's every diffusion condition and its audio equal transformers' generate
    for that row alone along the same token path; returns its count of diffusions."""
    want_audio, want_conds = reference.forced(r, max_new_tokens, forced.plans.get(r.id, {}))
    got_conds = forced.conditions[r.id]
    assert len(got_conds) == len(want_conds) > 0
    for k, ((pos, neg), (want_pos, want_neg)) in enumerate(zip(got_conds, want_conds, strict=True)):
        assert (pos - want_pos[0]).abs().max() < FIDELITY, f"{r.id}: positive at diffusion {k}"
        assert (neg - want_neg[0]).abs().max() < FIDELITY, f"{r.id}: negative at diffusion {k}"
    got = sink.pcm(r.id)
    assert len(got) == len(want_audio) == len(got_conds) * HOP_SAMPLES
    assert np.abs(got - want_audio).max() < FIDELITY, f"{r.id}: audio"
    return len(got_conds)


def test_forced_speech_end_start_eos_and_cap_follow_the_reference_alone_and_batched(
    engine, reference, monkeypatch
):
    """microsoft's loop on a forced path: speech_end zeroes the row's stream caches;
    speech_start restarts its negative branch (the next negative token attends only
    itself, at position 0); EOS ends it; on its capping step a row ends before it
    diffuses. Each row's every diffusion condition (positive and negative) and its
    audio equal transformers' generate for the row alone, with or without mates."""
    cfg = engine.model.config
    turns = req("turns", seed=31, est_audio_s=1.0)  # 7 audio tokens in 9 steps
    eos = req("eos", "An early end.", seed=34, est_audio_s=2.0)
    cap = req("cap", "Cut by its step cap.", seed=35, est_audio_s=2.0)
    plans = {
        "turns": {4: cfg.audio_eos_token_id, 5: cfg.audio_bos_token_id},
        "eos": {3: cfg.eos_token_id},
    }
    forced = Forced(engine, monkeypatch, plans, caps={"cap": 5})
    tokens = {"turns": 9, "eos": 40, "cap": 5}  # the reference's max_new_tokens
    for r in (turns, eos, cap):
        sink = drive(engine, {0: [r]})
        assert assert_as_reference(reference, forced, sink, r, tokens[r.id]) > 0
    assert sink.ends == {"cap": "runaway_cap"} and sink.end_step["cap"] == 5
    assert len(forced.conditions["turns"]) == 7 and len(forced.conditions["eos"]) == 3
    assert len(forced.conditions["cap"]) == 5  # its sixth step (the capping one) did not diffuse
    alone = {rid: conds for rid, conds in forced.conditions.items()}

    forced.conditions = {}
    mates = [req("m1", seed=32, est_audio_s=2.0), req("m2", seed=33, est_audio_s=0.3)]
    sink = drive(engine, {0: [mates[0], eos], 2: [turns, mates[1]], 4: [cap]})
    assert sink.ends["eos"] == "eos" and sink.ends["cap"] == "runaway_cap"
    assert sink.end_step["eos"] == 3 and sink.end_step["cap"] == 4 + 5
    for r in (turns, eos, cap):
        assert_as_reference(reference, forced, sink, r, tokens[r.id])
        assert len(forced.conditions[r.id]) == len(alone[r.id])
    for m in mates:
        assert_alone(reference, sink, m)


def test_the_negative_branch_restarts_at_speech_start_as_microsofts_does(
    engine, reference, monkeypatch
):
    """The reset changes what the guidance sees: after speech_start the negative condition
    differs from the one an unreset branch gives, and equals the reference's."""
    cfg = engine.model.config
    x = req("x", seed=31, est_audio_s=1.0)
    plans = {"x": {4: cfg.audio_eos_token_id, 5: cfg.audio_bos_token_id}}
    forced = Forced(engine, monkeypatch, plans, caps={})
    drive(engine, {0: [x]})
    reset = forced.conditions["x"]
    forced.conditions = {}
    monkeypatch.setattr(engine.steps, "_reset_negative", lambda i: None)
    drive(engine, {0: [x]})
    kept = forced.conditions["x"]
    # the first four diffusions come before speech_start: the same either way
    for k in range(4):
        assert torch.equal(reset[k][1], kept[k][1])
    assert all((reset[k][1] - kept[k][1]).abs().max() > 1e-3 for k in range(4, 7))
    _, want = reference.forced(x, 9, plans["x"])
    assert all((reset[k][1] - want[k][1][0]).abs().max() < FIDELITY for k in range(7))


def test_a_row_that_does_not_fit_waits_for_one_to_leave(engine, monkeypatch):
    steps = engine.steps
    small, big = req("small", seed=41, est_audio_s=0.8), req("big", seed=42, est_audio_s=2.0)
    need = {r.id: steps.peak_bytes([steps._shape(engine.prepare(r))]) for r in (small, big)}
    budget = need["big"] + need["small"] // 2  # room for either alone, not both
    monkeypatch.setattr(steps, "mem_budget_bytes", budget)
    peak = [0]
    real = steps._step

    def watched(sink):
        real(sink)
        peak[0] = max(peak[0], steps.kv.bytes())

    monkeypatch.setattr(steps, "_step", watched)
    sink = drive(engine, {0: [small], 1: [big]})
    assert sink.first_chunk_step["big"] > sink.first_chunk_step["small"] + 4
    assert sink.first_chunk_step["big"] == 6  # admitted at the boundary where small left
    assert sink.ends == {"small": "estimate", "big": "estimate"}
    assert 0 < peak[0] <= budget
    # a row that could never fit is refused at once, with what it needs
    monkeypatch.setattr(steps, "mem_budget_bytes", need["small"] // 2)
    sink = drive(engine, {0: [big]})
    err = sink.ends["big"]
    assert isinstance(err, PoolError) and err.kind is ErrorKind.OUT_OF_MEMORY
    assert "MiB" in err.message and "big" not in sink.audio


def test_out_of_memory_mid_batch_restarts_the_rows_without_repeating_audio(
    engine, reference, monkeypatch
):
    steps = engine.steps
    monkeypatch.setattr(steps, "max_rows", steps.max_rows)
    real = steps._step
    fired = []

    def once(sink):
        if steps.steps == 6 and not fired:
            fired.append(len(steps.rows))
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(sink)

    monkeypatch.setattr(steps, "_step", once)
    a = req("a", seed=51, est_audio_s=1.5)
    b = req("b", seed=52, est_audio_s=1.2, stream=False)
    steps.steps = 0
    sink = drive(engine, {0: [a, b]})
    assert fired == [2] and sink.host.max_rows == 1
    for r in (a, b):
        assert sink.ends[r.id] == "estimate"
        assert_alone(reference, sink, r)


def test_workers_sharing_a_gpu_each_count_their_share_of_its_free_memory(engine, monkeypatch):
    """With no budget set, a worker admitted rows against the GPU's whole free memory;
    configs/vibevoice-1.5b.yaml runs two workers a GPU, and both counted the same free
    GiBs, admitting together up to twice what fits (then out of memory at a step)."""
    steps = engine.steps
    free = 8 << 30
    monkeypatch.setattr(steps, "mem_budget_bytes", 0)
    monkeypatch.setattr(steps, "device", "cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 80 << 30))
    held, headroom = steps.kv.pool_bytes(), steps.mem_headroom_bytes
    monkeypatch.setattr(steps, "gpu_share", 1)
    alone = steps.budget_bytes()
    monkeypatch.setattr(steps, "gpu_share", 2)
    shared = steps.budget_bytes()
    assert alone == free + held - headroom
    assert shared == free // 2 + held - headroom  # two such workers: free in all
    from vibevoice_pool.config import build
    from vibevoice_pool.pool.devices import Placement, engine_specs

    cfg = build({"engine": "sim", "workers_per_gpu": 2})
    places = [Placement("cuda:0", 0), Placement("cuda:0", 0), Placement("cpu:2", None)]
    assert [s.gpu_share for s in engine_specs(cfg, places, "")] == [2, 2, 1]
