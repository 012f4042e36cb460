"""What the step engine's rows hold in memory, and whether one more fits.

Owns the paged KV cache's shape (made for the LM's layers, KV heads and head size, in
blocks flash_attn's paged kernel takes where it runs) and memory-aware admission:
`fits(row)` predicts the peak KV of a running set in blocks (per row, its positive
branch's prompt plus step cap and its negative branch's step cap, in whole blocks, and
its stream slot) against the budget (a setting, or on CUDA its pool plus its share of
the free memory, minus headroom); a row that alone can never fit is refused.

`RowMemory` is a part of `StepEngine` (step.py), which sets what it reads: `text_cfg`,
`dtype`, `device`, `flash`, `decode_attn`, `kv`, `speech`, `rows`, `joining`,
`mem_budget_bytes`, `mem_headroom_bytes` and `gpu_share`.
"""

from __future__ import annotations

import torch

from workers.engines.row import Row
from workers.engines.vibevoice.paged_kv import PagedKV, blocks_for
from workers.wire.messages import ErrorKind, PoolError

MIB = 1 << 20


class RowMemory:
    def _kv_dims(self) -> tuple[int, int, int]:
        c = self.text_cfg
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, heads, head_dim

    def _kv_bytes_per_token(self) -> int:
        layers, heads, head_dim = self._kv_dims()
        return 2 * layers * heads * head_dim * torch.finfo(self.dtype).bits // 8

    def _new_kv(self) -> PagedKV:
        layers, heads, head_dim = self._kv_dims()
        # flash_attn's paged kernel takes blocks of a multiple of 256 tokens
        extra = {"block_tokens": 256, "chunk_blocks": 8} if self.flash else {}
        kind = "eager" if self.decode_attn == "eager" else "sdpa"
        return PagedKV(
            layers,
            heads,
            head_dim,
            self.dtype,
            self.device,
            mask_kind=kind,
            flash=self.flash,
            **extra,
        )

    def peak_bytes(self, rows: list[tuple[int, int]]) -> int:
        """Predicted peak memory of a running set, given (prompt tokens, step cap) per
        row: the KV blocks each row's branches can come to hold (the positive: prompt +
        steps, the negative: steps; each + 1 for the column a step writes, + 1 for the
        capping step; rounded up to whole blocks), plus the stream slots. A short row
        counts its own blocks only, whatever the longest row holds."""
        if not rows:
            return 0
        bt = self.kv.block_tokens
        blocks = sum(blocks_for(p + s + 2, bt) + blocks_for(s + 2, bt) for p, s in rows)
        return blocks * self.kv.bytes_per_block() + len(rows) * self.speech.bytes_per_slot()

    def budget_bytes(self) -> int:
        """What the running set may hold: the configured budget, else on CUDA what the
        rows hold plus this worker's share of the free memory (each worker on the card
        sees all of it free), minus headroom; 0 = no limit."""
        if self.mem_budget_bytes:
            return self.mem_budget_bytes
        if self.device.startswith("cuda"):  # the pool's free blocks count as room
            free = torch.cuda.mem_get_info()[0] // self.gpu_share
            return max(1, free + self.kv.pool_bytes() - self.mem_headroom_bytes)
        return 0

    def _shape(self, row: Row) -> tuple[int, int]:
        """(prompt tokens, steps it may take): its step cap, or for a row whose audio
        budget ends it first (max_audio_s, the tiny model's scripted end) that budget,
        plus room for the turns' speech_start/speech_end tokens."""
        budget = row.budget_tokens + 2 * len(row.request.turns) + 2
        return (row.state.prompt_len, min(row.max_steps, budget))

    def fits(self, row: Row) -> bool:
        budget = self.budget_bytes()
        if not budget:
            return True
        shapes = [self._shape(r) for r in (*self.rows, *self.joining)]
        return self.peak_bytes([*shapes, self._shape(row)]) <= budget

    def _refuse_alone(self, row: Row) -> None:
        """PoolError(OUT_OF_MEMORY) when the row alone can never fit the budget."""
        budget = self.budget_bytes()
        need = self.peak_bytes([self._shape(row)])
        if budget and need > budget:
            raise PoolError(
                ErrorKind.OUT_OF_MEMORY,
                f"this request alone needs about {need / MIB:.0f} MiB of cache, more than the "
                f"worker's budget of {budget / MIB:.0f} MiB: shorten the script or lower max_audio_s",
            )
