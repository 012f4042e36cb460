"""conv_stacks' streaming convs against transformers' own modules on their own padding
caches, chunk after chunk (the cache carried), with the CPU's own operators
(conv_stacks.CPU_KERNELS, the default on CPU) and with those a GPU runs:

- upsample, a causal transposed conv fed only the input frames that reach its new
  output, on each of its paths: fewer new frames than the kernel (one matmul and an
  overlap-add), and as many or more (the module's conv; on CPU one batched matmul per
  kernel tap);
- causal_conv, on each of its paths: an input with context one kernel long (one
  linear map) and any other (the module's conv; on CPU a batched matmul over the
  unfolded windows, up to 8 rows);
- block, the ConvNeXt-like layer, at the frame counts and widths that pick each of
  its depthwise-conv and feed-forward paths; on CPU its weights folded once, and
  folded again when one changes."""

from __future__ import annotations

import pytest
import torch
from transformers.models.vibevoice_acoustic_tokenizer import (
    modeling_vibevoice_acoustic_tokenizer as mod,
)

from workers.engines.vibevoice import conv_stacks
from workers.engines.vibevoice.conv_stacks import block, causal_conv, upsample


@pytest.fixture(params=[True, False], ids=["cpu-kernels", "gpu-kernels"], autouse=True)
def kernels(request, monkeypatch):
    """Every test here twice: the CPU's own operators, and the conv kernels a GPU runs."""
    monkeypatch.setattr(conv_stacks, "CPU_KERNELS", request.param)
    return request.param


def chunk_after_chunk(module, ours, shape_in: tuple, shape_out: tuple) -> None:
    """`ours(module, x, cache)` against `module(x, padding_cache=...)` over four chunks of
    `shape_in`, each on its own padding cache carried from chunk to chunk; the module's
    weights random (its layer scales and biases far from their small initial values)."""
    g = torch.Generator().manual_seed(sum(shape_in) + sum(shape_out))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    theirs, mine = (mod.VibeVoiceAcousticTokenizerConv1dPaddingCache() for _ in range(2))
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(shape_in, generator=g)
            want = module(x, padding_cache=theirs)
            got = ours(module, x, mine)
            assert got.shape == want.shape == shape_out
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


SHAPES = [  # in, out, kernel, stride, new frames per chunk
    (256, 128, 16, 8, 1),  # the decoder's first stage at the tiny model's widths
    (128, 64, 10, 5, 8),
    (64, 32, 10, 5, 40),  # as many frames as the kernel or more: the module's conv
    (8, 4, 4, 2, 1600),  # the decoder's last stage: thousands of samples, few channels
    (12, 6, 7, 3, 2),  # a kernel that is not a multiple of its stride
    (8, 4, 4, 4, 1),  # kernel == stride: no context frame reaches the output
]


@pytest.mark.parametrize("c_in,c_out,kernel,stride,frames", SHAPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_upsample_equals_transformers_chunk_after_chunk(c_in, c_out, kernel, stride, frames, rows):
    module = mod.VibeVoiceAcousticTokenizerCausalConvTranspose1d(
        c_in, c_out, kernel, cache_key="up", stride=stride
    )
    chunk_after_chunk(module, upsample, (rows, c_in, frames), (rows, c_out, frames * stride))


def test_the_frames_that_do_not_reach_the_output_change_nothing():
    """The claim the short path rests on, shown on transformers' module alone: with
    kernel 16 and stride 8, only the last (16 - 1) // 8 = 1 of the 15 context frames
    reaches the new output; changing the other 14 changes nothing."""
    module = mod.VibeVoiceAcousticTokenizerCausalConvTranspose1d(16, 8, 16, "up", stride=8)
    x, last = torch.randn(2, 16, 1), torch.randn(2, 16, 1)
    outs = []
    with torch.no_grad():
        for old in (torch.zeros(2, 16, 14), torch.randn(2, 16, 14)):
            cache = mod.VibeVoiceAcousticTokenizerConv1dPaddingCache()
            module(torch.cat([old, last], dim=-1), padding_cache=cache)  # fills the context
            outs.append(module(x, padding_cache=cache))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].abs().max() > 0


CONV_SHAPES = [  # in, out, kernel, stride, groups, new frames per chunk
    (16, 256, 7, 1, 1, 1),  # the decoder's stem in a decode step: one linear map
    (128, 256, 16, 8, 1, 8),  # the encoder's last downsampling stage: one linear map
    (256, 32, 7, 1, 1, 1),  # the encoder's head
    (32, 64, 10, 5, 1, 200),  # an earlier downsampling stage: the module's conv
    (1, 4, 7, 1, 1, 3200),  # the encoder's stem over a step's samples
    (4, 1, 7, 1, 1, 3200),  # the decoder's head
    (64, 64, 7, 1, 64, 1),  # a depthwise mixer: the module's conv
]


@pytest.mark.parametrize("c_in,c_out,kernel,stride,groups,frames", CONV_SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_causal_conv_equals_transformers_chunk_after_chunk(
    c_in, c_out, kernel, stride, groups, frames, rows
):
    module = mod.VibeVoiceAcousticTokenizerCausalConv1d(
        c_in, c_out, kernel, cache_key="c", stride=stride, groups=groups
    )
    chunk_after_chunk(module, causal_conv, (rows, c_in, frames), (rows, c_out, frames // stride))


BLOCK_SHAPES = [  # channels, new frames per chunk
    (256, 1),  # the frame rate: the depthwise conv unfolded, the rows as GEMM rows
    (128, 8),  # a few frames: the depthwise conv unfolded, the rows' columns in one GEMM
    (64, 40),  # the depthwise conv's own kernel
    (4, 3200),  # few channels over thousands of samples: a multiply-add per kernel tap
]


@pytest.mark.parametrize("channels,frames", BLOCK_SHAPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_block_equals_transformers_chunk_after_chunk(channels, frames, rows):
    from transformers import VibeVoiceAcousticTokenizerConfig

    layer = mod.VibeVoiceAcousticTokenizerConvNext1dLayer(
        VibeVoiceAcousticTokenizerConfig(), channels, layer_idx=0
    )
    chunk_after_chunk(layer, block, (rows, channels, frames), (rows, channels, frames))


def test_a_block_follows_its_weights_changed_after_its_first_call():
    """On CPU a block runs on weights folded once (its scales into the weights they
    multiply): a weight changed in place, or a parameter replaced, after the first call
    is seen by the next call, which still equals transformers' layer."""
    from transformers import VibeVoiceAcousticTokenizerConfig

    layer = mod.VibeVoiceAcousticTokenizerConvNext1dLayer(
        VibeVoiceAcousticTokenizerConfig(), 8, layer_idx=0
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the layer scales far from their small initial values
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 8, 40, generator=g)

    def agree() -> None:
        with torch.no_grad():
            want = layer(x, padding_cache=mod.VibeVoiceAcousticTokenizerConv1dPaddingCache())
            got = block(layer, x, mod.VibeVoiceAcousticTokenizerConv1dPaddingCache())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())

    agree()
    with torch.no_grad():
        layer.ffn_norm.weight.mul_(3.0)  # in place
        layer.mixer.conv.weight.add_(0.5)
    agree()
    replacement = torch.nn.Parameter(torch.randn(layer.gamma.shape, generator=g))
    with torch.no_grad():  # its version counter as far along as the one it replaces
        replacement.mul_(2.0)
    assert replacement._version == layer.gamma._version
    layer.gamma = replacement
    agree()


def test_a_block_wider_than_the_fold_limit_runs_unfolded(monkeypatch):
    """The fold keeps copies of a block's linears (12 C^2 values): blocks wider than
    FOLD_MAX_CHANNELS (1.5B's frame-rate stages) run unfolded, and equal transformers'
    layer either way."""
    from transformers import VibeVoiceAcousticTokenizerConfig

    def layer():
        config = VibeVoiceAcousticTokenizerConfig()
        return mod.VibeVoiceAcousticTokenizerConvNext1dLayer(config, 8, layer_idx=0)

    assert conv_stacks._folded(layer()) is not None
    monkeypatch.setattr(conv_stacks, "FOLD_MAX_CHANNELS", 4)
    wide = layer()
    assert conv_stacks._folded(wide) is None
    chunk_after_chunk(wide, block, (2, 8, 40), (2, 8, 40))
