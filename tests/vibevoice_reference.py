"""transformers' own `generate`, adjusted to microsoft's loop: the reference each
row of the step engine must match (tests only; the product never calls generate).

Adjustments, each where transformers' loop and microsoft's differ (FACTS.md):
- the text-level CFG pass transformers adds when guidance != 1 is dropped
  (microsoft guides the diffusion head only): `drop_text_cfg`;
- every random draw comes from the row's own generator, in microsoft's order
  (voice-latent noise at prefill, then each diffusion's starting noise):
  `RowNoise` wraps the three methods that draw;
- a row runs ALONE (batch 1), where transformers' loop moves a row's stream
  caches and negative branch exactly when that row acts, as microsoft's does.
The speech_end cache reset of microsoft's loop never fires on the tiny model
(its sequence_bias always picks the audio token), so it needs no adjustment here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from workers.engines.vibevoice.noise import add_voice_noise, row_generators
from workers.engines.vibevoice.prompt import build_inputs
from workers.wire.messages import Request


def drop_text_cfg(model: Any) -> None:
    """Remove the UnbatchedClassifierFreeGuidanceLogitsProcessor (a second LM pass per
    step that re-weights token choice) that generate adds when guidance != 1."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        UnbatchedClassifierFreeGuidanceLogitsProcessor,
    )

    build = model._get_logits_processor

    def without_text_cfg(*args: Any, **kwargs: Any) -> Any:
        procs = build(*args, **kwargs)
        kept = [
            p for p in procs if not isinstance(p, UnbatchedClassifierFreeGuidanceLogitsProcessor)
        ]
        return LogitsProcessorList(kept)

    model._get_logits_processor = without_text_cfg


class RowNoise:
    """Per-row noise inside transformers' generate: voice latents and diffusion noise
    drawn from each row's generator."""

    def __init__(self, model: Any):
        self.model = model
        self.generators: list | None = None
        self.mask = None
        self.voices: tuple[list[int], list[int]] = ([], [])
        m = model
        tower = m.model.audio_tower
        encode = tower.encode
        vae_std = float(getattr(tower.config, "vae_std", 0.625))

        def encode_per_row(input_values, padding_cache=None, use_cache=None, sample=True):
            out = encode(
                input_values, padding_cache=padding_cache, use_cache=use_cache, sample=False
            )
            if sample:
                rows, tokens = self.voices
                out.latents = add_voice_noise(out.latents, rows, tokens, self.generators, vae_std)
            return out

        tower.encode = encode_per_row
        step_negative = m._step_negative_branch

        def remember_mask(diffusion_mask, *args, **kwargs):
            self.mask = diffusion_mask
            return step_negative(diffusion_mask, *args, **kwargs)

        m._step_negative_branch = remember_mask
        m._sample_audio_latent = self._sample

    def start(self, seeds: Sequence[int], voice_rows=(), voice_tokens=()) -> None:
        self.generators = row_generators(seeds)
        self.voices = (list(voice_rows), list(voice_tokens))
        self.mask = None

    def _sample(self, positive, negative, scheduler, num_steps: int, guidance_scale: float):
        head = self.model.model.diffusion_head
        condition = torch.cat([positive, negative], dim=0)
        rows = self.mask.nonzero(as_tuple=False).view(-1).tolist()
        width = self.model.config.audio_config.hidden_size
        start = torch.stack([torch.randn(width, generator=self.generators[r]) for r in rows])
        start = start.to(condition)
        half = len(rows)
        latent = torch.cat([start, start], dim=0)
        scheduler.set_timesteps(num_inference_steps=num_steps)
        for t in scheduler.timesteps:
            both = torch.cat([latent[:half], latent[:half]], dim=0)
            eps = head(both, t.repeat(both.shape[0]).to(both), condition=condition)
            cond_eps, uncond_eps = torch.split(eps, half, dim=0)
            guided = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            latent = scheduler.step(torch.cat([guided, guided], dim=0), t, latent).prev_sample
        return latent[:half].unsqueeze(1)


class Reference:
    """A second copy of the model that only runs transformers' generate, one row at a time."""

    def __init__(self, model_dir: str):
        from transformers import VibeVoiceForConditionalGeneration, VibeVoiceProcessor

        self.processor = VibeVoiceProcessor.from_pretrained(model_dir)
        self.model = VibeVoiceForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation={"text_config": "sdpa"}
        ).eval()
        drop_text_cfg(self.model)
        self.noise = RowNoise(self.model)

    def audio(self, req: Request, audio_tokens: int) -> np.ndarray:
        """The row's audio alone: `audio_tokens` tokens (the tiny model always speaks)."""
        prompt = build_inputs(self.processor, [req], dtype=self.model.dtype)
        self.noise.start([req.seed], prompt.voice_rows, prompt.voice_tokens)
        with torch.no_grad():
            out = self.model.generate(
                **prompt.inputs,
                max_new_tokens=audio_tokens,
                num_diffusion_steps=req.inference_steps,
                guidance_scale=req.cfg_scale,
            )
        return out[0].reshape(-1).float().numpy()
