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

    def chunk(self, rid, pcm):
        self.audio.setdefault(rid, []).append(pcm)
        self.first_chunk_step.setdefault(rid, self.steps)

    def finish(self, rid, stop_reason="eos"):
        assert rid not in self.ends
        self.ends[rid] = stop_reason

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


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def drive(engine, joins: dict[int, list[Request]], cancels: dict[int, list[str]] | None = None):
    """Run until every row ended; requests in joins[k] are submitted at step boundary k,
    cancels[k] are cancelled there."""
    sink = Sink()
    host = StepHost(engine, sink)
    boundary = 0
    while True:
        for r in joins.get(boundary, []):
            host.submit(r)
        for rid in (cancels or {}).get(boundary, []):
            host.cancel(rid)
        host.admit()
        if not host.live and not host.pending and boundary >= max(joins):
            return sink
        host.step()
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
        req("cfg-steps", seed=3, cfg_scale=2.5, inference_steps=4, est_audio_s=0.6),
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
    assert engine.steps.pos.rows == engine.steps.neg.rows == 0 and engine.live == 0


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


def test_speech_end_and_start_move_only_their_own_row(engine):
    """microsoft's loop: speech_end zeroes the row's stream caches, speech_start resets
    its negative branch to its first entry, and a row that does not diffuse in a step
    keeps its negative context. The tiny model never picks those tokens: they are forced."""
    steps = engine.steps
    cfg = engine.model.config
    plan = [None] * 4 + [cfg.audio_eos_token_id, cfg.audio_bos_token_id] + [None] * 4
    checks: list[str] = []
    real = steps._choose

    def choose(logits):
        toks = real(logits)
        for i, row in enumerate(steps.rows):
            if row.id != "x":
                continue
            if row.steps == 5:  # after speech_end: its stream caches are zero
                store = [t[row.slot] for t in steps.speech.acoustic.store.values()]
                store += [t[row.slot] for t in steps.speech.semantic.store.values()]
                assert all(not t.any() for t in store)
                checks.append("zeroed")
            if row.steps == 6:  # after speech_start: one attended negative entry, position 1
                assert int(steps.neg.mask[i].sum()) == 1 and int(steps.neg.pos[i]) == 1
                checks.append("reset")
            if row.steps < len(plan) and plan[row.steps] is not None:
                toks[i] = plan[row.steps]
        return toks

    steps._choose = choose
    try:
        x = req("x", seed=31, est_audio_s=1.0)  # 7 audio tokens, 9 steps
        alone = drive(engine, {0: [x]})
        mates = [req("m1", seed=32, est_audio_s=2.0), req("m2", seed=33, est_audio_s=0.3)]
        beside = drive(engine, {0: [mates[0]], 2: [x, mates[1]]})
    finally:
        del steps._choose
    assert checks == ["zeroed", "reset"] * 2
    a, b = alone.pcm("x"), beside.pcm("x")
    assert len(a) == len(b) == 7 * HOP_SAMPLES
    assert np.abs(a - b).max() < TOL * np.abs(a).max()
    plain = drive(engine, {0: [req("x", seed=31, est_audio_s=1.0)]}).pcm("x")
    assert np.array_equal(plain[: 4 * HOP_SAMPLES], a[: 4 * HOP_SAMPLES])
    assert not np.allclose(plain[4 * HOP_SAMPLES :], a[4 * HOP_SAMPLES :])


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
        peak[0] = max(peak[0], steps.pos.bytes() + steps.neg.bytes())

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
    assert fired == [2] and steps.max_rows == 1
    for r in (a, b):
        assert sink.ends[r.id] == "estimate"
        assert_alone(reference, sink, r)
