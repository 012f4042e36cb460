"""The LM's fused projections (workers/engines/vibevoice/fused_lm.py): the same linear
map as transformers' separate q/k/v and gate/up, whatever calls them, with the model's
state_dict unchanged and fewer matmuls dispatched."""

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from workers.engines.vibevoice.fused_lm import FusedProjection, fuse_projections


def small_lm():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2Model(cfg).eval()


class Matmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_fused_layers_compute_what_the_separate_ones_do():
    plain = small_lm()
    fused = copy.deepcopy(plain)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    assert fuse_projections(fused) == 4  # q/k/v and gate/up in each of 2 layers
    after = fused.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(fused.layers[0].self_attn.k_proj, FusedProjection)

    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad(), Matmuls() as m_plain:
        want = plain(input_ids=ids).last_hidden_state
    with torch.no_grad(), Matmuls() as m_fused:
        got = fused(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert m_plain.count - m_fused.count == 2 * 3  # 3 matmuls fewer per layer


def test_a_projection_called_alone_or_out_of_order_is_still_its_own():
    plain = small_lm()
    fused = copy.deepcopy(plain)
    fuse_projections(fused)
    a, b = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    pa, fa = plain.layers[1].self_attn, fused.layers[1].self_attn
    with torch.no_grad():
        fa.q_proj(a)  # keeps the group's output for `a`
        # v for another input, then k for `a` (its kept slice), then v alone
        torch.testing.assert_close(fa.v_proj(b), pa.v_proj(b), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fa.k_proj(a), pa.k_proj(a), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fa.v_proj(a), pa.v_proj(a), rtol=1e-5, atol=1e-6)
        pm, fm = plain.layers[0].mlp, fused.layers[0].mlp
        torch.testing.assert_close(fm.up_proj(b), pm.up_proj(b), rtol=1e-5, atol=1e-6)
