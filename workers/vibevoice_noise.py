"""Per-row noise: a request's audio depends on its own seed, not on the requests
it happens to share a batch with.

Every random draw of a row comes from that row's own torch.Generator, seeded
with the request's seed, in this order: first the noise on its voice latents
(prefill), then each diffusion step's starting noise. `row_generators(seeds)`
makes them; `add_voice_noise` and `RowNoise._sample` draw from them. The step
engine uses the same two functions, so a row sounds the same on both paths.

Voice latents: the acoustic tokenizer is a sigma-VAE. microsoft's
`encode(...).sample("gaussian")` and transformers' `encode(sample=True)` add,
per voice sample, `vae_std * n * N(0, I)` with one scalar n ~ N(0, 1), where
vae_std = fix_std / 0.8 (0.625), drawn from the global RNG for the whole
batch. add_voice_noise draws the same quantity from the owning row's
generator, over the voice's own tokens only, so neither the batch mates nor
the padding length changes it.

transformers' VibeVoice draws each step's diffusion noise for the whole batch
from the global RNG, so row i's noise is whatever slice of one stream lands at
position i. Then the same seed gives other audio in another batch, and a
request replayed after a worker died (DESIGN.md: same seed, skip what was
sent) would not line up with what the listener already heard.

RowNoise wraps three methods on one model instance:
  `model.model.audio_tower.encode(...)`  -> encodes without sampling, then adds
         each voice's noise from its row's generator (add_voice_noise)
  `_step_negative_branch(diffusion_mask, ...)`  -> remembers which rows diffuse
  `_sample_audio_latent(pos, neg, scheduler, steps, guidance)`
      -> the same DPM loop with classifier-free guidance, its starting noise
         drawn row by row from each row's own torch.Generator (seeded with the
         request's seed), so a row's noise sequence is its own.
Where the installed transformers lacks either method, nothing is wrapped and
`install()` returns False: the batch then shares one seed, as before.
"""

from __future__ import annotations

from typing import Any, Sequence


def row_generators(seeds: Sequence[int]) -> list:
    """One CPU torch.Generator per row, seeded with the row's seed."""
    import torch

    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def add_voice_noise(
    latents: Any,
    voice_rows: Sequence[int],
    voice_tokens: Sequence[int],
    generators: Sequence[Any],
    vae_std: float,
) -> Any:
    """The sampled voice latents: `latents` (voices, T, D), encoded without sampling,
    plus for voice k `vae_std * n * N(0, I)` over its first voice_tokens[k] positions,
    n and the N(0, I) block drawn (in that order) from generators[voice_rows[k]]."""
    import torch

    out = latents.clone()
    width = latents.shape[-1]
    for k, row in enumerate(voice_rows):
        g = generators[row]
        t = min(int(voice_tokens[k]), latents.shape[1])
        scale = vae_std * torch.randn((), generator=g)
        noise = torch.randn(t, width, generator=g)
        out[k, :t] += (scale * noise).to(device=out.device, dtype=out.dtype)
    return out


class RowNoise:
    def __init__(self, model: Any):
        self.model = model
        self.generators: list | None = None
        self.mask = None
        self.voices: tuple[list[int], list[int]] | None = None  # rows, tokens of each voice
        self.installed = False

    def install(self) -> bool:
        m = self.model
        if not (hasattr(m, "_step_negative_branch") and hasattr(m, "_sample_audio_latent")):
            return False
        tower = m.model.audio_tower
        encode = tower.encode
        vae_std = float(getattr(tower.config, "vae_std", 0.625))

        def encode_per_row(input_values, padding_cache=None, use_cache=None, sample=True):
            out = encode(
                input_values, padding_cache=padding_cache, use_cache=use_cache, sample=False
            )
            if sample:
                if self.generators is None or self.voices is None:
                    raise RuntimeError("voice latents sampled outside a RowNoise.start() call")
                rows, tokens = self.voices
                out.latents = add_voice_noise(out.latents, rows, tokens, self.generators, vae_std)
            return out

        tower.encode = encode_per_row
        step_negative = m._step_negative_branch
        sample_latent = m._sample_audio_latent

        def remember_mask(diffusion_mask, *args, **kwargs):
            self.mask = diffusion_mask
            return step_negative(diffusion_mask, *args, **kwargs)

        def sample(positive, negative, scheduler, num_steps, guidance_scale):
            if self.generators is None or self.mask is None:
                return sample_latent(positive, negative, scheduler, num_steps, guidance_scale)
            return self._sample(positive, negative, scheduler, num_steps, guidance_scale)

        m._step_negative_branch = remember_mask
        m._sample_audio_latent = sample
        self.installed = True
        return True

    def start(
        self,
        seeds: Sequence[int],
        voice_rows: Sequence[int] = (),
        voice_tokens: Sequence[int] = (),
    ) -> None:
        """Give each row of the next generate call its own noise stream; voice k of the
        prompt belongs to row voice_rows[k] and fills voice_tokens[k] placeholders."""
        self.generators = row_generators(seeds)
        self.voices = (list(voice_rows), list(voice_tokens))
        self.mask = None

    def stop(self) -> None:
        self.generators, self.mask, self.voices = None, None, None

    def _sample(self, positive, negative, scheduler, num_steps: int, guidance_scale: float):
        import torch

        head = self.model.model.diffusion_head
        device = next(head.parameters()).device
        condition = torch.cat([positive, negative], dim=0).to(device)
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
