"""The LM's decode step without transformers' module machinery
(workers/engines/vibevoice/decode_lm.py): bit for bit transformers' forward in every
step of rows that join and leave, through each attention path (sdpa, eager, the flash
path's code with a stand-in kernel), with fewer operators; an LM of another shape
keeps transformers' forward."""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
from test_fused_lm import small_lm
from test_paged_kv import kvcache_stand_in
from test_step_engine import drive, req
from torch.utils._python_dispatch import TorchDispatchMode

from workers.engines.contract import EngineSpec
from workers.engines.vibevoice.decode_lm import CHECKED_STEPS, DecodeLM
from workers.engines.vibevoice.engine import VibeVoiceEngine
from workers.engines.vibevoice.fused_lm import fuse_projections
from workers.engines.vibevoice.paged_kv import PAGED_FLASH, register_paged_flash
from workers.engines.vibevoice.step import StepEngine


def load(model_dir, dtype: str = "float32") -> VibeVoiceEngine:
    eng = VibeVoiceEngine(
        EngineSpec(engine="vibevoice", model_path=model_dir, max_batch_size=4, dtype=dtype)
    )
    eng.load()
    return eng


@pytest.fixture
def engine(tiny_model_dir):
    return load(tiny_model_dir)


class Ops(TorchDispatchMode):
    """Operators dispatched, views left out."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def both_ways(monkeypatch) -> list[dict]:
    """Every decode forward of the engine run twice on the same step: the lean decode,
    then transformers' forward (the one the engine goes on with); what each gave and
    dispatched, per step."""
    real = StepEngine._forward
    seen: list[dict] = []

    def forward(self, seqs, embeds):
        lean = self.decode_lm
        assert lean is not None
        lean.checks_left = 0  # the lean forward's own output, every step
        with Ops() as ops_lean:
            got = real(self, seqs, embeds)
        self.decode_lm = None
        try:
            with Ops() as ops_hf:
                want = real(self, seqs, embeds)
        finally:
            self.decode_lm = lean
        seen.append({"rows": len(seqs), "got": got, "want": want, "ops": (ops_lean, ops_hf)})
        return want

    monkeypatch.setattr(StepEngine, "_forward", forward)
    return seen


ROWS = {
    0: [req("a", seed=61, est_audio_s=2.0)],
    2: [req("b", "Short.", seed=62, est_audio_s=0.5), req("c", seed=63, est_audio_s=1.2)],
}


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash"])
def test_the_lean_decode_is_transformers_forward_bit_for_bit(engine, monkeypatch, attention):
    steps = engine.steps
    if attention == "flash":
        register_paged_flash()
        monkeypatch.setattr(steps, "flash", kvcache_stand_in)
        attention = PAGED_FLASH
    monkeypatch.setattr(steps, "decode_attn", attention)
    monkeypatch.setattr(steps, "kv", steps._new_kv())
    seen = both_ways(monkeypatch)
    sink = drive(engine, ROWS)
    assert set(sink.ends) == {"a", "b", "c"}
    assert len(seen) >= 12 and {s["rows"] for s in seen} >= {2, 6}  # 1 row, then 3 (x2 branches)
    for k, s in enumerate(seen):
        assert s["got"].shape == s["want"].shape
        assert torch.equal(s["got"], s["want"]), f"step {k}: differs from transformers'"


def test_in_bfloat16_too_the_lean_decode_is_transformers_forward(tiny_model_dir, monkeypatch):
    """bfloat16 rounds at every operator, so the order of operations shows: on CPU each
    is transformers' own. (On CUDA F.rms_norm is a fused kernel, which this cannot
    check; decode_lm keeps the weight's multiply apart so that it rounds where
    transformers rounds.)"""
    engine = load(tiny_model_dir, "bfloat16")
    assert engine.steps.dtype == torch.bfloat16
    seen = both_ways(monkeypatch)
    drive(engine, ROWS)
    assert len(seen) >= 12
    for k, s in enumerate(seen):
        assert torch.equal(s["got"], s["want"]), f"step {k}: differs from transformers'"


def test_the_lean_decode_dispatches_fewer_operators(engine, monkeypatch):
    """q and k rotated together, the half rotation one flip: 6 operators fewer a layer,
    against 2 more a step (the sine's sign); the attention and the matmuls as they were."""
    seen = both_ways(monkeypatch)
    drive(engine, {0: [req("a", seed=64, est_audio_s=0.4)]})
    layers = engine.steps.lm.config.num_hidden_layers
    lean, hf = seen[-1]["ops"]
    assert sum(lean.count.values()) == sum(hf.count.values()) - 6 * layers + 2
    # new names: the flip, and F.rms_norm's in-place add of the epsilon
    assert set(lean.count) - set(hf.count) == {"flip", "add_"}
    for op in [op for op in hf.count if "attention" in op] + ["mm", "addmm"]:
        assert lean.count[op] == hf.count[op], op


def test_its_first_steps_are_checked_against_transformers_forward(engine, caplog):
    lean = engine.steps.decode_lm
    calls = []
    real = lean.decode
    lean.decode = lambda *a, **k: calls.append(1) or real(*a, **k)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        drive(engine, {0: [req("a", seed=65, est_audio_s=0.8)]})
    assert "decode_lm" not in caplog.text
    assert engine.steps.decode_lm is lean and lean.checks_left == 0 and len(calls) > CHECKED_STEPS


@pytest.mark.parametrize("fault", ["differs", "raises"])
def test_a_lean_decode_that_disagrees_gives_way_to_transformers_forward(
    tiny_model_dir, monkeypatch, caplog, fault
):
    """A transformers release whose modules moved: the lean decode differs (or raises) in
    the first step; the worker warns, goes on with transformers' forward, and the rows
    sound exactly as they do with transformers' forward from the start."""
    rows = {0: [req("a", seed=66, est_audio_s=1.0)], 1: [req("b", seed=67, est_audio_s=0.6)]}
    plain = load(tiny_model_dir)
    plain.steps.decode_lm = None
    want = drive(plain, rows)
    engine = load(tiny_model_dir)
    lean = engine.steps.decode_lm
    real = lean.decode

    def wrong(*args, **kwargs):
        if fault == "raises":
            raise AttributeError("'Qwen2Attention' object has no attribute 'q_proj'")
        out = real(*args, **kwargs)
        return out + 0.01 * out.abs().max()

    monkeypatch.setattr(lean, "decode", wrong)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        got = drive(engine, rows)
    assert "runs transformers' LM forward" in caplog.text
    assert ("AttributeError" in caplog.text) == (fault == "raises")
    assert engine.steps.decode_lm is None
    for rid in ("a", "b"):
        assert got.ends[rid] == want.ends[rid]
        assert torch.equal(torch.from_numpy(got.pcm(rid)), torch.from_numpy(want.pcm(rid))), rid


def test_an_lm_of_another_shape_keeps_transformers_forward():
    plain = small_lm()
    assert DecodeLM.build(plain) is None  # projections not fused
    fused = copy.deepcopy(plain)
    fuse_projections(fused)
    assert isinstance(DecodeLM.build(fused), DecodeLM)
    sliding = copy.deepcopy(fused)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert DecodeLM.build(sliding) is None
    gelu = copy.deepcopy(fused)
    gelu.config.hidden_act = "gelu"
    assert DecodeLM.build(gelu) is None
