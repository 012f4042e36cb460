"""engine_mode graphs-lm (workers/engines/vibevoice/lm_graph.py), on CPU: the LM's decode
step over static per-bucket buffers (a plain call of what CUDA would capture). Rows that
join and leave sound as in eager mode; padded rows touch no seq's KV and leave block 0
zero; a grown pool remakes the graphs; the flash path's buffers (with a stand-in
kernel); a replay that disagrees with eager, and a capture that raises, leave the worker
on the eager LM with its audio exactly eager's.
"""

from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest
import torch
from test_diffusion_graphs import rows_of_three
from test_paged_kv import kvcache_stand_in
from test_step_engine import drive, req

from workers.engines.contract import EngineSpec
from workers.engines.vibevoice.engine import VibeVoiceEngine
from workers.engines.vibevoice.graphs import Graph
from workers.engines.vibevoice.lm_graph import LMGraphs, width_bucket
from workers.engines.vibevoice.paged_kv import PAGED_FLASH, PagedKV, register_paged_flash

ROUNDING = 1e-5  # of the peak: padded buckets and wider tables sum in another order


def load(model_dir, mode: str) -> VibeVoiceEngine:
    spec = EngineSpec(engine="vibevoice", model_path=model_dir, max_batch_size=4, engine_mode=mode)
    eng = VibeVoiceEngine(spec)
    eng.load()
    return eng


@pytest.fixture(scope="module")
def eager_rows(tiny_model_dir):
    return drive(load(tiny_model_dir, "eager"), rows_of_three())


@pytest.fixture(scope="module")
def graphs_rows(tiny_model_dir):
    """engine_mode graphs: the diffusion and decode in their buckets, the LM eager."""
    return drive(load(tiny_model_dir, "graphs"), rows_of_three())


def counting(monkeypatch) -> list[tuple[int, int]]:
    """The keys of every LM graph made from now on."""
    made: list[tuple[int, int]] = []
    real = LMGraphs._capture

    def capture(self, key, kv, like):
        made.append(key)
        return real(self, key, kv, like)

    monkeypatch.setattr(LMGraphs, "_capture", capture)
    return made


def assert_as_eager(got, want, exact: bool = False) -> None:
    for rid in ("a", "b", "c"):
        a, b = got.pcm(rid), want.pcm(rid)
        assert len(a) == len(b) > 0, rid
        if exact:
            assert np.array_equal(a, b), rid
        else:
            assert np.abs(a - b).max() <= ROUNDING * np.abs(b).max(), rid


def test_width_buckets_are_powers_of_two():
    assert [width_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 100)] == [1, 2, 4, 4, 8, 8, 16, 128]


def test_rows_joining_and_leaving_sound_as_in_eager_mode(
    tiny_model_dir, eager_rows, monkeypatch, caplog
):
    made = counting(monkeypatch)
    eng = load(tiny_model_dir, "graphs-lm")
    assert eng.steps.lm_graphs is not None and eng.steps.speech.mode == "graphs"
    replays = []
    real_run = LMGraphs.run

    def run(self, step, embeds):
        out = real_run(self, step, embeds)
        replays.append(embeds.shape[0])
        return out

    monkeypatch.setattr(LMGraphs, "run", run)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        got = drive(eng, rows_of_three())
    assert "eagerly" not in caplog.text and "goes on eager" not in caplog.text
    assert eng.steps.lm_graphs is not None and eng.steps.lm_graphs.on
    # a alone runs decode_lm's checked steps; then 2 and 3 rows (4 and 6 branch-rows:
    # buckets 4 and a padded 8)
    assert {4, 6} <= set(replays)
    assert {k[0] for k in made} >= {4, 8}
    assert_as_eager(got, eager_rows)
    assert eng.steps.kv.held_blocks() == 0


def test_padded_rows_leave_every_seqs_kv_and_block_zero_alone(tiny_model_dir):
    """Four rows (8 branch-rows), then three once the shortest ends (6 in the bucket of
    8: two padded rows, where the step before had real ones). The padded rows are fed
    non-zero input so that what they write shows. After each captured step the pool
    equals the pool of the same step run eagerly: no seq's KV and no freed block
    written, block 0 zero again."""
    eng = load(tiny_model_dir, "graphs-lm")
    steps = eng.steps
    drive(eng, {0: [req("a", seed=1, est_audio_s=0.4)]})  # decode_lm's checks spent
    graphs = steps.lm_graphs
    real_run = LMGraphs.run
    compared = []

    def run(self, step, embeds):
        for graph in self.graphs.values():
            graph.inputs["embeds"].fill_(0.5)  # the real rows' are copied over it
        before = step.kv.pool.clone()
        out = real_run(self, step, embeds)
        after = step.kv.pool.clone()
        step.kv.pool.copy_(before)
        want = steps.decode_lm.decode(embeds, step, steps.decode_attn)
        m = embeds.shape[0]
        if torch.count_nonzero(after[:, 0]):
            problems.append(f"{m} rows: block 0 left written")
        if (after - step.kv.pool).abs().max() > ROUNDING * step.kv.pool.abs().max():
            problems.append(f"{m} rows: the pool differs from eager's (a padded row wrote)")
        if (out - want).abs().max() > ROUNDING * want.abs().max():
            problems.append(f"{m} rows: hidden states differ from eager's")
        compared.append(m)
        return out

    problems: list[str] = []
    graphs.run = run.__get__(graphs)
    rows = [req("w", seed=9, est_audio_s=0.5)]
    rows += [req(x, seed=k, est_audio_s=2.0) for k, x in enumerate("xyz")]
    sink = drive(eng, {0: rows})
    assert not problems, problems
    assert set(sink.ends) == {"w", "x", "y", "z"}
    assert all(isinstance(why, str) for why in sink.ends.values()), sink.ends
    assert compared.index(6) > compared.index(8)  # 4 rows, then 3 in the same bucket


def test_a_grown_pool_remakes_the_graphs(tiny_model_dir, eager_rows, monkeypatch):
    made = counting(monkeypatch)
    eng = load(tiny_model_dir, "graphs-lm")
    eng.steps.kv.chunk_blocks = 1  # grow by half the pool at a time: several growths
    grown = []
    real_grow = type(eng.steps.kv)._grow

    def grow(self, blocks):
        grown.append(blocks)
        real_grow(self, blocks)

    monkeypatch.setattr(type(eng.steps.kv), "_grow", grow)
    got = drive(eng, rows_of_three())
    assert len(grown) >= 2
    assert len(made) > len(set(made)), "no graph was made again after the pool grew"
    assert_as_eager(got, eager_rows)


def test_a_reset_lets_go_of_the_kv_pool_the_graphs_were_made_over(tiny_model_dir, eager_rows):
    """After out of memory the host resets the engine (StepHost._out_of_memory) and the
    rows retry: the pool of the rows it dropped must be free at once, or on a GPU the
    retry's prefill grows a new pool beside it (and fails again). Each LM graph's
    function holds the PagedKV it was made over, so the reset lets the graphs go too;
    the engine then makes them again and sounds as in eager mode."""
    eng = load(tiny_model_dir, "graphs-lm")
    steps = eng.steps
    for rid in ("a", "b"):
        eng.admit(eng.prepare(req(rid, seed=3)))
    for _ in range(8):
        eng.execute()
    assert steps.lm_graphs.graphs, "no LM graph was made before the reset"
    pool = weakref.ref(steps.kv.pool)
    eng.reset()
    gc.collect()
    assert pool() is None, "the dropped rows' KV pool is still held after the reset"
    assert_as_eager(drive(eng, rows_of_three()), eager_rows)
    assert steps.lm_graphs is not None and steps.lm_graphs.graphs


def test_the_benchmark_makes_each_lm_graph_once(tiny_model_dir, monkeypatch):
    """bench_gpu_1p5b times a run after its checked steps. At 16 rows the KV pool grew
    inside the timing (217 -> 325 blocks at 24 audio tokens a row), which drops every
    LM graph: graphs-lm's timing then held a capture and two checked replays (each run
    eagerly too) that eager's did not. The run's pool is now grown to its rows' peak
    before the clock: no growth once the LM is captured, each graph made once."""
    import argparse
    from pathlib import Path

    from bench.bench_gpu_1p5b import SyntheticPrompts, build_model, run_rows

    made = counting(monkeypatch)
    events: list[str] = []
    real_grow = PagedKV._grow

    def grow(self, blocks):
        events.append("grow")
        real_grow(self, blocks)

    monkeypatch.setattr(PagedKV, "_grow", grow)
    real_capture = LMGraphs._capture
    monkeypatch.setattr(
        LMGraphs,
        "_capture",
        lambda self, *a: events.append("capture") or real_capture(self, *a),
    )
    args = argparse.Namespace(
        tiny=True, cache_dir=Path(tiny_model_dir).parent, device="cpu", steps=4, cfg=1.3
    )
    model = build_model(args, torch)
    with torch.no_grad():
        res = run_rows(model, SyntheticPrompts(model, 160, 3.0), 16, 24, args, torch, "",
                       engine_mode="graphs-lm")  # fmt: skip
    assert res["lm_graphs_kept"] and made
    assert "grow" not in events[events.index("capture") :], events
    assert len(made) == len(set(made)) == res["lm_graphs_made"], made


def test_the_flash_path_runs_through_the_static_buffers(tiny_model_dir, monkeypatch):
    """Blocks of 256 tokens, the block table and the positions as flash_attn takes them,
    with a stand-in kernel that writes and reads through them: the same audio as the
    flash path run eagerly (the real kernel is CUDA-only: unmeasured here)."""
    register_paged_flash()
    out = {}
    for mode in ("eager", "graphs-lm"):
        eng = load(tiny_model_dir, mode)
        steps = eng.steps
        monkeypatch.setattr(steps, "flash", kvcache_stand_in)
        monkeypatch.setattr(steps, "decode_attn", PAGED_FLASH)
        monkeypatch.setattr(steps, "kv", steps._new_kv())
        if mode == "graphs-lm":
            steps.lm_graphs = LMGraphs(steps.decode_lm, PAGED_FLASH, "cpu", steps.dtype)
        out[mode] = drive(eng, rows_of_three())
        assert steps.kv.block_tokens == 256
    assert eng.steps.lm_graphs is not None and eng.steps.lm_graphs.graphs
    assert_as_eager(out["graphs-lm"], out["eager"])


def test_a_replay_that_disagrees_leaves_the_lm_eager(
    tiny_model_dir, graphs_rows, monkeypatch, caplog
):
    real = Graph.run

    def off_for_the_lm(self):  # the LM's graphs (the ones with a block table) are wrong
        out = real(self)
        if "table" in self.inputs:
            return tuple(t + 0.01 * t.abs().max() for t in out)
        return out

    monkeypatch.setattr(Graph, "run", off_for_the_lm)
    eng = load(tiny_model_dir, "graphs-lm")
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        got = drive(eng, rows_of_three())
    assert "engine_mode graphs-lm: captured graph differs from eager" in caplog.text
    assert "this worker runs the LM eagerly" in caplog.text
    assert eng.steps.lm_graphs is None
    assert eng.steps.speech.mode == "graphs"  # the diffusion and decode graphs stay
    assert_as_eager(got, graphs_rows, exact=True)


def test_a_capture_that_raises_leaves_the_lm_eager(
    tiny_model_dir, graphs_rows, monkeypatch, caplog
):
    """On CPU nothing is captured, so the LM's capture is made to raise as CUDA's can."""
    eng = load(tiny_model_dir, "graphs-lm")
    real = Graph.__init__
    tries = []

    def capture(self, fn, inputs, *args, **kwargs):
        if "table" in inputs:  # the LM's
            tries.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")
        real(self, fn, inputs, *args, **kwargs)

    monkeypatch.setattr(Graph, "__init__", capture)
    with caplog.at_level(logging.WARNING, logger="vibevoice_pool.worker"):
        got = drive(eng, rows_of_three())
    assert len(tries) == 1, "after the first failure no LM capture is tried again"
    assert "capturing failed (RuntimeError: operation not permitted" in caplog.text
    assert eng.steps.lm_graphs is None and eng.steps.speech.mode == "graphs"
    assert_as_eager(got, graphs_rows, exact=True)


def test_the_setting_takes_graphs_lm():
    from vibevoice_pool.config import PoolConfig

    assert PoolConfig(engine_mode="graphs-lm").engine_mode == "graphs-lm"
    with pytest.raises(ValueError):
        PoolConfig(engine_mode="graph-lm")


def test_a_step_with_every_graph_launches_a_few_dozen_kernels_flat_in_rows():
    """bench/step_dispatches.py's count of what a GPU would launch per step (a replay one
    launch, the host's noise draws none), on the 1.5B model's depths at tiny widths:
    eager launches every operator; graphs-lm, a few dozen, the same at 1 and 2 rows."""
    from bench.step_dispatches import build, count_steps

    model = build(torch)
    eager = count_steps(model, 1, 2, torch, "eager")
    host = eager["phases"]["noise (host)"]
    assert eager["launches_per_step"] == eager["dispatches_per_step"] - host > 2000
    lean = [count_steps(model, r, 2, torch, "graphs-lm") for r in (1, 2)]
    assert lean[0]["launches_per_step"] == lean[1]["launches_per_step"] < 40
    for c in lean:  # the graphs' operators still run (plain calls on CPU), uncounted
        assert c["dispatches_per_step"] > 2000
