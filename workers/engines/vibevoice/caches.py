"""Per-row model state of the step engine, kept batched for the running set (the LM's KV
is paged_kv.py's).

StreamSlots: the acoustic decoder's and the semantic encoder's streaming conv
caches, one slot per possible row. A step gathers the slots of the rows that
diffuse, runs the module on them alone, and writes their new state back: a row
that does not speak this step does not move (microsoft's loop, not
transformers', which decodes every row with zero latents).
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
    """One streaming conv cache (acoustic decoder or semantic encoder), slotted by row."""

    def __init__(self, shapes: dict[str, tuple[int, int]], slots: int, device: Any, dtype: Any):
        self.shapes = shapes  # conv name -> (in_channels, left_pad)
        self.store = {
            name: torch.zeros(slots, c, pad, device=device, dtype=dtype)
            for name, (c, pad) in shapes.items()
        }

    def gather(self, slots: torch.Tensor):
        """A fresh padding cache holding the given slots' state, in that order."""
        from transformers.models.vibevoice_acoustic_tokenizer import (
            modeling_vibevoice_acoustic_tokenizer as mod,
        )

        cache = mod.VibeVoiceAcousticTokenizerConv1dPaddingCache()
        for name, (c, pad) in self.shapes.items():
            layer = mod.VibeVoiceAcousticTokenizerConv1dCacheLayer()
            layer.cache = self.store[name].index_select(0, slots)
            layer.left_pad, layer.in_channels, layer.is_initialized = pad, c, True
            cache.layers[name] = layer
        return cache

    def scatter(self, slots: torch.Tensor, cache) -> None:
        for name, layer in cache.layers.items():
            self.store[name].index_copy_(0, slots, layer.cache)

    def zero(self, slots: torch.Tensor) -> None:
        for t in self.store.values():
            t.index_fill_(0, slots, 0)

    def bytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.store.values())


def learn_shapes(cache) -> dict[str, tuple[int, int]]:
    """Conv name -> (in_channels, left_pad) from a padding cache one call filled."""
    return {name: (layer.in_channels, layer.left_pad) for name, layer in cache.layers.items()}
