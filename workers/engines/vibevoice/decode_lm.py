"""The language model's decode step, run over transformers' Qwen2 weights without its
module machinery.

    DecodeLM.build(lm) -> DecodeLM | None   None where the LM is not the plain Qwen2
        shape below (the engine then runs transformers' forward)
    decode(embeds, step, attn_implementation, **kw) -> hidden   one token for each of
        the 2n seqs (rows, 1, H) through every layer, each layer's KV written and read
        through `step` (paged_kv's StepCache), the attention the engine's decode_attn;
        the last hidden states after the final norm (rows, H)

In a decode step the host, not the device, sets the pace (docs/PERFORMANCE.md 6: about
30 us of host time per operator on an H200). transformers' forward spends much of its
host time above the operators: a module call per projection, norm and activation,
keyword plumbing and deprecation wrappers in every layer (here the forward takes 1.4x
to 1.7x less host time at 16 and 1 rows: docs/PERFORMANCE.md 4b). Here each layer is a few
lines of tensor calls on the same weights, in transformers' order, so the result is
the same bit for bit (tests/test_decode_lm.py), with fewer operators besides:
  - q and k are rotated together, and the half rotation is one flip against a sine
    whose first half is negated (-x2 * s is -(x2 * s) exactly), 4 operators a layer
    against transformers' 10;
  - each norm is F.rms_norm and the weight's multiply: on CPU transformers' six
    operators; on CUDA two kernels (the fused norm, unchecked here, then the multiply,
    rounding where transformers rounds).
The prefill (many tokens, once per row) stays on transformers' forward. The first
CHECKED_STEPS decode steps of an engine run both forwards and compare them (the
tolerance of graphs.py): where they differ, or the lean one raises (a transformers
release whose modules moved), the worker logs a warning and goes on with transformers'
forward for good.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from workers.engines.vibevoice.graphs import max_relative, tolerance

log = logging.getLogger("vibevoice_pool.worker")
CHECKED_STEPS = 2  # an engine's first decode steps, run both ways and compared


def cache_keyword(lm: Any) -> str:
    """The name transformers' LM forward takes its KV cache by: `cache` since 5.23,
    `past_key_values` before (5.17 swallows an unknown `cache=` silently and runs with
    no cache at all)."""
    import inspect

    params = inspect.signature(lm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm: normalized in float32, rounded to h's dtype, then
    scaled by the weight in that dtype (two roundings in bfloat16, as transformers
    does). F.rms_norm is one fused kernel on CUDA; on CPU, the same operators."""
    return weight * F.rms_norm(h, h.shape[-1:], eps=eps)


class _Layer:
    """One decoder layer's weights, as the decode reads them."""

    def __init__(self, layer: Any):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.in_norm = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        post = layer.post_attention_layernorm
        self.post_norm = (post.weight, post.variance_epsilon)
        qkv = attn.q_proj.group  # fused_lm's fused q/k/v
        self.qkv = (qkv.weight, qkv.bias)
        self.o = (attn.o_proj.weight, attn.o_proj.bias)
        self.gate_up = (mlp.gate_proj.group.weight, mlp.gate_proj.group.bias)
        self.down = (mlp.down_proj.weight, mlp.down_proj.bias)
        self.intermediate = mlp.down_proj.in_features


class DecodeLM:
    def __init__(self, lm: Any):
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim**-0.5
        self.rotary = lm.rotary_emb
        self.norm = (lm.norm.weight, lm.norm.variance_epsilon)
        self.layers = [_Layer(layer) for layer in lm.layers[: cfg.num_hidden_layers]]
        # where transformers' attention functions live for this LM (its eager default)
        self.module = sys.modules[type(lm.layers[0].self_attn).__module__]
        self.checks_left = CHECKED_STEPS

    @classmethod
    def build(cls, lm: Any) -> DecodeLM | None:
        """The lean decode of `lm` (after fused_lm.fuse_projections), or None where its
        layers are not plain Qwen2 ones: fused q/k/v and gate/up, a SiLU MLP, full
        attention in every layer, default RoPE."""
        from workers.engines.vibevoice.fused_lm import FusedProjection

        cfg = getattr(lm, "config", None)
        layers = list(getattr(lm, "layers", []))
        if cfg is None or not layers or not hasattr(lm, "rotary_emb"):
            return None
        if getattr(cfg, "hidden_act", None) != "silu":
            return None
        if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
            return None
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope != "default":
            return None
        for layer in layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if not (
                isinstance(getattr(attn, "q_proj", None), FusedProjection)
                and isinstance(getattr(mlp, "gate_proj", None), FusedProjection)
                and type(getattr(attn, "o_proj", None)) is torch.nn.Linear
                and type(getattr(mlp, "down_proj", None)) is torch.nn.Linear
            ):
                return None
        return cls(lm)

    def forward(
        self,
        embeds: torch.Tensor,
        step: Any,
        attn_implementation: str,
        reference: Callable[[], torch.Tensor],
        **attn_kwargs: Any,
    ) -> tuple[torch.Tensor, bool]:
        """(hidden states, trusted). While checks are left, `reference()` (transformers'
        forward of the same step, which writes the same KV column again) runs too and
        its hidden states are returned; trusted is False where the two differ beyond the
        dtype's tolerance or decode raised, and the caller drops this object."""
        if not self.checks_left:
            return self.decode(embeds, step, attn_implementation, **attn_kwargs), True
        self.checks_left -= 1
        why = ""
        try:
            got = self.decode(embeds, step, attn_implementation, **attn_kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: transformers' forward instead
            got, why = None, f"{type(exc).__name__}: {exc}"
        want = reference()
        if got is not None:
            worst, tol = max_relative(got, want), tolerance(want.dtype)
            if worst > tol:
                why = f"differs from transformers' forward by {worst:.3g} (> {tol:.3g})"
        if why:
            log.warning("decode_lm: %s; this worker runs transformers' LM forward", why)
        return want, not why

    def decode(
        self, embeds: torch.Tensor, step: Any, attn_implementation: str, **attn_kwargs: Any
    ) -> torch.Tensor:
        """`attn_implementation`: "sdpa" runs inline; any other name is looked up as
        transformers' layers look it up (its registered attention functions, else the
        model's eager attention). `attn_kwargs` go to that function."""
        attend = self._sdpa
        if attn_implementation != "sdpa":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            default = self.module.eager_attention_forward
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, default)

            def attend(module, q, k, v, mask):
                out, _ = attention(
                    module, q, k, v, mask, dropout=0.0, scaling=self.scaling, **attn_kwargs
                )
                return out

        rows = embeds.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * dim
        cos, sin = self.rotary(embeds, step.positions)  # (rows, 1, dim)
        half = dim // 2
        cos = cos[:, :, None]  # over the heads of (rows, 1, heads, dim)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]
        h = embeds
        for i, layer in enumerate(self.layers):
            x = _norm(h, *layer.in_norm)
            qkv = F.linear(x, *layer.qkv)
            qk = qkv[..., :qk_width].view(rows, 1, heads + kv_heads, dim)
            flipped = qk.view(rows, 1, heads + kv_heads, 2, half).flip(-2).view(qk.shape)
            qk = qk * cos + flipped * sin
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[..., qk_width:].view(rows, 1, kv_heads, dim).transpose(1, 2)
            k, v = step.update(k, v, i)
            out = attend(layer.attn, q, k, v, step.mask)
            h = h + F.linear(out.reshape(rows, 1, heads * dim), *layer.o)
            x = _norm(h, *layer.post_norm)
            gate, up = F.linear(x, *layer.gate_up).split(layer.intermediate, dim=-1)
            h = h + F.linear(F.silu(gate) * up, *layer.down)
        return _norm(h, *self.norm)[:, -1]

    def _sdpa(self, module, q, k, v, mask) -> torch.Tensor:
        """(rows, 1, heads, dim): sdpa as transformers runs it for one query token with an
        additive mask, the query's heads packed beside their key/value head."""
        rows = q.shape[0]
        if self.groups > 1:
            q = q.reshape(rows, self.kv_heads, self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(rows, self.heads, 1, self.head_dim).transpose(1, 2)
