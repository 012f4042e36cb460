"""The streaming conv stacks (the acoustic decoder, the semantic encoder), run with
fewer operators per block than transformers' forwards, on the same modules and weights.

    run_stack(stack, x, cache) -> y    a VibeVoice tokenizer encoder or decoder model:
        stem conv and blocks, each stage's (transposed) conv and blocks, head conv;
        x and y (rows, channels, time); `cache` the padding cache of those rows

A block (ConvNeXt-like: norm, depthwise causal conv, scaled residual; norm, feed-forward,
scaled residual) stays channels-first throughout: its norms reduce over the channel
dimension and its feed-forward runs as two 1x1 convolutions, so no transpose makes a
copy and no linear reshapes; each scaled residual is one addcmul. 21 operators a block
against transformers' 23 to 27; the values agree to float rounding
(tests/test_diffusion_graphs.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The block's RMSNorm over the channels of (rows, channels, time)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + norm.variance_epsilon)
    return norm.weight[:, None] * y.to(dtype)


def block(layer: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    h = layer.mixer(_norm(layer.norm, x), padding_cache=cache)
    x = torch.addcmul(x, h, layer.gamma[:, None])
    ffn = layer.ffn
    h = F.conv1d(_norm(layer.ffn_norm, x), ffn.linear1.weight[:, :, None], ffn.linear1.bias)
    h = F.conv1d(ffn.activation(h), ffn.linear2.weight[:, :, None], ffn.linear2.bias)
    return torch.addcmul(x, h, layer.ffn_gamma[:, None])


def run_stack(stack: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    x = stack.stem.conv(x, padding_cache=cache)
    for layer in stack.stem.stage:
        x = block(layer, x, cache)
    for stage in stack.conv_layers:
        sample = stage.convtr if hasattr(stage, "convtr") else stage.conv
        x = sample(x, padding_cache=cache)
        for layer in stage.stage:
            x = block(layer, x, cache)
    return stack.head(x, padding_cache=cache)
