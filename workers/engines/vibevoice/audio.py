"""From hidden states to audio, for the rows that speak in a step (step engine).

    diffuse(rows, positive, negative) -> latents   the diffusion head with classifier-
        free guidance, batched over the speaking rows and grouped by step count (one
        DPM-Solver schedule per group); each row its own cfg scale and its own noise,
        drawn from its own generator, so a row's latents never depend on its mates
    decode(slots, latents) -> audio, next embeds   the streaming acoustic decode and
        semantic re-encode of those rows alone, each on its own conv caches
        (caches.StreamSlots), then the connectors that make the next LM input

Opt-in, off by default and not measured yet (no GPU was lent when it was written):
`head_compile` compiles the diffusion head with torch.compile in that mode;
"reduce-overhead" captures CUDA graphs, one per row count met.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from workers.engines.vibevoice.caches import StreamSlots, learn_shapes

HEAD_COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")


class Speech:
    def __init__(self, model: Any, device: str, slots: int, head_compile: str = ""):
        if head_compile not in HEAD_COMPILE_MODES:
            raise ValueError(f"head_compile must be one of {HEAD_COMPILE_MODES}")
        self.model = model
        self.device = device
        self.width = model.config.audio_config.hidden_size
        self.base_scheduler = model._build_default_noise_scheduler(model.generation_config)
        self.schedulers: dict[int, Any] = {}
        head = model.model.diffusion_head
        self.head = torch.compile(head, mode=head_compile) if head_compile else head
        self.acoustic, self.semantic = self._stream_slots(slots)

    def _stream_slots(self, slots: int) -> tuple[StreamSlots, StreamSlots]:
        """Learn the streaming conv caches' shapes from one silent call, then allocate a
        slot per possible row."""
        m = self.model.model
        dtype = self.model.dtype
        with torch.no_grad():
            zero = torch.zeros(1, 1, self.width, device=self.device, dtype=dtype)
            out = m.audio_tower.decode(zero, padding_cache=None, use_cache=True)
            sem = m.semantic_tokenizer_encoder(out.audio, padding_cache=None, use_cache=True)
        return (
            StreamSlots(learn_shapes(out.padding_cache), slots, self.device, dtype),
            StreamSlots(learn_shapes(sem.padding_cache), slots, self.device, dtype),
        )

    def zero(self, slots: torch.Tensor) -> None:
        """Fresh stream caches: a joining row, or speech_end (microsoft's loop)."""
        self.acoustic.zero(slots)
        self.semantic.zero(slots)

    def bytes_per_slot(self) -> int:
        return self.acoustic.bytes_per_slot() + self.semantic.bytes_per_slot()

    def _scheduler(self, steps: int) -> Any:
        if steps not in self.schedulers:
            self.schedulers[steps] = copy.deepcopy(self.base_scheduler)
        return self.schedulers[steps]

    def diffuse(self, rows: list, pos_cond: torch.Tensor, neg_cond: torch.Tensor):
        """Latents (n, 1, width) for the speaking rows, in their order."""
        out = torch.empty(len(rows), self.width, device=self.device, dtype=pos_cond.dtype)
        groups: dict[int, list[int]] = {}
        for k, row in enumerate(rows):
            groups.setdefault(row.request.inference_steps, []).append(k)
        for steps, members in groups.items():
            sel = torch.tensor(members, device=self.device)
            n = len(members)
            cond = torch.cat([pos_cond[sel], neg_cond[sel]])
            noise = [torch.randn(self.width, generator=rows[k].state.generator) for k in members]
            x = torch.stack(noise).to(cond)
            scale = torch.tensor([[rows[k].request.cfg_scale] for k in members]).to(cond)
            sched = self._scheduler(steps)
            sched.set_timesteps(num_inference_steps=steps)
            latent = torch.cat([x, x])
            for t in sched.timesteps:
                both = torch.cat([latent[:n], latent[:n]])
                eps = self.head(both, t.repeat(2 * n).to(both), condition=cond)
                cond_eps, uncond_eps = torch.split(eps, n)
                guided = uncond_eps + scale * (cond_eps - uncond_eps)
                latent = sched.step(torch.cat([guided, guided]), t, latent).prev_sample
            out[sel] = latent[:n]
        return out[:, None]

    def decode(self, slots: list[int], latents: torch.Tensor):
        """(audio (n, 1, hop), next embeddings (n, 1, H)) of the speaking rows."""
        m = self.model.model
        idx = torch.tensor(slots, device=self.device)
        scaled = latents / m.latent_scaling_factor - m.latent_bias_factor
        cache = self.acoustic.gather(idx)
        audio = m.audio_tower.decode(scaled, padding_cache=cache, use_cache=True).audio
        self.acoustic.scatter(idx, cache)
        cache = self.semantic.gather(idx)
        sem = m.semantic_tokenizer_encoder(audio, padding_cache=cache, use_cache=True).latents
        self.semantic.scatter(idx, cache)
        return audio, m.multi_modal_projector(latents) + m.semantic_connector(sem)
