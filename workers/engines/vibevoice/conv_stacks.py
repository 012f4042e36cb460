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
upsampling stages of one step cost about 7.6x less on CPU at 1 row, 5.5x at 16
(`python -m bench.upsample.run`, docs/PERFORMANCE.md 4c).

On CPU (CPU_KERNELS), where PyTorch's conv kernels are slow for a decode step's
shapes, the convs run as matmuls or multiply-adds over views instead: the same
arithmetic, the tiny model's audio-s/s 1.13x at 1 row and 1.22x at 4 rows
(docs/PERFORMANCE.md 4b). A GPU runs the conv kernels.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

# Where PyTorch's CPU conv kernels are slow for a decode step's shapes, the CPU runs
# other operators for the same arithmetic: the block's depthwise conv (mkldnn's costs
# about 50 us a call at any size here, and grows fast with rows at a few channels over
# thousands of samples), its feed-forward (CPU conv runs one GEMM per row, and packs
# the weight per call), and the stride convs past one output (2-3x dearer than a
# batched matmul at 2-4 rows). A GPU runs the conv kernels, one launch each;
# bench/step_dispatches turns this off to count what a GPU would launch.
CPU_KERNELS = True


def _on_cpu(x: torch.Tensor) -> bool:
    return CPU_KERNELS and x.device.type == "cpu"


def _norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The block's RMSNorm over the channels of (rows, channels, time)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + norm.variance_epsilon)
    return norm.weight[:, None] * y.to(dtype)


def block(layer: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    h = _depthwise(layer.mixer, _norm(layer.norm, x), cache)
    x = torch.addcmul(x, h, layer.gamma[:, None])
    h = _feed_forward(layer.ffn, _norm(layer.ffn_norm, x))
    return torch.addcmul(x, h, layer.ffn_gamma[:, None])


def _depthwise(mixer: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """The block's causal depthwise conv. On CPU: at a few frames (the frame-rate
    stages), each channel's kernel as one batched matmul over the unfolded input; at a
    few channels over many samples, one multiply-add per kernel tap over shifted views;
    elsewhere the conv."""
    conv = mixer.conv
    plain = conv.stride[0] == conv.dilation[0] == 1 and conv.bias is not None
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    if not (_on_cpu(x) and plain and depthwise):
        return mixer(x, padding_cache=cache)
    padded = cache.update(x, mixer.cache_key, mixer)
    if padded.shape[-1] == x.shape[-1]:  # no left context: not the streaming conv
        return mixer.conv(padded)
    frames, kernel = x.shape[-1], conv.kernel_size[0]
    weight = conv.weight[:, 0]  # (C, K)
    if frames <= 8:
        y = torch.matmul(padded.unfold(2, kernel, 1), weight[:, :, None])[..., 0]
        return y + conv.bias[:, None]
    if x.shape[1] > 16:
        return conv(padded)
    y = torch.addcmul(conv.bias[:, None], padded[..., :frames], weight[:, :1])
    for k in range(1, kernel):
        y.addcmul_(padded[..., k : k + frames], weight[:, k : k + 1])
    return y


def _feed_forward(ffn: Any, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward, channels-first (two 1x1 convs). On CPU as matmuls with
    the rows folded in: at a few frames every row's columns in one GEMM (the reshape
    copies little), at many one batched GEMM (no copy)."""
    one, two = ffn.linear1, ffn.linear2
    if not _on_cpu(x) or one.bias is None or two.bias is None:
        h = F.conv1d(x, one.weight[:, :, None], one.bias)
        return F.conv1d(ffn.activation(h), two.weight[:, :, None], two.bias)
    rows, channels, frames = x.shape
    if frames == 1:  # the rows are the GEMM's rows: a view
        h = ffn.activation(F.linear(x[:, :, 0], one.weight, one.bias))
        return F.linear(h, two.weight, two.bias)[:, :, None]
    if rows > 1 and frames <= 64:
        cols = x.transpose(0, 1).reshape(channels, rows * frames)
        h = ffn.activation(torch.addmm(one.bias[:, None], one.weight, cols))
        h = torch.addmm(two.bias[:, None], two.weight, h)
        return h.reshape(channels, rows, frames).transpose(0, 1)
    h = ffn.activation(torch.baddbmm(one.bias[:, None], one.weight.expand(rows, -1, -1), x))
    return torch.baddbmm(two.bias[:, None], two.weight.expand(rows, -1, -1), h)


def causal_conv(module: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """transformers' streaming causal conv (a stem, a downsampling stage, a head). Where
    the input with its context is exactly one kernel long, each row has one output (in a
    decode step: the decoder's stem, and the encoder's last downsampling stage and head),
    and the conv is one linear map over (channels x kernel): PyTorch's CPU conv takes a
    slow path for such shapes at more than one row. On CPU, up to 8 rows, the longer
    inputs run as one batched matmul over their unfolded windows (the conv's own kernel
    costs 2-3x that at a few rows, a few channels and thousands of samples)."""
    padded = cache.update(x, module.cache_key, module)
    conv = module.conv
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    if conv.groups != 1 or conv.dilation[0] != 1 or conv.bias is None:
        return conv(padded)
    rows, weight = padded.shape[0], conv.weight.reshape(conv.out_channels, -1)
    if padded.shape[-1] == kernel:
        return F.linear(padded.reshape(rows, -1), weight, conv.bias)[:, :, None]
    if not (_on_cpu(x) and rows <= 8):
        return conv(padded)
    windows = padded.unfold(2, kernel, stride)  # (rows, C_in, outputs, K)
    cols = windows.permute(0, 1, 3, 2).reshape(rows, weight.shape[1], -1)
    return torch.baddbmm(conv.bias[:, None], weight.expand(rows, -1, -1), cols)


def upsample(module: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """transformers' streaming causal transposed conv (kernel K, stride s), its new output
    only. transformers runs the conv over the K - 1 context frames and the new ones, then
    keeps the last (new frames x s) samples of the trimmed output; only the last
    (K - 1) // s context frames reach those (output sample p takes the frames t with
    0 <= p - t*s < K). Where the new frames are fewer than K (the frame-rate stages of a
    decode step: 1 new frame against 15 of context in the first stage), the rest is
    waste, so those stages run on the frames that count, as one matmul and an overlap-add
    (the conv's own kernels pick a slow path for so few frames); longer stages waste
    little and run the module's conv. On CPU one new frame and the longer stages run
    one matmul per kernel tap instead (`_by_phase`)."""
    conv = module.convtr
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    frames = x.shape[-1]
    by_phase = (frames >= kernel or frames == 1) and _on_cpu(x)
    by_phase = by_phase and conv.bias is not None and conv.groups == 1
    if frames >= kernel and not by_phase:
        return module(x, padding_cache=cache)
    padded = cache.update(x, module.cache_key, module)
    context = (kernel - 1) // stride
    fed = padded[..., padded.shape[-1] - context - frames :]  # (rows, C_in, n)
    if by_phase:
        return _by_phase(conv, fed, frames)
    c_in, c_out = conv.weight.shape[0], conv.weight.shape[1]
    # (rows, n, C_in) @ (C_in, C_out K): the rows fold into one GEMM against the weight
    # as stored; the weight's transpose on the left would broadcast it per row
    cols = torch.matmul(fed.transpose(1, 2), conv.weight.reshape(c_in, c_out * kernel))
    cols = cols.transpose(1, 2)  # (rows, C_out K, n)
    length = (fed.shape[-1] - 1) * stride + kernel
    y = F.fold(cols, (1, length), (1, kernel), stride=(1, stride))[:, :, 0]
    y = y[..., context * stride : (context + frames) * stride]
    return y + conv.bias[:, None] if conv.bias is not None else y


_PHASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _phase_weights(conv: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A transposed conv's weight (C_in, C_out, K) as one (C_out s, C_in) matrix per
    tap: output phase p of frame t takes kernel index j s + p from input frame t - j
    (the kernel zero-padded to whole taps); and its bias per (channel, phase). Made
    once per weight (remade if the weight is replaced or changed in place); made each
    call under torch.compile, which does not trace the memo's data pointers."""
    w = conv.weight
    if torch.compiler.is_compiling():
        return _split_by_phase(conv)
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    hit = _PHASES.get(conv)
    if hit is None or hit[0] != key:
        hit = _PHASES[conv] = (key, _split_by_phase(conv))
    return hit[1]


def _split_by_phase(conv: Any) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight
    c_in, c_out, kernel = w.shape
    stride = conv.stride[0]
    taps = -(-kernel // stride)
    with torch.no_grad():
        padded = F.pad(w, (0, taps * stride - kernel)).view(c_in, c_out, taps, stride)
        mats = padded.permute(2, 1, 3, 0).reshape(taps, c_out * stride, c_in).contiguous()
        bias = conv.bias.repeat_interleave(stride)[:, None]
    return mats, bias


def _by_phase(conv: Any, fed: torch.Tensor, frames: int) -> torch.Tensor:
    """The transposed conv's new output on CPU, one matmul per tap (two where the kernel
    is twice the stride, as in every VibeVoice stage), accumulated in place, then the
    phases interleaved: about half the conv's cost at 2-4 rows. One new frame (the
    first stage of a step): the rows are the GEMMs' rows, and (rows, C_out s) is the
    output's layout already (against the overlap-add: 1.8x less at 4 rows)."""
    mats, bias = _phase_weights(conv)
    rows, context = fed.shape[0], fed.shape[-1] - frames
    if frames == 1:
        y = F.linear(fed[:, :, context], mats[0], bias[:, 0])
        for j in range(1, mats.shape[0]):
            y.addmm_(fed[:, :, context - j], mats[j].T)
        return y.view(rows, -1, conv.stride[0])
    y = torch.baddbmm(bias, mats[0].expand(rows, -1, -1), fed[..., context:])
    for j in range(1, mats.shape[0]):
        y.baddbmm_(mats[j].expand(rows, -1, -1), fed[..., context - j : context - j + frames])
    stride = conv.stride[0]
    y = y.view(rows, -1, stride, frames).transpose(2, 3)
    return y.reshape(rows, y.shape[1], frames * stride)


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
