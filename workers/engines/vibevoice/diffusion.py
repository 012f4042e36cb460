"""The diffusion loop of the step engine, shaped to be captured as one CUDA graph.

    Schedule(head, scheduler, steps, device, dtype)   once per step count: the
        DPM-Solver++ coefficients of every sub-step as Python numbers and the
        timestep embeddings (steps, H) on the device
    diffusion_loop(head, schedule, packed, cond) -> latents (b, width)
        packed (b, width + 1) float32: each row's starting noise, then its cfg scale;
        cond (2b, H): the rows' positive conditions, then their negative ones

Inside the loop there is no host sync, no shape that depends on a value and no Python
branch on a tensor: the sub-steps are unrolled from the Schedule's numbers. What does
not depend on the latent is done once per call instead of once per sub-step: the
condition's projection, and every layer's adaLN modulation for all sub-steps (one
matmul per layer over (steps, 2b) rows).

The numbers equal diffusers' DPMSolverMultistepScheduler.step (dpmsolver++, order 2,
midpoint, v_prediction, lower order at the end; other settings are refused): each coefficient is computed with diffusers' own
float32 scalar arithmetic, then applied in the same order to the same dtypes
(tests/test_diffusion_graphs.py compares them step by step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SubStep:
    """One sub-step: x0 = alpha * x - sigma * eps; then, in float32,
    first order:  x = c1 * x - c2 * x0
    second order: x = c1 * x - c2 * x0 - c3 * (k * (x0 - x0_prev))"""

    alpha: float
    sigma: float
    c1: float
    c2: float
    second: bool
    k: float = 0.0
    c3: float = 0.0


def _supported(cfg: Any) -> None:
    wanted = {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "thresholding": False,
        "use_flow_sigmas": False,
        "prediction_type": "v_prediction",
    }
    for key, value in wanted.items():
        if getattr(cfg, key, value) != value:
            raise ValueError(f"the step engine's diffusion loop needs {key}={value!r}")


def sub_steps(scheduler: Any, steps: int) -> tuple[list[SubStep], torch.Tensor]:
    """The coefficients of each sub-step and the timesteps, from a diffusers
    DPMSolverMultistepScheduler or noise_schedule.CosineDPMSolver (a copy of it is set
    to `steps`)."""
    import copy

    sched = copy.deepcopy(scheduler)
    cfg = sched.config
    _supported(cfg)
    sched.set_timesteps(num_inference_steps=steps)
    sigmas = sched.sigmas  # float32, on the host
    n = len(sched.timesteps)
    out = []
    for i in range(n):
        alpha_s0, sigma_s0 = sched._sigma_to_alpha_sigma_t(sigmas[i])
        alpha, sigma = alpha_s0, sigma_s0  # v_prediction: x0 = alpha * x - sigma * v
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        c1 = sigma_t / sigma_s0
        c2 = alpha_t * (torch.exp(-h) - 1.0)
        final = i == n - 1 and (
            cfg.euler_at_final
            or (cfg.lower_order_final and n < 15)
            or cfg.final_sigmas_type == "zero"
        )
        if i == 0 or final:
            out.append(SubStep(float(alpha), float(sigma), float(c1), float(c2), False))
            continue
        alpha_s1, sigma_s1 = sched._sigma_to_alpha_sigma_t(sigmas[i - 1])
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        r0 = (lambda_s0 - lambda_s1) / h
        k = 1.0 / r0
        c3 = 0.5 * c2
        out.append(
            SubStep(float(alpha), float(sigma), float(c1), float(c2), True, float(k), float(c3))
        )
    return out, sched.timesteps


class Schedule:
    """Everything of a step count that no row changes: the sub-steps' coefficients and
    the timestep embeddings, made once and kept on the device."""

    def __init__(self, head: Any, scheduler: Any, steps: int, device: Any, dtype: Any):
        self.steps = steps
        self.sub, timesteps = sub_steps(scheduler, steps)
        with torch.no_grad():
            t = timesteps.to(device=device, dtype=dtype)  # the head sees them in its dtype
            emb = head.timestep_embedding(t).to(dtype)
            self.t_emb = head.timestep_proj(emb)  # (steps, H)


def modulations(head: Any, schedule: Schedule, cond: torch.Tensor):
    """Every adaLN layer's (shift, 1 + scale, gate) and the final layer's (shift,
    1 + scale), for all sub-steps at once: each (steps, 2b, H)."""
    c = head.cond_proj(cond)
    ct = c[None] + schedule.t_emb[:, None]
    layers = []
    for layer in head.layers:
        shift, scale, gate = layer.linear(layer.act_fn(ct)).chunk(3, dim=-1)
        layers.append((shift, 1 + scale, gate))
    final = head.final_layer
    shift, scale = final.linear_1(final.act_fn(ct)).chunk(2, dim=-1)
    return layers, (shift, 1 + scale)


def head_eps(head: Any, x: torch.Tensor, layers, final_mod, i: int) -> torch.Tensor:
    """The head's prediction at sub-step i for (2b, width) latents, from the
    precomputed modulations (transformers' VibeVoiceDiffusionHead, unrolled)."""
    h = head.noisy_images_proj(x)
    for layer, (shift, scale1, gate) in zip(head.layers, layers, strict=True):
        modulated = torch.addcmul(shift[i], layer.norm(h), scale1[i])
        h = torch.addcmul(h, gate[i], layer.ffn(modulated))
    final = head.final_layer
    normed = F.rms_norm(h, (h.shape[-1],), eps=final.rms_norm_eps)
    return final.linear_2(torch.addcmul(final_mod[0][i], normed, final_mod[1][i]))


def diffusion_loop(
    head: Any, schedule: Schedule, packed: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """Latents (b, width) of b rows: classifier-free guidance with each row's own scale,
    from each row's own starting noise (see the module docstring)."""
    b = packed.shape[0]
    width = packed.shape[1] - 1
    dtype = cond.dtype
    latent = packed[:, :width].to(dtype)
    scale = packed[:, width:]  # float32 (b, 1): microsoft multiplies by a Python float
    layers, final_mod = modulations(head, schedule, cond)
    previous = None
    for i, s in enumerate(schedule.sub):
        eps = head_eps(head, latent.repeat(2, 1), layers, final_mod, i)
        cond_eps, uncond_eps = eps[:b], eps[b:]
        guided = uncond_eps + (scale * (cond_eps - uncond_eps)).to(dtype)
        x0 = s.alpha * latent - s.sigma * guided
        sample = latent.to(torch.float32)
        if s.second:
            prev = s.c1 * sample - s.c2 * x0 - s.c3 * (s.k * (x0 - previous))
        else:
            prev = s.c1 * sample - s.c2 * x0
        previous = x0
        latent = prev.to(dtype)
    return latent
