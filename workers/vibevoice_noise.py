"""Per-row diffusion noise: a request's audio depends on its own seed, not on
the requests it happens to share a batch with.

transformers' VibeVoice draws each step's diffusion noise for the whole batch
from the global RNG, so row i's noise is whatever slice of one stream lands at
position i. Then the same seed gives other audio in another batch, and a
request replayed after a worker died (DESIGN.md: same seed, skip what was
sent) would not line up with what the listener already heard.

RowNoise wraps two generation methods on one model instance:
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


class RowNoise:
    def __init__(self, model: Any):
        self.model = model
        self.generators: list | None = None
        self.mask = None
        self.installed = False

    def install(self) -> bool:
        m = self.model
        if not (hasattr(m, "_step_negative_branch") and hasattr(m, "_sample_audio_latent")):
            return False
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

    def start(self, seeds: Sequence[int]) -> None:
        """Give each row of the next generate call its own noise stream."""
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.mask = None

    def stop(self) -> None:
        self.generators, self.mask = None, None

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
