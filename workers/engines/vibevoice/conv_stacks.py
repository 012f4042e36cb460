"""The streaming conv stacks (the acoustic decoder, the semantic encoder), run with
fewer operators per block than transformers' forwards, on the same modules and weights.

    run_stack(stack, x, cache) -> y    a VibeVoice tokenizer encoder or decoder model:
        stem conv and blocks, each stage's (transposed) conv and blocks, head conv;
        x and y (rows, channels, time); `cache` the padding cache of those rows
    causal_conv(module, x, cache) -> y   a stem, downsampling or head conv; one linear
        map where the input with its context is one kernel long (one output)
    upsample(module, x, cache) -> y    one stage's streaming transposed conv, fed only
        the context frames that reach its new output (1 of 15 in the first stage)

A block (ConvNeXt-like: norm, depthwise causal conv, scaled residual; norm, feed-forward,
scaled residual) stays channels-first throughout: its norms reduce over the channel
dimension and its feed-forward runs as two 1x1 convolutions, so no transpose makes a
copy and no linear reshapes; each scaled residual is one addcmul. 21 operators a block
against transformers' 23 to 27; the values agree to float rounding
(tests/test_diffusion_graphs.py, tests/test_stream_convs.py). At 1.5B's widths the
upsampling stages of one step cost about 5x less on CPU at 1 row, 3x at 16
(`python -m bench.upsample.run`, docs/PERFORMANCE.md 4c).
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


def causal_conv(module: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """transformers' streaming causal conv (a stem, a downsampling stage, a head). Where
    the input with its context is exactly one kernel long, each row has one output (in a
    decode step: the decoder's stem, and the encoder's last downsampling stage and head),
    and the conv is one linear map over (channels x kernel): PyTorch's CPU conv takes a
    slow path for such shapes at more than one row."""
    padded = cache.update(x, module.cache_key, module)
    conv = module.conv
    kernel = conv.kernel_size[0]
    if padded.shape[-1] != kernel or conv.groups != 1 or conv.dilation[0] != 1:
        return conv(padded)
    weight = conv.weight.reshape(conv.out_channels, -1)
    return F.linear(padded.reshape(padded.shape[0], -1), weight, conv.bias)[:, :, None]


def upsample(module: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """transformers' streaming causal transposed conv (kernel K, stride s), its new output
    only. transformers runs the conv over the K - 1 context frames and the new ones, then
    keeps the last (new frames x s) samples of the trimmed output; only the last
    (K - 1) // s context frames reach those (output sample p takes the frames t with
    0 <= p - t*s < K). Where the new frames are fewer than K (the frame-rate stages of a
    decode step: 1 new frame against 15 of context in the first stage), the rest is
    waste, so those stages run on the frames that count, as one matmul and an overlap-add
    (the conv's own kernels pick a slow path for so few frames); longer stages waste
    little and run the module's conv."""
    conv = module.convtr
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    frames = x.shape[-1]
    if frames >= kernel:
        return module(x, padding_cache=cache)
    padded = cache.update(x, module.cache_key, module)
    context = (kernel - 1) // stride
    fed = padded[..., padded.shape[-1] - context - frames :]  # (rows, C_in, n)
    c_in, c_out = conv.weight.shape[0], conv.weight.shape[1]
    cols = torch.matmul(conv.weight.reshape(c_in, c_out * kernel).T, fed)  # (rows, C_out K, n)
    length = (fed.shape[-1] - 1) * stride + kernel
    y = F.fold(cols, (1, length), (1, kernel), stride=(1, stride))[:, :, 0]
    y = y[..., context * stride : (context + frames) * stride]
    return y + conv.bias[:, None] if conv.bias is not None else y


def run_stack(stack: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    x = causal_conv(stack.stem.conv, x, cache)
    for layer in stack.stem.stage:
        x = block(layer, x, cache)
    for stage in stack.conv_layers:
        if hasattr(stage, "convtr"):
            x = upsample(stage.convtr, x, cache)
        else:
            x = causal_conv(stage.conv, x, cache)
        for layer in stage.stage:
            x = block(layer, x, cache)
    return causal_conv(stack.head, x, cache)
