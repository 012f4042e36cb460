"""How many past latent frames still reach a streaming conv stack's current output:
the window a resumed row must run through the decoder and the semantic encoder to
rebuild their stream caches exactly (resume.py).

    lookback_frames(decoder, encoder) -> L    frame t's output depends on frames t-L..t

Read from the modules themselves (transformers' causal convs, in the order they run),
so it holds for any checkpoint's tower. Walked back from the last output of the last
stack, an offset `e` is the earliest sample needed at a layer's output, counted from
the start of the current frame in that layer's own samples:
  - a causal conv (kernel K, dilation d, stride r, left padding (K-1)d-(r-1)) needs
    input from e*r - padding;
  - a causal transposed conv (kernel K, stride r, trimmed by K-r on the right) needs
    input frames from ceil((e-K+1)/r).
The decoder's input is one latent a frame, so its `e` is in frames. bench/stream_window.py
measures the same with an impulse (tests/test_stream_window.py compares them).
"""

from __future__ import annotations

from typing import Any


def _causal_convs(stack: Any) -> list[Any]:
    """The stack's causal convs and transposed convs in the order they run (its modules
    register stem, stages and head in forward order, each stage's resampling conv
    before its blocks)."""
    return [m for m in stack.modules() if hasattr(m, "left_pad") and hasattr(m, "cache_key")]


def _back(conv: Any, e: int) -> int:
    if hasattr(conv, "convtr"):
        kernel, stride = conv.convtr.kernel_size[0], conv.convtr.stride[0]
        return -((kernel - 1 - e) // stride)  # ceil((e - kernel + 1) / stride)
    c = conv.conv
    padding = (c.kernel_size[0] - 1) * c.dilation[0] - (c.stride[0] - 1)
    return e * c.stride[0] - padding


def lookback_frames(*stacks: Any) -> int | None:
    """Past latent frames that reach the last stack's output for the current frame,
    through `stacks` in the order they run (the decoder, then the semantic encoder);
    None when a stack shows none of the causal convs this reads (another layout: the
    caller then reruns every frame since the caches were zeroed, exact but slower)."""
    e = 0
    for stack in reversed(stacks):
        convs = _causal_convs(stack)
        if not convs:
            return None
        for conv in reversed(convs):
            e = _back(conv, e)
    return max(0, -e)
