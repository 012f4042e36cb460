"""The diffusion schedule without diffusers (workers/engines/vibevoice/noise_schedule.py):
its numbers are diffusers' own for the scheduler VibeVoice checkpoints ship with, any
other scheduler is still built by diffusers, and a worker that loads the tiny model and
serves a request never imports diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workers.engines.vibevoice.diffusion import sub_steps
from workers.engines.vibevoice.noise_schedule import CosineDPMSolver, covered, noise_scheduler

ROOT = Path(__file__).resolve().parents[1]


def _diffusers(**config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**config)


@pytest.mark.parametrize("train_steps", [1000, 500])
def test_the_schedule_is_diffusers_own_bit_for_bit(train_steps):
    want = _diffusers(
        num_train_timesteps=train_steps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
    )
    got = CosineDPMSolver(train_steps)
    assert torch.equal(got.alphas_cumprod, want.alphas_cumprod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # diffusers' numpy warning
        for steps in range(1, 101):
            subs_want, t_want = sub_steps(want, steps)
            subs_got, t_got = sub_steps(got, steps)
            assert subs_got == subs_want, steps
            assert t_got.dtype == t_want.dtype and torch.equal(t_got, t_want), steps


def _model(scheduler_class=None, scheduler_config=None):
    """What noise_scheduler reads of a model: its generation config, and transformers'
    builder of the diffusers scheduler."""
    gen = SimpleNamespace()
    if scheduler_class is not None:
        gen.noise_scheduler_class = scheduler_class
    if scheduler_config is not None:
        gen.noise_scheduler_config = scheduler_config

    def build(generation_config):
        from transformers import VibeVoiceForConditionalGeneration

        return VibeVoiceForConditionalGeneration._build_default_noise_scheduler(generation_config)

    return SimpleNamespace(generation_config=gen, _build_default_noise_scheduler=build)


def test_the_shipped_configurations_are_computed_here():
    tiny = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
    tiny["prediction_type"] = "v_prediction"
    for model in (
        _model(),  # transformers' default: no scheduler named
        _model("DPMSolverMultistepScheduler", tiny),  # the tiny model's, the converter's
        _model("DPMSolverMultistepScheduler", {**tiny, "solver_order": 2, "steps_offset": 0}),
    ):
        assert isinstance(noise_scheduler(model), CosineDPMSolver)
    assert (
        noise_scheduler(
            _model(scheduler_config={**tiny, "num_train_timesteps": 600})
        ).config.num_train_timesteps
        == 600
    )


@pytest.mark.parametrize(
    "name, change",
    [
        ("DPMSolverMultistepScheduler", {"prediction_type": "epsilon"}),
        ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1}),
        ("DPMSolverMultistepScheduler", {"beta_schedule": "linear"}),
        ("DPMSolverMultistepScheduler", {"num_train_timesteps": True}),
        ("DPMSolverMultistepScheduler", {"flow_shift": 1}),  # an int: left to diffusers
        ("DDPMScheduler", {}),
    ],
)
def test_any_other_scheduler_is_built_by_diffusers(name, change):
    config = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", **change}
    assert not covered(name, config)
    built = noise_scheduler(_model(name, config))
    assert type(built).__module__.startswith("diffusers.")
    assert type(built).__name__ == name


CHILD = """
import json, sys
from workers.engines.contract import EngineSpec
from workers.engines.vibevoice.engine import VibeVoiceEngine
sys.path.insert(0, "tests")
from test_step_engine import drive, req

engine = VibeVoiceEngine(EngineSpec(engine="vibevoice", model_path=sys.argv[1], torch_threads=1))
engine.load()
loaded = "diffusers" in sys.modules
done = drive(engine, {0: [req("a", seed=3, est_audio_s=0.5)]})
print(json.dumps({"after_load": loaded, "after_request": "diffusers" in sys.modules,
                  "audio": len(done.pcm("a"))}))
"""


def test_a_new_worker_process_loads_and_serves_without_importing_diffusers(tiny_model_dir):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, tiny_model_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["audio"] > 0
    assert report == {**report, "after_load": False, "after_request": False}
