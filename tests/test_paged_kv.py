"""The step engine's paged KV cache (workers/engines/vibevoice/paged_kv.py): blocks are
taken and freed per branch-row, a join or a leave leaves every other row's KV where and
as it was, the memory held follows the tokens held, the negative branch's restart frees
its blocks, admission counts blocks; and the flash path's code (flash_attn's
flash_attn_with_kvcache over the block table) run here with a stand-in of that kernel's
contract gives each row the audio it has alone."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from test_step_engine import Forced, assert_alone, drive, req
from vibevoice_reference import Reference

from workers.engines.vibevoice.paged_kv import PAGED_FLASH, PagedKV, register_paged_flash

LAYERS, HEADS, DIM, BT = 2, 2, 4, 4


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def pool(chunk: int = 8) -> PagedKV:
    return PagedKV(LAYERS, HEADS, DIM, torch.float32, "cpu", block_tokens=BT, chunk_blocks=chunk)


def prompt(n: int, width: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, HEADS, width, DIM, generator=g),
            torch.randn(n, HEADS, width, DIM, generator=g),
        )
        for _ in range(LAYERS)
    ]


def test_a_prompt_takes_whole_blocks_and_leaving_gives_them_back():
    kv = pool()
    a, b = kv.seq(), kv.seq()
    layers = prompt(2, 7, seed=0)
    kv.store_prompt([a, b], layers, [7, 3])  # b is left-padded: its last 3 columns
    assert (a.length, b.length) == (7, 3)
    assert (len(a.blocks), len(b.blocks)) == (2, 1) and kv.held_blocks() == 3
    assert 0 not in a.blocks + b.blocks  # block 0 is the padding block, never handed out
    for layer, (keys, values) in enumerate(layers):
        got_k, got_v = kv.seq_values(b, layer)
        assert torch.equal(got_k, keys[1, :, 4:]) and torch.equal(got_v, values[1, :, 4:])
        got_k, _ = kv.seq_values(a, layer)
        assert torch.equal(got_k, keys[0])
    free = len(kv.free)
    kv.release(a)
    assert kv.held_blocks() == 1 and len(kv.free) == free + 2 and kv.rows == 1
    kv.release(b)
    assert kv.held_blocks() == 0 and kv.rows == 0 and kv.bytes() == 0
    assert kv.capacity == 1  # the last seq gone, the pool is let go: the padding block alone


def test_a_join_or_a_leave_leaves_the_other_rows_kv_in_place():
    kv = pool(chunk=16)
    a, b = kv.seq(), kv.seq()
    kv.store_prompt([a, b], prompt(2, 6, seed=1), [6, 5])
    step = kv.begin([a, b])  # a decode step: each writes its new column
    new = prompt(2, 1, seed=2)
    for layer, (keys, values) in enumerate(new):
        step.update(keys, values, layer)
    kv.advance([a, b], [True, True])
    storage = kv.pool.data_ptr()
    blocks = list(a.blocks)
    before = [kv.seq_values(a, layer) for layer in range(LAYERS)]
    c = kv.seq()
    kv.store_prompt([c], prompt(1, 9, seed=3), [9])  # a row joins
    kv.release(b)  # a row leaves
    d = kv.seq()
    kv.store_prompt([d], prompt(1, 4, seed=4), [4])  # and another takes b's blocks
    step = kv.begin([a, c, d])
    for layer, (keys, values) in enumerate(prompt(3, 1, seed=5)):
        step.update(keys, values, layer)
    assert kv.pool.data_ptr() == storage and a.blocks[: len(blocks)] == blocks
    for layer in range(LAYERS):
        keys, values = kv.seq_values(a, layer)
        assert torch.equal(keys, before[layer][0]) and torch.equal(values, before[layer][1])
        assert torch.equal(keys[:, 6], new[layer][0][0, :, 0])  # the column of the step


def test_the_memory_held_follows_the_tokens_held():
    kv = pool(chunk=4)
    short, long = kv.seq(), kv.seq()
    kv.store_prompt([short], prompt(1, 3, seed=6), [3])
    one = kv.bytes()
    assert one == kv.bytes_per_block() == LAYERS * BT * 2 * HEADS * DIM * 4
    kv.store_prompt([long], prompt(1, 40, seed=7), [40])
    assert kv.bytes() == (1 + 10) * one  # each row its own blocks, nothing padded to 40
    assert kv.pool_bytes() < 2 * 40 * kv.bytes_per_block() // BT  # not rows x the longest
    held = []
    for _ in range(9):  # decode steps: the short row grows a block every BT tokens
        step = kv.begin([short, long])
        for layer, (keys, values) in enumerate(prompt(2, 1, seed=8)):
            step.update(keys, values, layer)
        kv.advance([short, long], [True, False])  # long does not keep its column
        held.append(kv.held_blocks())
    assert short.length == 12 and long.length == 40
    # the long row's 41st column (written, never kept) took its 11th block at the first step
    assert held == [12, 13, 13, 13, 13, 14, 14, 14, 14]
    kv.release(long)
    assert kv.bytes() == 3 * one  # 12 tokens


def test_the_pool_grows_by_half_its_size_and_the_held_blocks_keep_their_values():
    kv = pool(chunk=2)
    seq = kv.seq()
    layers = prompt(1, 4, seed=11)
    kv.store_prompt([seq], layers, [4])
    capacities = [kv.capacity]
    for _ in range(40):
        step = kv.begin([seq])
        for layer, (keys, values) in enumerate(prompt(1, 1, seed=12)):
            step.update(keys, values, layer)
        kv.advance([seq], [True])
        capacities.append(kv.capacity)
    sizes = sorted(set(capacities))
    assert len(sizes) > 3
    assert all(b - a >= max(2, a // 2) for a, b in zip(sizes, sizes[1:], strict=False))
    assert seq.length == 44 and kv.held_blocks() == 11
    keys, values = kv.seq_values(seq, 1)
    assert torch.equal(keys[:, :4], layers[1][0][0]) and torch.equal(values[:, :4], layers[1][1][0])


def test_a_decode_step_attends_each_rows_own_tokens():
    """What update() hands the attention, read through the mask, is each row's tokens in
    order, its new column last: the same as a dense per-row cache."""
    kv = pool()
    a, b = kv.seq(), kv.seq()
    layers = prompt(2, 6, seed=9)
    kv.store_prompt([a, b], layers, [6, 2])
    step = kv.begin([a, b])
    new = prompt(2, 1, seed=10)
    keys, values = step.update(*new[1], 1)
    attended = step.mask[:, 0, 0] == 0
    assert step.positions[:, 0].tolist() == [6, 2]
    for i, (count, pad) in enumerate(((6, 0), (2, 4))):
        want = torch.cat([layers[1][0][i, :, pad:], new[1][0][i]], dim=1)
        assert torch.equal(keys[i][:, attended[i]], want)
        assert attended[i].sum() == count + 1


def test_the_negative_branch_restart_frees_its_blocks(engine, monkeypatch):
    steps = engine.steps
    cfg = engine.model.config
    x = req("x", seed=31, est_audio_s=1.0)
    Forced(engine, monkeypatch, {"x": {4: cfg.audio_eos_token_id, 5: cfg.audio_bos_token_id}}, {})
    seen = []
    real = steps._reset_negative

    def watched(i):
        neg = steps.rows[i].state.neg
        held = steps.kv.held_blocks()
        before = (neg.length, len(neg.blocks))
        real(i)
        seen.append((before, neg.length, len(neg.blocks), held - steps.kv.held_blocks()))

    monkeypatch.setattr(steps, "_reset_negative", watched)
    drive(engine, {0: [x]})
    # four diffusions before speech_start: 4 tokens in one block, the block freed
    assert seen == [((4, 1), 0, 0, 1)]
    assert steps.kv.held_blocks() == 0 and steps.kv.rows == 0


def test_admission_counts_blocks_not_rows_times_the_longest(engine):
    steps = engine.steps
    bt, block = steps.kv.block_tokens, steps.kv.bytes_per_block()
    slot = steps.speech.bytes_per_slot()
    long, short = (300, 900), (40, 10)
    want = (math.ceil(1202 / bt) + math.ceil(902 / bt)) * block + slot
    assert steps.peak_bytes([long]) == want
    assert steps.peak_bytes([short]) == (math.ceil(52 / bt) + 1) * block + slot
    # a short row beside a long one costs its own blocks, not the long row's length
    assert steps.peak_bytes([long, short]) == steps.peak_bytes([long]) + steps.peak_bytes([short])


def kvcache_stand_in(
    q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale=None, causal=True
):
    """flash_attn_with_kvcache's contract in plain torch (one query token per row): write
    k/v at each row's cache_seqlens through its block table, attend positions
    0..cache_seqlens. q (rows, 1, heads, dim), caches (blocks, size, kv_heads, dim)."""
    size = k_cache.shape[1]
    out = []
    for r in range(q.shape[0]):
        n = int(cache_seqlens[r])
        k_cache[block_table[r, n // size], n % size] = k[r, 0]
        v_cache[block_table[r, n // size], n % size] = v[r, 0]
        cols = torch.arange(n + 1)
        blocks = block_table[r, cols // size].long()
        keys, values = k_cache[blocks, cols % size], v_cache[blocks, cols % size]
        group = q.shape[2] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[r, 0], keys) * softmax_scale
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values)[None])
    return torch.stack(out)


def test_the_flash_path_gives_each_row_its_audio_alone(engine, reference, monkeypatch):
    """The flash path's code (blocks of 256 tokens, the block table and positions as
    flash_attn takes them, the registered attention function) with a stand-in kernel: the
    rows sound as they do alone. The real kernel is CUDA-only: unmeasured here."""
    steps = engine.steps
    register_paged_flash()
    monkeypatch.setattr(steps, "flash", kvcache_stand_in)
    monkeypatch.setattr(steps, "decode_attn", PAGED_FLASH)
    monkeypatch.setattr(steps, "kv", steps._new_kv())
    assert steps.kv.block_tokens == 256
    rows = {"a": req("a", seed=51, est_audio_s=1.0), "b": req("b", seed=52, est_audio_s=0.6)}
    sink = drive(engine, {0: [rows["a"]], 2: [rows["b"]]})
    for r in rows.values():
        assert_alone(reference, sink, r)
    assert steps.kv.held_blocks() == 0


def test_the_eager_attention_path_gives_each_row_its_audio_alone(engine, reference, monkeypatch):
    """A model configured for eager attention: the decode step runs transformers' eager
    attention over the gathered blocks with an additive finfo.min mask."""
    steps = engine.steps
    monkeypatch.setattr(steps, "decode_attn", "eager")
    monkeypatch.setattr(steps, "kv", steps._new_kv())
    assert steps.kv.mask_kind == "eager"
    module = sys.modules[type(steps.lm.layers[0].self_attn).__module__]
    real, masks = module.eager_attention_forward, []

    def spied(mod, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return real(mod, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", spied)
    rows = {"a": req("a", seed=53, est_audio_s=0.8), "b": req("b", seed=54, est_audio_s=0.5)}
    sink = drive(engine, {0: [rows["a"]], 1: [rows["b"]]})
    for r in rows.values():
        assert_alone(reference, sink, r)
    decode = [m for m in masks if m.shape[2] == 1]  # one query token: the decode steps
    assert decode and all(m.min() == torch.finfo(m.dtype).min for m in decode)
