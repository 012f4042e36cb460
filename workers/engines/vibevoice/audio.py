"""From hidden states to audio, for the rows that speak in a step (step engine).

    diffuse(rows, positive, negative) -> latents   the diffusion head with classifier-
        free guidance, batched over the speaking rows and grouped by step count
        (diffusion.py: one Schedule per step count, made once); each row its own cfg
        scale and its own starting noise, drawn from its own generator, so a row's
        latents never depend on its mates
    decode(slots, latents) -> audio, next embeds, feedback   the streaming acoustic decode and
        semantic re-encode of those rows alone (conv_stacks.run_stack), each conv
        reading and writing its rows' stream slots in place (caches.StreamSlots),
        then the connectors that make the next LM input
    HandOff: each step's audio on its way to the host (asynchronous on CUDA)

engine_mode (a setting): "eager" calls those functions on the k speaking rows;
"graphs" runs them in the smallest row bucket >= k (graphs.py) over static buffers,
on CUDA as captured CUDA graphs (one per bucket, and per step count for the loop),
elsewhere as plain calls on the same buffers; "auto": graphs on CUDA, eager
elsewhere. Each graph's first CHECKED_RUNS runs are compared with an eager call; beyond
the dtype's tolerance the worker logs a warning and goes on in eager mode for good. So
does a capture that raises (an operator CUDA cannot capture, memory), at load or later.

The starting noise is drawn on the host from the row's own CPU generator (the stream of
numbers a row was promised: transformers' generate, replays, rows recorded before),
together with its cfg scale in one small buffer: one copy to the device per step count.

Opt-in, eager mode only, not measured: `head_compile` compiles the diffusion loop with
torch.compile in that mode.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from workers.engines.vibevoice.caches import StreamSlots, learn_shapes, to_device
from workers.engines.vibevoice.conv_stacks import run_stack
from workers.engines.vibevoice.diffusion import Schedule, diffusion_loop
from workers.engines.vibevoice.graphs import (
    Graph,
    Mismatch,
    bucket_for,
    buckets_upto,
    make_graph,
    tolerance,
)
from workers.engines.vibevoice.noise_schedule import noise_scheduler
from workers.engines.vibevoice.receptive import lookback_frames

log = logging.getLogger("vibevoice_pool.worker")

HEAD_COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")
ENGINE_MODES = ("auto", "eager", "graphs", "graphs-lm")
CHECKED_RUNS = 2  # runs of each graph compared with eager before it is trusted


def resolve_mode(engine_mode: str, device: str) -> str:
    if engine_mode not in ENGINE_MODES:
        raise ValueError(f"engine_mode must be one of {ENGINE_MODES}")
    if engine_mode == "auto":
        return "graphs" if str(device).startswith("cuda") else "eager"
    if engine_mode == "graphs-lm":  # the LM's decode captured too: step.py, lm_graph.py
        return "graphs"
    return engine_mode


class Speech:
    def __init__(
        self,
        model: Any,
        device: str,
        slots: int,
        head_compile: str = "",
        engine_mode: str = "auto",
    ):
        if head_compile not in HEAD_COMPILE_MODES:
            raise ValueError(f"head_compile must be one of {HEAD_COMPILE_MODES}")
        self.model = model
        self.device = device
        self.dtype = model.dtype
        self.width = model.config.audio_config.hidden_size
        self.base_scheduler = noise_scheduler(model)  # diffusers only where needed
        self.schedules: dict[int, Schedule] = {}
        self.head = model.model.diffusion_head
        self.mode = resolve_mode(engine_mode, device)
        compile_loop = head_compile and self.mode == "eager"
        self.loop = (
            torch.compile(diffusion_loop, mode=head_compile) if compile_loop else diffusion_loop
        )
        self.acoustic, self.semantic = self._stream_slots(slots)
        # the latents a resumed row runs through both stacks to rebuild their caches
        self.stream_frames = lookback_frames(
            model.model.audio_tower.decoder, model.model.semantic_tokenizer_encoder
        )
        if self.stream_frames is None:
            log.warning("stream window unknown for this model: a resume reruns all its frames")
        self.graphs: dict[tuple, Graph] = {}
        self.checks_left: dict[tuple, int] = {}
        cuda = str(device).startswith("cuda") and self.mode == "graphs"
        self.pool = torch.cuda.graph_pool_handle() if cuda else None

    def _stream_slots(self, slots: int) -> tuple[StreamSlots, StreamSlots]:
        """Learn the streaming conv caches' shapes from one silent call, then allocate a
        slot per possible row (and the scratch slot)."""
        m = self.model.model
        with torch.no_grad():
            zero = torch.zeros(1, 1, self.width, device=self.device, dtype=self.dtype)
            out = m.audio_tower.decode(zero, padding_cache=None, use_cache=True)
            sem = m.semantic_tokenizer_encoder(out.audio, padding_cache=None, use_cache=True)
        # what a speech step feeds back, kept in its history: latent + semantic features
        self.feedback_width = self.width + int(sem.latents.shape[-1])
        return (
            StreamSlots(learn_shapes(out.padding_cache), slots, self.device, self.dtype),
            StreamSlots(learn_shapes(sem.padding_cache), slots, self.device, self.dtype),
        )

    def zero(self, slots: torch.Tensor) -> None:
        """Fresh stream caches: a joining row, or speech_end (microsoft's loop)."""
        self.acoustic.zero(slots)
        self.semantic.zero(slots)

    def bytes_per_slot(self) -> int:
        return self.acoustic.bytes_per_slot() + self.semantic.bytes_per_slot()

    def schedule(self, steps: int) -> Schedule:
        if steps not in self.schedules:
            self.schedules[steps] = Schedule(
                self.head, self.base_scheduler, steps, self.device, self.dtype
            )
        return self.schedules[steps]

    # ---- the diffusion loop -----------------------------------------------------------
    def diffuse(self, rows: list, pos_cond: torch.Tensor, neg_cond: torch.Tensor):
        """Latents (n, 1, width) for the speaking rows, in their order."""
        groups: dict[int, list[int]] = {}
        for k, row in enumerate(rows):
            groups.setdefault(row.request.inference_steps, []).append(k)
        if len(groups) == 1:
            return self._diffuse(rows, next(iter(groups)), pos_cond, neg_cond)[:, None]
        out = torch.empty(len(rows), self.width, device=self.device, dtype=pos_cond.dtype)
        for steps, members in groups.items():
            sel = to_device(members, self.device)
            part = [rows[k] for k in members]
            out[sel] = self._diffuse(part, steps, pos_cond[sel], neg_cond[sel])
        return out[:, None]

    def _packed(self, rows: list) -> torch.Tensor:
        """(n, width + 1) float32 on the host: each row's starting noise, drawn from its
        own generator, then its cfg scale."""
        packed = torch.empty(len(rows), self.width + 1)
        for k, row in enumerate(rows):
            torch.randn(self.width, generator=row.state.generator, out=packed[k, : self.width])
        packed[:, self.width] = torch.tensor([float(r.request.cfg_scale) for r in rows])
        return packed

    def _diffuse(self, rows: list, steps: int, pos: torch.Tensor, neg: torch.Tensor):
        n = len(rows)
        schedule = self.schedule(steps)
        packed = to_device(self._packed(rows), self.device, torch.float32)
        if self.mode == "eager":
            return self.loop(self.head, schedule, packed, torch.cat([pos, neg]))
        b = bucket_for(n)
        key = ("diffuse", steps, b)
        graph = self.graphs.get(key) or self._capture(key, self._diffusion_graph(schedule, b))
        if graph is None:
            return self.loop(self.head, schedule, packed, torch.cat([pos, neg]))
        graph.inputs["packed"][:n].copy_(packed)
        cond = graph.inputs["cond"]
        cond[:n].copy_(pos)
        cond[b : b + n].copy_(neg)
        (latent,) = self._run(key, graph)
        return latent[:n]

    def _diffusion_graph(self, schedule: Schedule, b: int) -> dict:
        head = self.head

        def fn(packed, cond):
            return (diffusion_loop(head, schedule, packed, cond),)

        dev = self.device
        inputs = {
            "packed": torch.zeros(b, self.width + 1, device=dev, dtype=torch.float32),
            "cond": torch.zeros(
                2 * b, self.head.cond_proj.in_features, device=dev, dtype=self.dtype
            ),
        }
        return {"fn": fn, "inputs": inputs}

    # ---- the acoustic decode and the semantic encode ----------------------------------
    def decode(self, slots: list[int], latents: torch.Tensor):
        """(audio (n, 1, hop), next embeddings (n, 1, H), feedback (n, width + semantic))
        of the speaking rows: the feedback is what their history keeps."""
        n = len(slots)
        if self.mode == "eager":
            return self.decode_rows(to_device(slots, self.device), latents)
        b = bucket_for(n)
        key = ("decode", b)
        graph = self.graphs.get(key) or self._capture(key, self._decode_graph(b))
        if graph is None:
            return self.decode_rows(to_device(slots, self.device), latents)
        padded = slots + [self.acoustic.scratch] * (b - n)  # padded rows: the scratch slot
        graph.inputs["slots"].copy_(to_device(padded, self.device))
        graph.inputs["latents"][:n].copy_(latents)
        audio, embeds, fed = self._run(key, graph)
        return audio[:n], embeds[:n], fed[:n]

    def decode_rows(self, slots: torch.Tensor, latents: torch.Tensor):
        """The decode of rows whose stream slots are `slots` (a device tensor)."""
        m = self.model.model
        scaled = latents / m.latent_scaling_factor - m.latent_bias_factor
        decoder = m.audio_tower.decoder
        audio = run_stack(decoder, scaled.permute(0, 2, 1), self.acoustic.at(slots))
        encoder = m.semantic_tokenizer_encoder
        sem = run_stack(encoder, audio, self.semantic.at(slots)).permute(0, 2, 1)
        embeds = m.multi_modal_projector(latents) + m.semantic_connector(sem)
        return audio, embeds, torch.cat([latents[:, 0], sem[:, 0]], dim=-1)

    def _decode_graph(self, b: int) -> dict:
        dev = self.device
        inputs = {
            "slots": torch.full((b,), self.acoustic.scratch, device=dev, dtype=torch.long),
            "latents": torch.zeros(b, 1, self.width, device=dev, dtype=self.dtype),
        }

        def prepare():  # warm-up and capture move the scratch slot only
            inputs["slots"].fill_(self.acoustic.scratch)

        state = [*self.acoustic.store.values(), *self.semantic.store.values()]
        return {"fn": self.decode_rows, "inputs": inputs, "state": state, "prepare": prepare}

    # ---- graphs -----------------------------------------------------------------------
    def capture(self, steps: int, rows: int) -> int:
        """Graphs mode: make the graphs of every bucket up to `rows` rows now (the loop at
        `steps` sub-steps, the decode) rather than in the step that first needs one.
        Their first runs are still checked against eager. Returns how many were made."""
        if self.mode != "graphs":
            return 0
        made = 0
        for b in buckets_upto(rows):
            for key in (("diffuse", steps, b), ("decode", b)):
                if self.mode != "graphs":  # a capture failed: the worker went on eager
                    return made
                if key in self.graphs:
                    continue
                if key[0] == "diffuse":
                    parts = self._diffusion_graph(self.schedule(steps), b)
                else:
                    parts = self._decode_graph(b)
                made += self._capture(key, parts) is not None
        return made

    def _capture(self, key: tuple, parts: dict) -> Graph | None:
        """The graph for `key`, made now; None when making it raised (an operator that
        cannot be captured, memory): that logs a warning and turns graphs off for good,
        and the caller runs the eager path."""
        graph = make_graph(
            key,
            self._go_eager,
            parts["fn"],
            parts["inputs"],
            parts.get("state"),
            pool=self.pool,
            prepare=parts.get("prepare"),
            scratch_last="state" in parts,
        )
        if graph is None:
            return None
        self.graphs[key] = graph
        self.checks_left[key] = CHECKED_RUNS
        return graph

    def _go_eager(self, why: str, key: tuple) -> None:
        log.warning("engine_mode graphs: %s for %s; this worker goes on eager", why, key)
        self.mode = "eager"
        self.graphs.clear()
        self.checks_left.clear()

    def _run(self, key: tuple, graph: Graph) -> tuple:
        """The graph's outputs; its first runs checked against eager. A mismatch logs a
        warning and turns graphs off for good (this call returns the eager outputs)."""
        if not self.checks_left.get(key):
            return graph.run()
        self.checks_left[key] -= 1
        try:
            return graph.checked_run(tolerance(self.dtype))
        except Mismatch as exc:
            self._go_eager(str(exc), key)
            return exc.eager


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
