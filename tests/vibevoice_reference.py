"""transformers' own `generate`, adjusted to microsoft's loop: the reference each
row of the step engine must match (tests only; the product never calls generate).

Adjustments, each where transformers' loop and microsoft's differ:
- the text-level CFG pass transformers adds when guidance != 1 is dropped
  (microsoft guides the diffusion head only): `drop_text_cfg`;
- every random draw comes from the row's own generator, in microsoft's order
  (voice-latent noise at prefill, then each diffusion's starting noise):
  `RowNoise` wraps the three methods that draw;
- a row runs ALONE (batch 1), where transformers' loop moves a row's stream
  caches and negative branch exactly when that row acts, as microsoft's does;
- speech_end zeroes the row's acoustic and semantic stream caches, as microsoft's
  `set_to_zero` does (transformers' loop never does): `RowNoise.zero_caches`.
The tiny model never picks speech_end, speech_start or EOS itself (its sequence_bias
always picks the audio token): `Reference.forced` forces a token path, step by step.
transformers 5.25's speech_start reset is microsoft's mask logic (every negative
column masked but the one of the next token). Its negative positions run on from the
cache length instead of restarting at 0; RoPE makes attention depend only on
relative positions, so that changes nothing beyond float rounding.
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
        self.conditions: list[tuple[torch.Tensor, torch.Tensor]] = []  # per diffusion
        self.zero_caches = False  # set at speech_end: zero the stream caches before use
        decode = m._decode_audio_latent

        def decode_fresh(latent, mask, batch_size, acoustic_cache):
            if self.zero_caches and acoustic_cache is not None:
                for layer in acoustic_cache.layers.values():
                    layer.cache.zero_()
            return decode(latent, mask, batch_size, acoustic_cache)

        m._decode_audio_latent = decode_fresh
        semantic = m.model.semantic_tokenizer_encoder
        encode_semantic = semantic.forward

        def semantic_fresh(audio, padding_cache=None, **kwargs):
            if self.zero_caches and padding_cache is not None:
                for layer in padding_cache.layers.values():
                    layer.cache.zero_()
            self.zero_caches = False
            return encode_semantic(audio, padding_cache=padding_cache, **kwargs)

        semantic.forward = semantic_fresh

    def start(self, seeds: Sequence[int], voice_rows=(), voice_tokens=()) -> None:
        self.generators = row_generators(seeds)
        self.voices = (list(voice_rows), list(voice_tokens))
        self.mask = None
        self.conditions = []
        self.zero_caches = False

    def _sample(self, positive, negative, scheduler, num_steps: int, guidance_scale: float):
        head = self.model.model.diffusion_head
        self.conditions.append((positive.clone(), negative.clone()))
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
        self.plan: ForcedTokens | None = None
        build = self.model._get_logits_processor

        def with_plan(*args: Any, **kwargs: Any) -> Any:
            procs = build(*args, **kwargs)
            if self.plan is not None:
                procs.append(self.plan)
            return procs

        self.model._get_logits_processor = with_plan

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

    def forced(
        self, req: Request, max_new_tokens: int, plan: dict[int, int]
    ) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The row alone along a forced token path: `plan` maps a step (0-based) to the
        token drawn there; other steps draw as the model does. Returns its audio and, per
        diffusion, the (positive, negative) conditions the diffusion head was given."""
        prompt = build_inputs(self.processor, [req], dtype=self.model.dtype)
        self.noise.start([req.seed], prompt.voice_rows, prompt.voice_tokens)
        speech_end = self.model.config.audio_eos_token_id
        self.plan = ForcedTokens(plan, prompt.inputs["input_ids"].shape[1], self.noise, speech_end)
        try:
            with torch.no_grad():
                out = self.model.generate(
                    **prompt.inputs,
                    max_new_tokens=max_new_tokens,
                    num_diffusion_steps=req.inference_steps,
                    guidance_scale=req.cfg_scale,
                )
        finally:
            self.plan = None
        audio = out[0].reshape(-1).float().numpy() if out[0] is not None else np.zeros(0)
        return audio, list(self.noise.conditions)


class ForcedTokens:
    """A logits processor that draws `plan[step]` at the steps it names (batch 1), and
    asks for microsoft's stream cache reset when that token is speech_end."""

    def __init__(self, plan: dict[int, int], prompt_len: int, noise: RowNoise, speech_end: int):
        self.plan, self.prompt_len, self.noise, self.speech_end = (
            plan,
            prompt_len,
            noise,
            speech_end,
        )

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.plan.get(input_ids.shape[1] - self.prompt_len)
        if token is None:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        if token == self.speech_end:
            self.noise.zero_caches = True
        return forced
