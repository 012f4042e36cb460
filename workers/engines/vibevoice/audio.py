"""From hidden states to audio, for the rows that speak in a step (step engine).

    diffuse(rows, positive, negative) -> latents   the diffusion head with classifier-
        free guidance, batched over the speaking rows and grouped by step count (one
        DPM-Solver schedule per group); each row its own cfg scale and its own noise,
        drawn from its own generator, so a row's latents never depend on its mates
    decode(slots, latents) -> audio, next embeds, feedback   the streaming acoustic decode and
        semantic re-encode of those rows alone, each on its own conv caches
        (caches.StreamSlots), then the connectors that make the next LM input
    HandOff: each step's audio on its way to the host (asynchronous on CUDA)

Opt-in, off by default and not measured yet (no GPU was lent when it was written):
`head_compile` compiles the diffusion head with torch.compile in that mode;
"reduce-overhead" captures CUDA graphs, one per row count met.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from workers.engines.vibevoice.caches import StreamSlots, learn_shapes, to_device

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
        # what a speech step feeds back, kept in its history: latent + semantic features
        self.feedback_width = self.width + int(sem.latents.shape[-1])
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
        """A fresh DPM-Solver for `steps` sub-steps: a copy of one set up once per step
        count (timesteps on the device; its first index given, so that no step looks
        it up with nonzero().item(), a host sync)."""
        if steps not in self.schedulers:
            sched = copy.deepcopy(self.base_scheduler)
            sched.set_timesteps(num_inference_steps=steps, device=self.device)
            sched.set_begin_index(0)
            self.schedulers[steps] = sched
        return copy.deepcopy(self.schedulers[steps])

    def diffuse(self, rows: list, pos_cond: torch.Tensor, neg_cond: torch.Tensor):
        """Latents (n, 1, width) for the speaking rows, in their order."""
        out = torch.empty(len(rows), self.width, device=self.device, dtype=pos_cond.dtype)
        groups: dict[int, list[int]] = {}
        for k, row in enumerate(rows):
            groups.setdefault(row.request.inference_steps, []).append(k)
        for steps, members in groups.items():
            sel = to_device(members, self.device)
            n = len(members)
            cond = torch.cat([pos_cond[sel], neg_cond[sel]])
            noise = [torch.randn(self.width, generator=rows[k].state.generator) for k in members]
            x = to_device(torch.stack(noise), self.device).to(cond.dtype)
            # float32 even in a bf16 model (1.3 would be 1.296875): microsoft multiplies by a
            # Python float, which the kernel applies at float32 precision
            scale = [[float(rows[k].request.cfg_scale)] for k in members]
            scale = to_device(scale, self.device, torch.float32)
            sched = self._scheduler(steps)
            latent = torch.cat([x, x])
            for t in sched.timesteps:
                both = torch.cat([latent[:n], latent[:n]])
                eps = self.head(both, t.repeat(2 * n).to(both), condition=cond)
                cond_eps, uncond_eps = torch.split(eps, n)
                guided = uncond_eps + (scale * (cond_eps - uncond_eps)).to(cond_eps.dtype)
                latent = sched.step(torch.cat([guided, guided]), t, latent).prev_sample
            out[sel] = latent[:n]
        return out[:, None]

    def decode(self, slots: list[int], latents: torch.Tensor):
        """(audio (n, 1, hop), next embeddings (n, 1, H), feedback (n, width + semantic))
        of the speaking rows: the feedback is what their history keeps."""
        m = self.model.model
        idx = to_device(slots, self.device)
        scaled = latents / m.latent_scaling_factor - m.latent_bias_factor
        cache = self.acoustic.gather(idx)
        audio = m.audio_tower.decode(scaled, padding_cache=cache, use_cache=True).audio
        self.acoustic.scatter(idx, cache)
        cache = self.semantic.gather(idx)
        sem = m.semantic_tokenizer_encoder(audio, padding_cache=cache, use_cache=True).latents
        self.semantic.scatter(idx, cache)
        embeds = m.multi_modal_projector(latents) + m.semantic_connector(sem)
        return audio, embeds, torch.cat([latents[:, 0], sem[:, 0]], dim=-1)


class HandOff:
    """Each step's audio on its way to its rows. On CUDA it goes to the host with a
    non-blocking copy into pinned memory and reaches its rows after the next step's one
    host sync (the tokens), or at once when a row is about to end; on CPU at once.

        hold(rows, audio, sink)       the speaking rows' new audio (rows, samples)
        hand_over(sink, wait=False)   give what is on the host to its rows
    """

    def __init__(self, device: str):
        self.async_copy = device.startswith("cuda")
        # (rows, pcm and feedback side by side, copy event, (step, noise) per row,
        # feedback width)
        self.held: list[tuple[list, torch.Tensor, Any, list, int]] = []

    def hold(self, rows: list, audio: torch.Tensor, sink: Any, fed: Any = None) -> None:
        """`fed`: the rows' feedback (rows, width), for their history (engines/trail.py),
        with the generator's state at the speech steps resume.NOISE_EVERY chooses."""
        from workers.engines.vibevoice.resume import noise_state

        marks = []
        for row in rows:
            row.audio_tokens += 1  # counted now (a row's budget), its samples follow
            marks.append((row.steps - 1, noise_state(row)))
        pcm = audio.float()
        both = pcm if fed is None else torch.cat([pcm, fed.float()], dim=1)
        width = 0 if fed is None else int(fed.shape[1])
        if not self.async_copy:
            self.held.append((rows, both, None, marks, width))
            self.hand_over(sink)
            return
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.held.append((rows, host, event, marks, width))

    def hand_over(self, sink: Any, wait: bool = False) -> None:
        """A row closed since (cancelled) gets none. Without `wait`, nothing moves until
        every copy is done (after the step's sync it is)."""
        if not wait and not all(e is None or e.query() for _, _, e, _, _ in self.held):
            return
        for rows, both, event, marks, width in self.held:
            if event is not None:
                event.synchronize()
            arr = both.numpy()
            hop = arr.shape[1] - width
            for k, row in enumerate(rows):
                if row.closed:
                    continue
                if row.trail is not None and width:
                    step, noise = marks[k]
                    row.trail.feedback(step, arr[k, hop:], noise)
                row.add_audio(arr[k, :hop], sink, counted=True)
        self.held = []
