"""The step engine's KV cache, paged: fixed-size blocks of tokens, taken and freed per
branch-row (vLLM's PagedAttention layout).

What it owns: one pool, all layers' keys and values in one tensor of shape
(layers, blocks, block_size, 2, kv_heads, head_dim) (a token's key beside its value, so
that one operator writes both and one gathers both), grown when the free list runs out
by half its size (at least a chunk of blocks), never to rows x a maximum length. A
growth copies the pool once (the held blocks keep their numbers); while it copies, the
old and the new pool are both held. Block 0 is never handed
out: padded reads point at it and it stays zero. A `Seq` is one branch of one row (the
positive or the negative): its block list and its length (tokens it holds, which is
also the position of its next token). Block tables live on the host; the device sees
them once per step, packed with the step's write slots and positions into one small
host-to-device copy (no host sync).

A decode step (`begin`): every seq gets room for one more token (a block when its last
one is full); the returned StepCache is what transformers' Qwen2 layers call
`update()` on. Each layer writes the step's new column of every seq in place
(index_copy_ into the pool), then
  - eager/sdpa: gathers each seq's blocks into a (rows, heads, columns, dim) tensor
    for the attention, columns padded to whole blocks and masked (the reference path);
  - flash (CUDA, flash_attn importable): leaves the pool to flash_attn_with_kvcache,
    which writes the column and reads the blocks through the block table itself.
After the step, `advance(seqs, keep)` moves on the seqs that keep their column; the
others will overwrite it next step (the negative branch of a row that did not diffuse).

Rows join (`store_prompt`: the prefill's KV, copied into fresh blocks) and leave
(`release`: their blocks go back to the free list) without touching any other seq's
blocks; the negative branch's restart at speech_start is a release too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workers.engines.vibevoice.caches import to_device

BLOCK_TOKENS = 16  # tokens per block
CHUNK_BLOCKS = 32  # blocks the pool grows by, at least (else by half its size)
PAGED_FLASH = "vibevoice_paged_flash"  # the attention function registered for the flash path


@dataclass(eq=False)
class Seq:
    """One branch of one row: its blocks, in order, and the tokens it holds."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    synced: int = -1  # blocks of this seq the device table holds for its row (-1: none)


def blocks_for(tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    return -(-tokens // block_tokens)


def flash_kvcache() -> Any:
    """flash_attn's flash_attn_with_kvcache, or None where it cannot run (no CUDA, or the
    package missing)."""
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


class PagedKV:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any,
        device: Any,
        block_tokens: int = BLOCK_TOKENS,
        chunk_blocks: int = CHUNK_BLOCKS,
        mask_kind: str = "sdpa",
        flash: Any = None,
    ):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.block_tokens, self.chunk_blocks = block_tokens, chunk_blocks
        # the gather path's attention: "sdpa" (a -inf mask) or "eager" (finfo.min)
        self.mask_kind = mask_kind
        self.flash = flash  # flash_attn_with_kvcache (or a stand-in with its contract), or None
        self.live = 0  # seqs handed out and not released for good
        self._empty()

    def _empty(self) -> None:
        """Storage for no seq: the padding block alone (block 0)."""
        self.pool = torch.zeros(self._shape(1), dtype=self.dtype, device=self.device)
        self.free: list[int] = []
        self._table: torch.Tensor | None = None  # (rows, table width) on the device
        self._table_seqs: list[Seq] = []
        self._gather = torch.zeros(0, dtype=self.dtype, device=self.device)  # gather buffer

    def _shape(self, blocks: int) -> tuple[int, ...]:
        return (self.layers, blocks, self.block_tokens, 2, self.kv_heads, self.head_dim)

    def flat(self) -> torch.Tensor:
        """The pool as (layers, slots, 2, kv_heads, head_dim): slot = block * size + offset."""
        return self.pool.view(self.layers, -1, 2, self.kv_heads, self.head_dim)

    # ---- memory -------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.live

    @property
    def capacity(self) -> int:
        """Blocks the pool holds, the padding block included."""
        return int(self.pool.shape[1])

    def bytes_per_block(self) -> int:
        return self.pool[:, 0].numel() * self.pool.element_size()

    def held_blocks(self) -> int:
        return self.capacity - 1 - len(self.free)

    def bytes(self) -> int:
        """Bytes of the blocks the seqs hold now (the memory that grows with tokens)."""
        return self.held_blocks() * self.bytes_per_block()

    def pool_bytes(self) -> int:
        """Bytes reserved on the device: the pool, free blocks included, and the gather
        buffer (one layer's worth of the running rows' blocks)."""
        return (self.pool.numel() + self._gather.numel()) * self.pool.element_size()

    def gather_buffer(self, blocks: int) -> torch.Tensor:
        """A (blocks, size, 2, kv_heads, dim) buffer for one layer's gathered blocks, kept
        and reused (a fresh tensor of that size each layer costs more than the copy: on
        CPU, its pages are faulted in anew every time)."""
        shape = (blocks, *self.pool.shape[2:])
        need = blocks * self.pool[0, 0].numel()
        if self._gather.numel() < need:
            self._gather = torch.empty(need + need // 2, dtype=self.dtype, device=self.device)
        return self._gather[:need].view(shape)

    def reserve(self, blocks: int) -> None:
        """Free blocks for `blocks` more now (one growth at most), so that the seqs take
        them later without a growth (which, in graphs-lm mode, drops the LM graphs)."""
        if len(self.free) < blocks:
            self._grow(blocks - len(self.free))

    def _take(self, count: int) -> list[int]:
        if len(self.free) < count:
            # by half its size at least: n tokens cost O(n) copying in all, not O(n^2)
            self._grow(max(self.chunk_blocks, count - len(self.free), self.capacity // 2))
        taken = self.free[-count:] if count else []
        del self.free[len(self.free) - count :]
        return taken[::-1]

    def _grow(self, blocks: int) -> None:
        """A pool `blocks` larger; the held blocks keep their numbers (one copy, rare)."""
        old = self.capacity
        pool = torch.zeros(self._shape(old + blocks), dtype=self.dtype, device=self.device)
        pool[:, :old] = self.pool
        self.pool = pool
        self.free.extend(range(old + blocks - 1, old - 1, -1))

    # ---- seqs -------------------------------------------------------------------------
    def seq(self) -> Seq:
        self.live += 1
        return Seq()

    def release(self, seq: Seq, drop: bool = True) -> None:
        """Free the seq's blocks; `drop`: the seq is gone (a row leaves), else it starts
        again empty (the negative branch at speech_start). When the last seq is gone the
        pool and the gather buffer are let go (a worker between bursts holds no KV)."""
        self.free.extend(reversed(seq.blocks))
        seq.blocks, seq.length = [], 0
        seq.synced = min(seq.synced, 0)
        if drop:
            self.live -= 1
            if not self.live:
                self._empty()

    def release_row(self, state: Any) -> None:
        """A row's two branches (state.pos, state.neg) leave: a row that ends, or one
        that failed as it joined, holds no block after this."""
        for seq in (state.pos, state.neg):
            if seq is not None:
                self.release(seq)
        state.pos = state.neg = None

    def _room(self, seq: Seq, tokens: int) -> None:
        need = blocks_for(tokens, self.block_tokens) - len(seq.blocks)
        if need > 0:
            seq.blocks.extend(self._take(need))

    def _slot(self, seq: Seq, position: int) -> int:
        return seq.blocks[position // self.block_tokens] * self.block_tokens + (
            position % self.block_tokens
        )

    def store_prompt(self, seqs: list[Seq], layers: list, lengths: list[int]) -> None:
        """The prefill's KV into fresh blocks: `layers` per layer (keys, values) of
        (n, kv_heads, L, dim), row i left-padded, its last lengths[i] columns real."""
        n, _, width, _ = layers[0][0].shape
        src, dst = [], []
        for i, (seq, count) in enumerate(zip(seqs, lengths, strict=True)):
            self._room(seq, seq.length + count)
            src.extend(range(i * width + width - count, (i + 1) * width))
            dst.extend(self._slot(seq, seq.length + j) for j in range(count))
            seq.length += count
        if not src:
            return
        index = to_device(src + dst, self.device)
        src_t, dst_t = index[: len(src)], index[len(src) :]
        flat = self.flat()
        for layer, (keys, values) in enumerate(layers):
            both = torch.stack((keys, values), dim=1).permute(0, 3, 1, 2, 4)  # n, L, 2, h, d
            both = both.reshape(n * width, 2, self.kv_heads, self.head_dim)
            flat[layer].index_copy_(0, dst_t, both.index_select(0, src_t).to(self.dtype))

    def advance(self, seqs: list[Seq], keep: list[bool]) -> None:
        """After a step: the seqs where `keep` is set hold their new column from now on."""
        for seq, kept in zip(seqs, keep, strict=True):
            seq.length += bool(kept)

    def seq_values(self, seq: Seq, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seq's keys and values (kv_heads, length, dim) of one layer, for checks."""
        slots = torch.tensor([self._slot(seq, p) for p in range(seq.length)], dtype=torch.long)
        both = self.flat()[layer].index_select(0, slots.to(self.device))
        return both[:, 0].transpose(0, 1), both[:, 1].transpose(0, 1)

    # ---- one decode step ---------------------------------------------------------------
    def begin(self, seqs: list[Seq]) -> StepCache:
        """Room for one more token in every seq, and what the step's forward needs: a
        cache whose update() the layers call, the positions, the attention mask."""
        bt = self.block_tokens
        for seq in seqs:
            self._room(seq, seq.length + 1)
        width = max(len(s.blocks) for s in seqs)
        rebuild = (
            self._table is None
            or self._table_seqs != seqs
            or width > self._table.shape[1]
            or self._table.shape[0] != len(seqs)
        )
        if rebuild:
            have = self._table.shape[1] if self._table is not None else 0
            width = max(have, width) if width <= have else max(width, 2 * have)
            for seq in seqs:
                seq.synced = 0
        rows, cols, vals = [], [], []
        for r, seq in enumerate(seqs):
            for j in range(max(seq.synced, 0), len(seq.blocks)):
                rows.append(r)
                cols.append(j)
                vals.append(seq.blocks[j])
            seq.synced = len(seq.blocks)
        n = len(seqs)
        write = [self._slot(s, s.length) for s in seqs]
        pos = [s.length for s in seqs]
        meta = to_device(write + pos + rows + cols + vals, self.device)
        if rebuild:
            self._table = torch.zeros(n, width, dtype=torch.long, device=self.device)
            self._table_seqs = list(seqs)
        u = len(rows)
        if u:
            at = 2 * n
            self._table.index_put_(
                (meta[at : at + u], meta[at + u : at + 2 * u]), meta[at + 2 * u :]
            )
        used = max(len(s.blocks) for s in seqs)
        return StepCache(self, meta[:n], meta[n : 2 * n], self._table[:, :used], used * bt)


class StepCache:
    """One decode step's view of the pool, in transformers' Cache shape: the layers call
    update(keys, values, layer_idx) with the new column of every seq."""

    def __init__(
        self,
        kv: PagedKV,
        write: torch.Tensor,
        pos: torch.Tensor,
        table: torch.Tensor,
        width: int,
        gathered: torch.Tensor | None = None,
    ):
        """`gathered`: the gather path's buffer (else the pool's, made on first use);
        the mask too is made where a forward first reads it (a captured LM step
        (lm_graph.py) reads neither from this object)."""
        self.kv = kv
        self.write = write  # (rows,) flat slot of each seq's new column
        self.positions = pos[:, None]  # (rows, 1): the new token's position
        self.table = table  # (rows, blocks) block numbers
        self.width = width
        self.flash = kv.flash is not None
        self.flat = kv.flat()
        self._mask: torch.Tensor | None = None
        if self.flash:
            self.cache_seqlens = pos.to(torch.int32)
            self.block_table = table.to(torch.int32)
            return
        # whole blocks are gathered (a block's tokens lie together in the pool), every
        # layer into the same buffer: a layer's attention is done before the next gathers
        self.read = table.reshape(-1)
        self.shape = (table.shape[0], width, 2, kv.kv_heads, kv.head_dim)
        self.gathered = gathered

    @property
    def mask(self) -> torch.Tensor | None:
        """The gather path's additive mask (rows, 1, 1, width), made once per step (sdpa
        would turn a bool mask into this in every layer); None on the flash path."""
        if self.flash or self._mask is not None:
            return self._mask
        kv = self.kv
        blocked = (torch.arange(self.width, device=kv.device) > self.positions)[:, None, None, :]
        low = torch.finfo(kv.dtype).min if kv.mask_kind == "eager" else float("-inf")
        self._mask = torch.zeros(blocked.shape, dtype=kv.dtype, device=kv.device).masked_fill_(
            blocked, low
        )
        return self._mask

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """keys/values (rows, kv_heads, 1, dim) of the new column. Gather path: written
        into the pool, then every seq's columns gathered (rows, kv_heads, width, dim).
        Flash path: returned as they are; the attention function writes and reads."""
        if self.flash:
            return key_states, value_states
        new = torch.stack((key_states[:, :, 0], value_states[:, :, 0]), 1)
        self.flat[layer_idx].index_copy_(0, self.write, new)
        if self.gathered is None:
            self.gathered = self.kv.gather_buffer(self.read.numel())
        # (rows, width, 2, kv_heads, dim): each row's blocks, in order, one copy per block
        torch.index_select(self.kv.pool[layer_idx], 0, self.read, out=self.gathered)
        both = self.gathered.view(self.shape)
        return both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)

    # transformers asks a cache these, though this one is never read by the mask builder
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def paged_flash_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The flash path's attention (registered with transformers' AttentionInterface as
    PAGED_FLASH): flash_attn_with_kvcache writes the step's column into the pool at each
    seq's position and attends its blocks through the block table. query/key/value:
    (rows, heads, 1, dim). Written for CUDA with flash_attn; unmeasured here."""
    step: StepCache = kwargs["paged_step"]
    pages = step.kv.pool[module.layer_idx]  # (blocks, size, 2, kv_heads, dim)
    out = step.kv.flash(
        query.transpose(1, 2),
        pages[:, :, 0],  # strided: the last dimension contiguous, as flash_attn requires
        pages[:, :, 1],
        k=key.transpose(1, 2),
        v=value.transpose(1, 2),
        cache_seqlens=step.cache_seqlens,
        block_table=step.block_table,
        softmax_scale=scaling,
        causal=True,
    )
    return out, None  # (rows, 1, heads, dim), as transformers' attention functions return


def register_paged_flash() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_FLASH, paged_flash_attention)
