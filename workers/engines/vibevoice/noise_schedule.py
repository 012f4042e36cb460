"""The diffusion schedule's numbers without importing diffusers, for the scheduler
VibeVoice checkpoints ship with.

A checkpoint's generation config names its noise scheduler (`noise_scheduler_class`,
`noise_scheduler_config`); transformers builds it from diffusers, and importing diffusers
costs a worker 0.2-0.3 s at every start (its import scans every installed package's
metadata), and on a CUDA build it asks torch for the accelerator, so the zygote cannot
preload it (workers/zygote/model.py). The step engine reads only a schedule's numbers
from the scheduler (diffusion.sub_steps: its config, set_timesteps, sigmas, timesteps and
the sigma-to-(alpha, sigma) conversion), so for the one configuration every VibeVoice
checkpoint uses (DPMSolverMultistepScheduler, squaredcos_cap_v2 betas, v_prediction, every
other setting at diffusers' default; any num_train_timesteps) `CosineDPMSolver` computes
them here, with diffusers' own operations in the same dtypes, so the numbers are
bit-identical (tests/test_noise_schedule.py compares them for 1-100 steps). Any other
scheduler or setting is built by diffusers, as transformers does.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

SCHEDULER = "DPMSolverMultistepScheduler"
# transformers' default when a generation config names no scheduler config
DEFAULT_CONFIG = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
# DPMSolverMultistepScheduler's defaults, as the settings CosineDPMSolver assumes (the
# schedule's own: beta_schedule, prediction_type; beta_start/end are not read by a cosine
# schedule, but another value is left to diffusers all the same)
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "squaredcos_cap_v2",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "v_prediction",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}


def covered(scheduler_class: str, config: dict) -> bool:
    """Whether CosineDPMSolver gives this scheduler's numbers."""
    if scheduler_class != SCHEDULER or not isinstance(config, dict):
        return False
    for key, value in config.items():
        if key == "num_train_timesteps":
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 1):
                return False
        elif key not in DEFAULTS or type(value) is not type(DEFAULTS[key]):
            return False
        elif value != DEFAULTS[key]:
            return False
    return True


class CosineDPMSolver:
    """The numbers of diffusers' DPMSolverMultistepScheduler(beta_schedule=
    "squaredcos_cap_v2", prediction_type="v_prediction") that diffusion.sub_steps reads,
    computed as diffusers computes them (its __init__, set_timesteps with linspace
    spacing and final sigma zero, _sigma_to_alpha_sigma_t)."""

    def __init__(self, num_train_timesteps: int = 1000):
        self.config = SimpleNamespace(**{**DEFAULTS, "num_train_timesteps": num_train_timesteps})
        n = num_train_timesteps

        def alpha_bar(t: float) -> float:  # the Glide cosine schedule
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        alphas = 1.0 - torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        # lambda_min_clipped is -inf: no timestep is clipped, the last one is n
        n = self.config.num_train_timesteps
        timesteps = (
            np.linspace(0, n - 1, num_inference_steps + 1)
            .round()[::-1][:-1]
            .copy()
            .astype(np.int64)
        )
        acp = self.alphas_cumprod
        sigmas = (((1 - acp) / acp) ** 0.5).numpy()  # diffusers: np.array() of it
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)  # final_sigmas_type zero
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(dtype=torch.int64)

    @staticmethod
    def _sigma_to_alpha_sigma_t(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t


def noise_scheduler(model: Any) -> Any:
    """The scheduler whose numbers the step engine uses: CosineDPMSolver where it gives
    diffusers' numbers, else the diffusers scheduler transformers builds."""
    gen = model.generation_config
    name = getattr(gen, "noise_scheduler_class", SCHEDULER)
    config = getattr(gen, "noise_scheduler_config", DEFAULT_CONFIG)
    if covered(name, config):
        return CosineDPMSolver(config.get("num_train_timesteps", 1000))
    return model._build_default_noise_scheduler(gen)
