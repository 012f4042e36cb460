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
arithmetic, the tiny model's audio-s/s 1.17x at 1 row and 1.22x at 4 rows
(docs/PERFORMANCE.md 4b). A GPU runs the conv kernels. On CPU in float32 a block of
up to 512 channels also runs with its scales folded into the weights they multiply
(`_folded`: the layer scales, the feed-forward norm's weight, the first bias as a
column), which saves passes over its largest tensors: about 10% of a block's cost
per row.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

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
    y = x32 * torch.rsqrt((x32 * x32).mean(1, keepdim=True) + norm.variance_epsilon)
    return norm.weight[:, None] * y.to(dtype)


def block(layer: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    if _on_cpu(x) and x.dtype == torch.float32:
        folded = _folded(layer)
        if folded is not None:
            return _block_folded(layer, folded, x, cache)
    h = _depthwise(layer.mixer, _norm(layer.norm, x), cache)
    x = torch.addcmul(x, h, layer.gamma[:, None])
    h = _feed_forward(layer.ffn, _norm(layer.ffn_norm, x))
    return torch.addcmul(x, h, layer.ffn_gamma[:, None])


class _Folded(NamedTuple):
    """A block's scales folded into the weights they multiply (float32, CPU): the layer
    scales into the depthwise conv and the second linear, the feed-forward norm's weight
    into the first linear's columns, whose bias rides as one more column (against a row
    of ones in its input)."""

    dw_weight: torch.Tensor  # (C, K): gamma * the depthwise kernel
    dw_bias: torch.Tensor  # (C, 1): gamma * its bias
    w1: torch.Tensor  # (4C, C): the first linear, the norm's weight in its columns
    b1: torch.Tensor  # (4C,): its bias
    w1_bias: torch.Tensor  # (4C, C + 1): the two side by side
    w2: torch.Tensor  # (C, 4C): ffn_gamma * the second linear
    b2: torch.Tensor  # (C, 1): ffn_gamma * its bias
    exact_gelu: bool  # the activation is GELU itself (so it may run in place)


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _folded(layer: Any) -> _Folded | None:
    """The block's folded weights, made once per set of weights (remade if one is
    replaced or changed in place, or the module moved; made each call under
    torch.compile); None where the block is not of that shape (its conv not a plain
    depthwise one, a bias missing). A hit costs about 3 us a block: the parameters are
    read from the modules' own tables (an attribute of a module costs about 1 us)."""
    params = _block_params(layer)
    if params is None:
        return None
    # the parameters are held with their fold, so their ids stay theirs; one data pointer
    # tells a module moved or cast (that replaces every parameter's data, not its id)
    held = _memo(
        _FOLDED,
        layer,
        lambda: (params[0].data_ptr(), *[(id(p), p._version) for p in params]),
        lambda: (params, _fold(layer, params)),
    )
    return held[1]


def _memo(table: weakref.WeakKeyDictionary, owner: Any, key: Any, make: Any) -> Any:
    """make() memoised per `owner` while key() stays the same; made each call under
    torch.compile, which does not trace the tensors' data pointers and versions."""
    if torch.compiler.is_compiling():
        return make()
    k = key()
    hit = table.get(owner)
    if hit is None or hit[0] != k:
        hit = table[owner] = (k, make())
    return hit[1]


def _block_params(layer: Any) -> tuple | None:
    """What `_fold` reads: the depthwise conv's weight and bias, gamma, the feed-forward
    norm's weight, both linears' weights and biases, ffn_gamma; None where one is
    missing."""
    try:
        mods, ffn = layer._modules, layer._modules["ffn"]._modules
        conv = mods["mixer"]._modules["conv"]._parameters
        one, two = ffn["linear1"]._parameters, ffn["linear2"]._parameters
        params = (conv["weight"], conv["bias"], layer._parameters["gamma"],
                  mods["ffn_norm"]._parameters["weight"], one["weight"], one["bias"],
                  two["weight"], two["bias"], layer._parameters["ffn_gamma"])  # fmt: skip
    except (AttributeError, KeyError):
        return None
    return None if any(p is None for p in params) else params


# The widest block folded: the fold keeps its own copies of the linears' weights (12 C^2
# values) to save passes over activations of C x frames. In a decode step the wide
# blocks run at the frame rate (1.5B's 1,024 and 2,048 channels, at 1 to 8 frames),
# where the copies would cost memory (3.3 GB in float32 at 1.5B's widths) to save
# passes over a few frames; the blocks up to 512 channels cost 96 MB.
FOLD_MAX_CHANNELS = 512


def _fold(layer: Any, params: tuple) -> _Folded | None:
    conv = layer.mixer.conv
    if not _plain_depthwise(conv) or conv.in_channels > FOLD_MAX_CHANNELS:
        return None
    dw_w, dw_b, gamma, norm_w, w1, b1, w2, b2, ffn_gamma = params
    with torch.no_grad():
        w1 = w1 * norm_w[None, :]
        return _Folded(
            dw_weight=dw_w[:, 0] * gamma[:, None],
            dw_bias=(dw_b * gamma)[:, None],
            w1=w1,
            b1=b1,
            w1_bias=torch.cat([w1, b1[:, None]], 1),
            w2=w2 * ffn_gamma[:, None],
            b2=(b2 * ffn_gamma)[:, None],
            exact_gelu=getattr(layer.ffn.activation, "act", None) is F.gelu,
        )


def _plain_depthwise(conv: Any) -> bool:
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    return depthwise and conv.stride[0] == conv.dilation[0] == 1 and conv.bias is not None


def _block_folded(layer: Any, f: _Folded, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """The block on CPU with its scales folded (`_folded`): the same arithmetic, the
    products taken in another order, with fewer passes over its largest tensors: no
    layer scale or norm weight applied on its own, the first linear's bias out of a
    copy, the GELU in place, and the first residual the start of the taps' sum. The
    depthwise conv is still fed the weighted norm, which is what its padding cache
    keeps (as transformers' conv keeps it)."""
    x = _depthwise_residual(layer, f, _norm(layer.norm, x), x, cache)
    scale = (x * x).mean(1, keepdim=True).add_(layer.ffn_norm.variance_epsilon).rsqrt_()
    rows, channels, frames = x.shape
    act = torch.ops.aten.gelu_ if f.exact_gelu else layer.ffn.activation
    if frames == 1:  # the rows as the GEMMs' rows (the columns' way costs 1.6x at 2-4)
        h = act(F.linear((x * scale)[:, :, 0], f.w1, f.b1))
        return F.linear(h, f.w2, f.b2[:, 0]).add_(x[:, :, 0])[:, :, None]
    # the feed-forward on every row's columns at once: the normed input channels-major
    # (channels, rows, time), beside a row of ones that carries the first bias
    normed = torch.empty(channels + 1, rows, frames, dtype=x.dtype, device=x.device)
    normed[channels].fill_(1.0)
    torch.mul(x.transpose(0, 1), scale.transpose(0, 1), out=normed[:channels])
    h = act(torch.mm(f.w1_bias, normed.view(channels + 1, rows * frames)))
    h = torch.addmm(f.b2, f.w2, h).view(channels, rows, frames)
    return x + h.transpose(0, 1)


def _depthwise_residual(
    layer: Any, f: _Folded, normed: torch.Tensor, x: torch.Tensor, cache: Any
) -> torch.Tensor:
    """x + gamma * depthwise(normed), gamma folded into the kernel."""
    mixer = layer.mixer
    padded = cache.update(normed, mixer.cache_key, mixer)
    if padded.shape[-1] == x.shape[-1]:  # no left context: not the streaming conv
        return torch.addcmul(x, mixer.conv(padded), layer.gamma[:, None])
    return _depthwise_taps(padded, f.dw_weight, f.dw_bias, start=x)


def _depthwise(mixer: Any, x: torch.Tensor, cache: Any) -> torch.Tensor:
    """The block's causal depthwise conv: on CPU `_depthwise_taps`, elsewhere the
    module."""
    conv = mixer.conv
    if not (_on_cpu(x) and _plain_depthwise(conv)):
        return mixer(x, padding_cache=cache)
    padded = cache.update(x, mixer.cache_key, mixer)
    if padded.shape[-1] == x.shape[-1]:  # no left context: not the streaming conv
        return mixer.conv(padded)
    return _depthwise_taps(padded, conv.weight[:, 0], conv.bias[:, None])


def _depthwise_taps(
    padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, start: Any = None
) -> torch.Tensor:
    """A causal depthwise conv on CPU over `padded` (its input with the kernel's left
    context), kernel `weight` (C, K) and `bias` (C, 1), added to `start` if given (a
    residual). At a few frames (the frame-rate stages) each channel's kernel is one
    batched matmul over the unfolded input; at a few channels over many samples, one
    multiply-add per kernel tap over shifted views, the sum starting from `start`;
    elsewhere the conv."""
    channels, kernel = weight.shape
    frames = padded.shape[-1] - kernel + 1
    if frames <= 8:
        y = torch.matmul(padded.unfold(2, kernel, 1), weight[:, :, None])[..., 0]
        y = y.add_(bias)
    elif channels > 16:
        y = F.conv1d(padded, weight[:, None], bias[:, 0], groups=channels)
    else:
        y = torch.addcmul(bias if start is None else start, padded[..., :frames], weight[:, :1])
        for k in range(1, kernel):
            y.addcmul_(padded[..., k : k + frames], weight[:, k : k + 1])
        return y if start is None else y.add_(bias)
    return y if start is None else y.add_(start)


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
    costs 2-3x that at a few rows, a few channels and thousands of samples); from 3 rows
    a stride-1 conv to fewer channels than it reads (the decoder's head: 4 to 1 over a
    step's samples) sums its taps instead (`_tap_sum`: 0.66x the unfolded matmul at 4
    rows, 0.31x at 8, whose copy of the windows grows past the cache)."""
    padded = cache.update(x, module.cache_key, module)
    conv = module.conv
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    if conv.groups != 1 or conv.dilation[0] != 1 or conv.bias is None:
        return conv(padded)
    rows, weight = padded.shape[0], conv.weight.reshape(conv.out_channels, -1)
    if padded.shape[-1] == kernel:
        return F.linear(padded.reshape(rows, -1), weight, conv.bias)[:, :, None]
    narrowing = stride == 1 and conv.out_channels < conv.in_channels
    if _on_cpu(x) and narrowing and rows >= 3:
        return _tap_sum(conv, padded)
    if not (_on_cpu(x) and rows <= 8):
        return conv(padded)
    windows = padded.unfold(2, kernel, stride)  # (rows, C_in, outputs, K)
    cols = windows.permute(0, 1, 3, 2).reshape(rows, weight.shape[1], -1)
    return torch.baddbmm(conv.bias[:, None], weight.expand(rows, -1, -1), cols)


def _tap_sum(conv: Any, padded: torch.Tensor) -> torch.Tensor:
    """A stride-1 conv as one matmul that gives every tap's output over the whole input,
    (K C_out, C_in) @ (C_in, time), then each tap's rows summed at its shift: the
    matmul writes K C_out rows where the unfolded windows copy K C_in."""
    c_out, c_in, kernel = conv.weight.shape
    rows, frames = padded.shape[0], padded.shape[-1] - kernel + 1
    taps = conv.weight.permute(2, 0, 1).reshape(kernel * c_out, c_in)
    # bmm, not matmul: matmul folds a weight that requires grad (even under no_grad)
    # into one GEMM over the transposed input, two copies that triple the cost here
    z = torch.bmm(taps.expand(rows, -1, -1), padded).view(rows, kernel, c_out, -1)
    y = torch.add(z[:, 0, :, :frames], conv.bias[:, None])
    for k in range(1, kernel):
        y.add_(z[:, k, :, k : k + frames])
    return y


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
    return _memo(
        _PHASES,
        conv,
        lambda: (w.data_ptr(), w._version, w.dtype, w.device),
        lambda: _split_by_phase(conv),
    )


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
