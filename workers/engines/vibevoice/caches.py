"""Per-row model state of the step engine, kept batched for the running set (the LM's KV
is paged_kv.py's).

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
