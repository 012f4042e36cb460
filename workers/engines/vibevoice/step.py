"""The VibeVoice step engine: continuous batching over transformers' modules.

We drive the loop; transformers' `generate` is only the reference the tests
compare each row with. The engine owns the running set of rows. Each call to
`step(sink)`:

  1. prefills the rows that join (batched among themselves; each voice's latent
     noise from its own row's generator, so it never depends on the neighbours);
     their KV goes into fresh blocks of the paged cache (paged_kv.PagedKV), each
     branch of each row its own block list and length;
  2. runs ONE LM forward for both branches of every row: rows [0, n) are the
     positive branches, rows [n, 2n) the negative (CFG) ones, each with its own
     blocks and position, all fed the embedding the row made last step; each layer
     writes the new column in place and reads the rows' blocks;
  3. picks each row's token among the four VibeVoice allows (argmax over their
     logits alone, computed in float32 from the four lm_head rows sliced at load);
  4. per row, as microsoft's loop does: EOS ends it; a row at its step cap ends
     before it acts (its capping step); speech_end zeroes its stream caches;
     speech_start restarts its negative branch (its blocks are freed; its next
     negative token attends only itself, at position 0); a negative row keeps this
     step's column only when the row diffuses (the others do not move on, so the
     column is overwritten next step and their unconditional context does not grow:
     microsoft's `correct_cnt`). Running the negative pass before the token is
     known changes nothing: a row that does not diffuse drops what it computed;
  5. for the rows that drew the audio token: the diffusion head batched over
     them (grouped by step count, each row with its own cfg scale and its own
     noise generator), then the acoustic decode and semantic re-encode of
     those rows alone (audio.Speech, on caches.StreamSlots);
  6. streams each row's new audio and drops the rows that ended, freeing
     their state.
Each row's history (engines/trail.py) leaves with its audio; a row sent again with
it (request.resume) is rebuilt by resume.py at admit and goes on from its last step.

Memory-aware admission (`fits`, the KV's shape and the budget): row_memory.py.
CUDA out-of-memory escapes `step`; what follows is the host's policy
(workers/host/step_host.py), which decides who runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.engines.row import Row
from workers.engines.vibevoice import paged_kv, resume
from workers.engines.vibevoice.audio import HandOff, Speech
from workers.engines.vibevoice.caches import to_device
from workers.engines.vibevoice.decode_lm import DecodeLM, cache_keyword
from workers.engines.vibevoice.fused_lm import fuse_projections
from workers.engines.vibevoice.joining import prefill_joining
from workers.engines.vibevoice.lm_graph import LMGraphs
from workers.engines.vibevoice.paged_kv import PAGED_FLASH, Seq
from workers.engines.vibevoice.row_memory import RowMemory
from workers.wire.messages import ErrorKind, PoolError, Request

OOM_ALONE = (
    "out of GPU memory for this request alone: shorten the script or the voice samples, "
    "or lower max_audio_s"
)


@dataclass
class _RowModel:
    """The model-side state of one row that is not batched."""

    generator: torch.Generator  # every random draw of the row: voice noise, then diffusion
    prompt_len: int
    pos: Seq | None = None  # its positive branch's KV blocks (from its prefill on)
    neg: Seq | None = None  # its negative (CFG) branch's


class StepEngine(RowMemory):
    def __init__(
        self,
        model: Any,
        device: str,
        max_rows: int,
        prompts: Any,
        mem_budget_bytes: int = 0,
        mem_headroom_bytes: int = 0,
        gpu_share: int = 1,
        head_compile: str = "",
        engine_mode: str = "auto",
    ):
        self.model = model
        self.device = device
        self.max_rows = max(1, max_rows)
        self.prompts = prompts  # .length(request) and .batch(requests, device, dtype)
        self.mem_budget_bytes = mem_budget_bytes
        self.mem_headroom_bytes = mem_headroom_bytes
        self.gpu_share = max(1, gpu_share)
        cfg = model.config
        self.audio_id = cfg.audio_token_id
        self.bos_id = cfg.audio_bos_token_id
        self.end_id = cfg.audio_eos_token_id
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos_ids.add(cfg.eos_token_id)
        self.dtype = model.dtype
        self.lm = model.model.language_model
        fuse_projections(self.lm)  # q/k/v and gate/up: one matmul each (fused_lm.py)
        self.cache_arg = cache_keyword(self.lm)
        self.embed = model.get_input_embeddings()
        self.text_cfg = cfg.text_config
        self.hop = cfg.audio_config.hop_length
        self.vae_std = float(getattr(model.model.audio_tower.config, "vae_std", 0.625))
        self.allowed, self.head_weight, self.head_bias = self._allowed_head(model)
        attn = getattr(self.text_cfg, "_attn_implementation", None) or "sdpa"
        # the decode forward's attention: flash_attn over the blocks where it can run, else
        # eager or sdpa over each row's blocks gathered (the reference)
        self.flash = paged_kv.flash_kvcache() if str(device).startswith("cuda") else None
        self.decode_attn = PAGED_FLASH if self.flash else "eager" if attn == "eager" else "sdpa"
        if self.flash:
            paged_kv.register_paged_flash()
        self.decode_lm = DecodeLM.build(self.lm)  # None: transformers' decode forward
        self.lm_graphs = None  # engine_mode graphs-lm: decode_lm's step captured too
        if engine_mode == "graphs-lm" and self.decode_lm is not None:
            self.lm_graphs = LMGraphs(self.decode_lm, self.decode_attn, device, self.dtype)
        # Both LM branches of every row in one pool, run by one forward per step: rows
        # [0, n) are the positive (prompt) branches, rows [n, 2n) the negative (CFG) ones.
        self.kv = self._new_kv()
        self.rows: list[Row] = []
        self.embeds: torch.Tensor | None = None  # (rows, 1, H): what each row feeds next step
        self.joining: list[Row] = []
        self.speech = Speech(model, device, self.max_rows, head_compile, engine_mode)
        self.slot_count = self.max_rows
        self.free_slots = list(range(self.slot_count))
        self.steps = 0
        self.kv_bytes_per_token = self._kv_bytes_per_token()
        self.audio_out = HandOff(device)  # each step's audio, on its way to the host

    # ---- setup ----------------------------------------------------------------------
    def _allowed_head(self, model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four tokens VibeVoice may draw (ascending, so that argmax breaks a tie as
        an argmax over the whole vocabulary does), their lm_head rows in float32, and
        their bias: the head's own, plus the generation config's single-token
        sequence_bias (the tiny model's way of choosing audio). Every step then reads
        4 rows of the head instead of all 151,936, and no near-tie is decided by bf16."""
        cfg = model.config
        ids = sorted({self.bos_id, self.end_id, self.audio_id, cfg.eos_token_id})
        head = model.lm_head
        weight = head.weight.detach()[ids].float()
        bias = torch.zeros(len(ids))
        if getattr(head, "bias", None) is not None:
            bias += head.bias.detach()[ids].float().cpu()
        for seq, value in getattr(model.generation_config, "sequence_bias", None) or []:
            if len(seq) != 1:
                raise PoolError(
                    ErrorKind.ENGINE_ERROR, "only single-token sequence_bias is supported"
                )
            if seq[0] in ids:
                bias[ids.index(seq[0])] += float(value)
        dev = self.device
        return torch.tensor(ids, device=dev), weight.to(dev), bias.to(dev)

    # ---- admission --------------------------------------------------------------------
    @property
    def live(self) -> int:
        return len(self.rows) + len(self.joining)

    def prepare(
        self,
        req: Request,
        budget_tokens: int,
        max_steps: int,
        cap_reason: str,
        step_reason: str = "runaway_cap",
        prompt_len: int | None = None,
    ) -> Row:
        """A row for `req`, its prompt built (not run). Raises PoolError(OUT_OF_MEMORY)
        when the row alone can never fit the budget."""
        state = self._row_state(req, prompt_len)
        row = Row(req, budget_tokens, max_steps, cap_reason, step_reason, state=state)
        resume.keep_history(self, row)  # its trail; a row sent again takes its history
        self._refuse_alone(row)
        return row

    def _row_state(self, req: Request, prompt_len: int | None = None) -> _RowModel:
        from workers.engines.vibevoice.noise import row_generators

        (gen,) = row_generators([req.seed])
        return _RowModel(gen, self.prompts.length(req) if prompt_len is None else prompt_len)

    def admit(self, row: Row) -> None:
        """The row joins the running set at the next step (a resumed one: now)."""
        if row.steps:
            resume.bring_in(self, row)
        else:
            self.joining.append(row)

    def cancel(self, request_id: str) -> Row | None:
        """Free a row's place at once; the caller reports it."""
        for row in self.joining:
            if row.id == request_id:
                self.joining.remove(row)
                row.closed = True
                return row
        for row in self.rows:
            if row.id == request_id:
                row.closed = True
                with torch.no_grad():
                    self._drop_closed()
                return row
        return None

    def open_rows(self) -> list[Row]:
        return [*self.rows, *self.joining]

    def reset(self) -> list[Row]:
        """Forget every row (after an error or out-of-memory the state cannot be trusted);
        return them."""
        rows = self.open_rows()
        self.rows, self.joining, self.embeds = [], [], None
        if self.lm_graphs is not None:  # they hold the old pool: let it go with them
            self.lm_graphs.drop()
        self.kv = self._new_kv()
        self.audio_out = HandOff(self.device)
        self.free_slots = list(range(self.slot_count))
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()  # after out-of-memory: give the cached blocks back
        return rows

    # ---- one step ---------------------------------------------------------------------
    def step(self, sink: Any) -> None:
        """One decode step of every row held, reported through `sink` (the host's
        contract.StepOutput). torch.cuda.OutOfMemoryError escapes: the host decides."""
        if not self.rows and not self.joining:
            return
        with torch.no_grad():
            self._step(sink)

    def _step(self, sink: Any) -> None:
        joined, fresh = prefill_joining(self, self.joining, sink) if self.joining else ([], None)
        self.joining = []
        old = len(self.rows)
        if not old and not joined:
            return  # the only newcomers failed in their prefill
        if joined:
            for row in joined:
                row.slot = self.free_slots.pop(0)
            self.speech.zero(to_device([r.slot for r in joined], self.device))
            bos = self.embed(to_device([self.bos_id], self.device))
        self.rows.extend(joined)
        n = len(self.rows)
        # What each row consumes this step, in both branches: its last token's embedding
        # (for a row that just joined, speech_start; its positive pass is the prefill,
        # so that row's positive column here is run and dropped).
        parts = [self.embeds[:, 0]] if old else []
        if joined:
            parts.append(bos.expand(len(joined), -1))
        consumed = torch.cat(parts)
        seqs = self._seqs()
        hidden = self._forward(seqs, torch.cat([consumed, consumed])[:, None])
        pos_hidden = hidden[:n] if fresh is None else torch.cat([hidden[:old], fresh])
        neg_hidden = hidden[n:]
        tokens = self._choose(pos_hidden)
        capped = [i for i, row in enumerate(self.rows) if row.steps >= row.max_steps]
        next_embeds = self.embed(tokens)[:, None]
        toks = tokens.tolist()  # the step's one host sync
        self.audio_out.hand_over(sink)  # the last step's audio: its copy is done by now
        self.steps += 1
        # Every positive row that ran keeps its column; a negative row only when it
        # diffuses (microsoft's loop: a row's unconditional context grows only then).
        speaks = [t == self.audio_id and i not in capped for i, t in enumerate(toks)]
        self.kv.advance(seqs, [i < old for i in range(n)] + speaks)

        diffuse, restart = [], []
        for i, (row, tok) in enumerate(zip(self.rows, toks, strict=True)):
            row.steps += 1
            row.trail.token(tok)
            if tok in self.eos_ids:
                row.finish(sink, "eos")
            elif i in capped:
                row.finish(sink, row.step_reason)
            elif tok == self.audio_id:
                diffuse.append(i)
            elif tok == self.end_id:
                self.speech.zero(to_device([row.slot], self.device))
            elif tok == self.bos_id:
                restart.append(i)
        for i in restart:
            self._reset_negative(i)
        if diffuse:
            idx = to_device(diffuse, self.device)
            speaking = [self.rows[i] for i in diffuse]
            latents = self.speech.diffuse(speaking, pos_hidden[idx], neg_hidden[idx])
            audio, embeds, fed = self.speech.decode([r.slot for r in speaking], latents)
            next_embeds[idx] = embeds.to(next_embeds.dtype)
            self.audio_out.hold(speaking, audio[:, 0, :], sink, fed)
        ending = [r for r in self.rows if not r.closed and r.out_of_budget]
        if ending:
            self.audio_out.hand_over(sink, wait=True)
            for row in ending:
                row.finish(sink, row.cap_reason)
        self.embeds = next_embeds
        self._drop_closed()
        sink.step()

    def _seqs(self) -> list[Seq]:
        """The branch-rows of one forward: every row's positive branch, then every negative."""
        return [r.state.pos for r in self.rows] + [r.state.neg for r in self.rows]

    def _choose(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each row's next token, in self.rows order: the argmax over the four tokens
        VibeVoice allows (it ignores sampling, as transformers' and microsoft's loops do),
        their logits computed in float32 from the last hidden states (rows, H)."""
        return self.allowed[self.allowed_logits(hidden).argmax(dim=-1)]

    def allowed_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, 4) float32 scores of the allowed tokens (self.allowed's order)."""
        return hidden.float() @ self.head_weight.T + self.head_bias

    def _prefill(self, rows: list[Row]) -> torch.Tensor:
        """The joining rows' prompts run and their KV stored: their last hidden states
        (n, H)."""
        embeds, mask = self._prompt_embeds(rows)
        return self._run_prefill(rows, embeds, mask)

    def _prompt_embeds(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The joining rows' prompts as LM input, batched (left-padded; each voice's
        latent noise from its own row's generator): embeddings (n, L, H), mask (n, L)."""
        from workers.engines.vibevoice.noise import add_voice_noise

        batch = self.prompts.batch([r.request for r in rows], self.device, self.dtype)
        inputs = batch.inputs
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = self.embed(ids)
        if "input_values" in inputs:
            m = self.model.model
            latents = m.audio_tower.encode(inputs["input_values"], sample=False).latents
            generators = [r.state.generator for r in rows]
            latents = add_voice_noise(
                latents, batch.voice_rows, batch.voice_tokens, generators, self.vae_std
            )
            feats = (latents + m.latent_bias_factor) * m.latent_scaling_factor
            count = torch.ceil(inputs["padding_mask"].sum(dim=-1) / self.hop).long()
            valid = torch.arange(feats.shape[1], device=count.device) < count[:, None]
            voice = m.multi_modal_projector(feats)[valid.to(feats.device)]
            embeds[ids == self.audio_id] = voice.to(embeds.dtype)
        return embeds, mask

    def _run_prefill(self, rows: list[Row], embeds: torch.Tensor, mask: torch.Tensor):
        """Run the prefill of `rows` over their input embeddings (n, L, H), left-padded as
        `mask` (n, L) says, each row's real length its state's prompt_len; their KV goes
        into fresh blocks of their positive branches, and each gets an empty negative
        branch. Returns the last hidden states (n, H)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_cfg)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **{self.cache_arg: cache},
            use_cache=True,
        )
        for row in rows:
            row.state.pos, row.state.neg = self.kv.seq(), self.kv.seq()
        self.kv.store_prompt(
            [r.state.pos for r in rows],
            [(layer.keys, layer.values) for layer in cache.layers],
            [r.state.prompt_len for r in rows],
        )
        return out.last_hidden_state[:, -1]

    def _forward(self, seqs: list[Seq], embeds: torch.Tensor) -> torch.Tensor:
        """One LM forward of both branches of every row (2n seqs, each its own blocks and
        position). Each layer writes the new column in place; every row attends it during
        the pass, so no row's attention is empty; `PagedKV.advance` then says which rows
        keep it. Returns the last hidden states (2n, H)."""
        step = self.kv.begin(seqs)
        extra = {"paged_step": step} if self.flash else {}
        if self.decode_lm is None:
            return self._lm_forward(step, embeds, extra)
        if self.lm_graphs is not None and not self.decode_lm.checks_left:
            hidden = self.lm_graphs.run(step, embeds)
            if hidden is not None:
                return hidden
            self.lm_graphs = None  # off for good: decode_lm's eager forward from now on
        hidden, trusted = self.decode_lm.forward(
            embeds, step, self.decode_attn, lambda: self._lm_forward(step, embeds, extra), **extra
        )
        if not trusted:
            self.decode_lm = None
        return hidden

    def _lm_forward(self, step: Any, embeds: torch.Tensor, extra: dict) -> torch.Tensor:
        """transformers' forward of one decode step (the lean one's reference)."""
        cfg = self.lm.config
        configured = cfg._attn_implementation
        cfg._attn_implementation_internal = self.decode_attn  # this forward only
        try:
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask={"full_attention": step.mask},  # no mask building
                position_ids=step.positions,
                **{self.cache_arg: step},
                use_cache=True,
                **extra,
            )
        finally:
            cfg._attn_implementation_internal = configured
        return out.last_hidden_state[:, -1]

    def _reset_negative(self, i: int) -> None:
        """speech_start: the row's unconditional context starts again (microsoft's copy of
        KV slot 0 lands on a masked column, so its next negative token attends only itself,
        at position 0: docs/MODEL.md). Here the negative branch's blocks are freed and its
        next token is its first: context [speech_start@0, d@1, ...]."""
        self.kv.release(self.rows[i].state.neg, drop=False)

    def _drop_closed(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.closed]
        if len(keep) == len(self.rows):
            return
        for r in self.rows:
            if r.closed:
                if r.slot >= 0:
                    self.free_slots.append(r.slot)
                    r.slot = -1
                self.kv.release_row(r.state)
        if self.embeds is not None:
            idx = to_device(keep, self.device)
            self.embeds = self.embeds.index_select(0, idx) if keep else None
        self.rows = [self.rows[i] for i in keep]
