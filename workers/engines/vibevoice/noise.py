"""Per-row noise: a request's audio depends on its own seed, not on the requests
it happens to share a batch with.

Every random draw of a row comes from that row's own torch.Generator, seeded
with the request's seed, in this order: first the noise on its voice latents
(prefill), then each diffusion step's starting noise. `row_generators(seeds)`
makes them; `add_voice_noise` draws the voice noise. The step engine
(workers/engines/vibevoice/step.py) draws the diffusion noise from the same generator, and
the tests' reference (transformers' generate) does the same, so a row sounds the
same on both, alone or in any batch, and a replay after a worker died lines up
with what the listener already heard.

Voice latents: the acoustic tokenizer is a sigma-VAE. microsoft's
`encode(...).sample("gaussian")` and transformers' `encode(sample=True)` add,
per voice sample, `vae_std * n * N(0, I)` with one scalar n ~ N(0, 1), where
vae_std = fix_std / 0.8 (0.625), drawn from the global RNG for the whole
batch. add_voice_noise draws the same quantity from the owning row's
generator, over the voice's own tokens only, so neither the batch mates nor
the padding length changes it.
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
