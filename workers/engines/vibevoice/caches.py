"""Per-row model state of the step engine, kept batched for the running set.

BranchKV: the language model's KV for a set of rows (the step engine keeps both
branches of every live row in one: the positive prompt branches, then the CFG
negative ones). Per layer the keys and values are one
(rows, kv_heads, length, head_dim) tensor, left-padded; a 2D attention mask
(rows, length) says which columns a row attends; `pos` is each row's next
position (its count of attended tokens), passed as position_ids, so a row's
positions never depend on its neighbours' padding. Rows join (`add`: the
shorter side is left-padded with masked zeros) and leave (`keep`) between steps;
columns every row masks are trimmed off the left.

StreamSlots: the acoustic decoder's and the semantic encoder's streaming conv
caches, one slot per possible row, plus a scratch slot that padded rows of a
row bucket read and write. A step runs the module on the rows that diffuse
alone (`at(index)`: each conv reads its rows' state and writes the new state
straight back into their slots, one gather and one in-place index_copy_ per
conv, static shapes for a fixed index length): a row that does not speak this
step does not move (microsoft's loop, not transformers', which decodes every
row with zero latents).
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values, device: Any, dtype: Any = torch.long) -> torch.Tensor:
    """A small host-made tensor on `device` without a host sync: on CUDA it goes through
    pinned memory with a non-blocking copy (a copy from pageable memory waits for the
    stream). `values`: a list, or a CPU tensor."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if not str(device).startswith("cuda"):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    short = length - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BranchKV:
    def __init__(self, device: Any):
        self.device = device
        self.layers: list[list[torch.Tensor]] = []  # [keys, values] per layer; empty: no columns
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.pos = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return int(self.pos.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def cache(self):
        """A DynamicCache over the batched tensors (the model appends to it in place)."""
        from transformers import DynamicCache

        if not self.layers:
            return DynamicCache()
        return DynamicCache(ddp_cache_data=[(k, v) for k, v in self.layers])

    def absorb(self, cache) -> None:
        """Take the tensors a forward pass left in `cache` (one new column)."""
        self.layers = [[layer.keys, layer.values] for layer in cache.layers]

    def add(self, layers: list[list[torch.Tensor]] | None, mask: torch.Tensor, pos: torch.Tensor):
        """Append rows at the end: `layers` per layer [keys, values] of (n, h, L, d) (None:
        no columns), `mask` (n, L), `pos` (n,). The shorter side is left-padded."""
        n = int(pos.shape[0])
        new_len = int(mask.shape[1])
        length = max(self.length, new_len)
        if self.rows == 0:
            self.layers = [list(kv) for kv in layers] if layers else []
            self.mask, self.pos = mask, pos
            return
        if self.layers and layers:
            self.layers = [
                [
                    torch.cat([_pad_left(a, length, 2), _pad_left(b, length, 2)])
                    for a, b in zip(old, new, strict=True)
                ]
                for old, new in zip(self.layers, layers, strict=True)
            ]
        elif self.layers:  # the newcomers have no columns: masked zeros
            self.layers = [[_pad_rows(a, n, length) for a in kv] for kv in self.layers]
        elif layers:  # the running rows have no columns yet
            self.layers = [
                [torch.cat([a.new_zeros((self.rows, *a.shape[1:])), a]) for a in kv]
                for kv in layers
            ]
        new_mask = mask if new_len else mask.new_zeros(n, 0)
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(new_mask, length, 1)])
        self.pos = torch.cat([self.pos, pos])

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index` (in that order), then trim shared padding."""
        if index.numel() == 0:
            self.layers = []
            self.mask = self.mask.new_zeros(0, 0)
            self.pos = self.pos.new_zeros(0)
            return
        self.layers = [[t.index_select(0, index) for t in kv] for kv in self.layers]
        self.mask = self.mask.index_select(0, index)
        self.pos = self.pos.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        """Drop the leading columns that no row attends."""
        if not self.length:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first == 0:
            return
        self.layers = [[t[:, :, first:] for t in kv] for kv in self.layers]
        self.mask = self.mask[:, first:]
        if not self.length:
            self.layers = []

    def row_state(
        self, i: int
    ) -> tuple[list[list[torch.Tensor]] | None, torch.Tensor, torch.Tensor]:
        """Row i alone, without its padding (for an out-of-band copy, e.g. tests)."""
        cols = self.mask[i].nonzero().view(-1)
        layers = [[t[i : i + 1].index_select(2, cols) for t in kv] for kv in self.layers] or None
        return layers, self.mask[i : i + 1, cols], self.pos[i : i + 1]

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)


def _pad_rows(t: torch.Tensor, n: int, length: int) -> torch.Tensor:
    t = _pad_left(t, length, 2)
    return torch.cat([t, t.new_zeros((n, *t.shape[1:]))])


class StreamSlots:
    """One streaming conv cache (acoustic decoder or semantic encoder), slotted by row;
    slot `scratch` (the last) belongs to no row."""

    def __init__(self, shapes: dict[str, tuple[int, int]], slots: int, device: Any, dtype: Any):
        self.shapes = shapes  # conv name -> (in_channels, left_pad)
        self.scratch = slots
        self.store = {
            name: torch.zeros(slots + 1, c, pad, device=device, dtype=dtype)
            for name, (c, pad) in shapes.items()
        }

    def at(self, slots: torch.Tensor) -> SlotCache:
        """The padding cache of the rows in `slots` (in that order) for one call."""
        return SlotCache(self.store, slots)

    def zero(self, slots: torch.Tensor) -> None:
        for t in self.store.values():
            t.index_fill_(0, slots, 0)

    def bytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.store.values())


class SlotCache:
    """transformers' conv padding cache protocol (`update(hidden, key, conv)` returns
    the input with its left context), read from and written to the slots in place."""

    def __init__(self, store: dict[str, torch.Tensor], slots: torch.Tensor):
        self.store = store
        self.slots = slots

    def update(self, hidden: torch.Tensor, cache_key: str, conv_module: Any) -> torch.Tensor:
        store = self.store[cache_key]
        if store.shape[-1] == 0:
            return hidden
        padded = torch.cat([store.index_select(0, self.slots), hidden], dim=-1)
        # the new left context: the last left_pad columns of context and input together
        store.index_copy_(0, self.slots, padded[:, :, -store.shape[-1] :])
        return padded


def learn_shapes(cache) -> dict[str, tuple[int, int]]:
    """Conv name -> (in_channels, left_pad) from a padding cache one call filled."""
    return {name: (layer.in_channels, layer.left_pad) for name, layer in cache.layers.items()}
