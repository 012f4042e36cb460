"""The VibeVoice step engine: continuous batching over transformers' modules.

We drive the loop; transformers' `generate` is only the reference the tests
compare each row with. The engine owns the running set of rows. Each call to
`step(sink)`:

  1. runs the positive LM forward for the running rows on the embeddings they
     made last step, and prefills the rows that join (batched among themselves;
     each voice's latent noise from its own row's generator, so it never
     depends on the neighbours); their KV joins the batch (step_caches.BranchKV,
     left-padded, per-row positions);
  2. picks each row's token among the four VibeVoice allows (argmax);
  3. per row, as microsoft's loop does: EOS ends it; speech_end zeroes its
     stream caches; speech_start resets its negative branch to its first entry;
  4. for the rows that drew the audio token: one negative LM forward (the rows
     that do not diffuse get a masked column and keep their position, so their
     unconditional context does not grow), the diffusion head batched over
     them (grouped by step count, each row with its own cfg scale and its own
     noise generator), then the acoustic decode and semantic re-encode of
     those rows alone (step_audio.Speech, on step_caches.StreamSlots);
  5. streams each row's new audio and drops the rows that ended, freeing
     their state.

Memory-aware admission: `fits(rows)` predicts the peak KV of a running set
(both branches, prompt plus the row's step cap, padded to the longest) and
compares it with the budget (a setting, or on CUDA free memory minus headroom).
On CUDA out-of-memory anyway, every row restarts from its start with the row
limit halved, skipping the audio it already sent; a row alone fails.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch

from workers.engines.row import Row, ran_in_step
from workers.engines.vibevoice.audio import Speech
from workers.engines.vibevoice.caches import BranchKV
from workers.wire.messages import ErrorKind, PoolError, Request

MIB = 1 << 20
OOM_ALONE = (
    "out of GPU memory for this request alone: shorten the script or the voice samples, "
    "or lower max_audio_s"
)


@dataclass
class _RowModel:
    """The model-side state of one row that is not batched."""

    generator: torch.Generator  # every random draw of the row: voice noise, then diffusion
    prompt_len: int
    first_neg: list | None = None  # [keys, values] per layer of its first negative entry


def cache_keyword(lm: Any) -> str:
    """The name the LM's forward takes its KV cache by: `cache` since transformers 5.23,
    `past_key_values` before (5.17 swallows an unknown `cache=` silently and runs with
    no cache at all)."""
    import inspect

    params = inspect.signature(lm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ProcessorPrompts:
    """Prompts as microsoft's processor builds them (workers/vibevoice_prompt.py)."""

    def __init__(self, processor: Any):
        from workers.engines.vibevoice.prompt import PromptTokens

        self.processor = processor
        self.tokens = PromptTokens.from_processor(processor)

    def length(self, req: Request) -> int:
        from workers.engines.vibevoice.prompt import prompt_ids

        return len(prompt_ids(self.tokens, req))

    def batch(self, requests: list[Request], device: Any, dtype: Any):
        from workers.engines.vibevoice.prompt import build_inputs

        return build_inputs(
            self.processor, requests, tokens=self.tokens, device=device, dtype=dtype
        )


class StepEngine:
    def __init__(
        self,
        model: Any,
        device: str,
        max_rows: int,
        prompts: Any,
        mem_budget_bytes: int = 0,
        mem_headroom_bytes: int = 0,
        head_compile: str = "",
    ):
        self.model = model
        self.device = device
        self.max_rows = max(1, max_rows)
        self.prompts = prompts  # .length(request) and .batch(requests, device, dtype)
        self.mem_budget_bytes = mem_budget_bytes
        self.mem_headroom_bytes = mem_headroom_bytes
        cfg = model.config
        self.audio_id = cfg.audio_token_id
        self.bos_id = cfg.audio_bos_token_id
        self.end_id = cfg.audio_eos_token_id
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos_ids.add(cfg.eos_token_id)
        self.dtype = model.dtype
        self.lm = model.model.language_model
        self.cache_arg = cache_keyword(self.lm)
        self.embed = model.get_input_embeddings()
        self.text_cfg = cfg.text_config
        self.hop = cfg.audio_config.hop_length
        self.vae_std = float(getattr(model.model.audio_tower.config, "vae_std", 0.625))
        self.token_bias = self._token_bias(model)
        self.pos = BranchKV(device)
        self.neg = BranchKV(device)
        self.rows: list[Row] = []
        self.embeds: torch.Tensor | None = None  # (rows, 1, H): what each row feeds next step
        self.joining: list[Row] = []
        self.restarting: collections.deque[Row] = collections.deque()
        self.speech = Speech(model, device, self.max_rows, head_compile)
        self.slot_count = self.max_rows
        self.free_slots = list(range(self.slot_count))
        self.steps = 0
        self.kv_bytes_per_token = self._kv_bytes_per_token()

    # ---- setup ----------------------------------------------------------------------
    def _token_bias(self, model: Any) -> torch.Tensor:
        """The allowed-token constraint (-inf elsewhere) plus the generation config's
        single-token sequence_bias (the tiny model's way of choosing audio)."""
        cfg = model.config
        bias = torch.full((cfg.text_config.vocab_size,), float("-inf"))
        bias[[self.bos_id, self.end_id, self.audio_id, cfg.eos_token_id]] = 0.0
        extra = torch.zeros_like(bias)
        for ids, value in getattr(model.generation_config, "sequence_bias", None) or []:
            if len(ids) != 1:
                raise PoolError(
                    ErrorKind.ENGINE_ERROR, "only single-token sequence_bias is supported"
                )
            extra[ids[0]] += float(value)
        return (extra + bias).to(self.device)

    def _kv_bytes_per_token(self) -> int:
        c = self.text_cfg
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * heads * head_dim * torch.finfo(self.dtype).bits // 8

    # ---- admission --------------------------------------------------------------------
    @property
    def live(self) -> int:
        return len(self.rows) + len(self.joining) + len(self.restarting)

    def peak_bytes(self, rows: list[tuple[int, int]]) -> int:
        """Predicted peak KV of a running set, given (prompt tokens, step cap) per row:
        both branches padded to the longest row, plus the stream slots."""
        if not rows:
            return 0
        pos_len = max(p + s for p, s in rows)
        neg_len = max(s for _, s in rows) + 1
        slots = self.speech.bytes_per_slot()
        return len(rows) * ((pos_len + neg_len) * self.kv_bytes_per_token + slots)

    def budget_bytes(self) -> int:
        """What the running set may hold: the configured budget, else on CUDA free
        memory (plus what the rows hold now) minus headroom; 0 = no limit."""
        if self.mem_budget_bytes:
            return self.mem_budget_bytes
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            held = self.pos.bytes() + self.neg.bytes()
            return max(1, free + held - self.mem_headroom_bytes)
        return 0

    def _shape(self, row: Row) -> tuple[int, int]:
        return (row.state.prompt_len, row.max_steps)

    def fits(self, row: Row) -> bool:
        budget = self.budget_bytes()
        if not budget:
            return True
        shapes = [self._shape(r) for r in (*self.rows, *self.joining, *self.restarting)]
        return self.peak_bytes([*shapes, self._shape(row)]) <= budget

    def prepare(self, req: Request, budget_tokens: int, max_steps: int, cap_reason: str) -> Row:
        """A row for `req`, its prompt built (not run). Raises PoolError(OUT_OF_MEMORY)
        when the row alone can never fit the budget."""
        row = Row(req, budget_tokens, max_steps, cap_reason, state=self._row_state(req))
        budget = self.budget_bytes()
        need = self.peak_bytes([self._shape(row)])
        if budget and need > budget:
            raise PoolError(
                ErrorKind.OUT_OF_MEMORY,
                f"this request alone needs about {need / MIB:.0f} MiB of cache, more than the "
                f"worker's budget of {budget / MIB:.0f} MiB: shorten the script or lower max_audio_s",
            )
        return row

    def _row_state(self, req: Request) -> _RowModel:
        from workers.engines.vibevoice.noise import row_generators

        (gen,) = row_generators([req.seed])
        return _RowModel(gen, self.prompts.length(req))

    def admit(self, row: Row) -> None:
        """The row joins the running set at the next step."""
        self.joining.append(row)

    def cancel(self, request_id: str) -> Row | None:
        """Free a row's place at once; the caller reports it."""
        for queue in (self.joining, self.restarting):
            for row in list(queue):
                if row.id == request_id:
                    queue.remove(row)
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
        return [*self.rows, *self.joining, *self.restarting]

    def reset(self) -> list[Row]:
        """Forget every row (after an error the state cannot be trusted); return them."""
        rows = self.open_rows()
        self.rows, self.joining, self.embeds = [], [], None
        self.restarting.clear()
        self.pos, self.neg = BranchKV(self.device), BranchKV(self.device)
        self.free_slots = list(range(self.slot_count))
        return rows

    # ---- one step ---------------------------------------------------------------------
    def step(self, sink: Any) -> None:
        while self.restarting and len(self.rows) + len(self.joining) < self.max_rows:
            self.joining.append(self.restarting.popleft())
        if not self.rows and not self.joining:
            return
        try:
            with torch.no_grad():
                self._step(sink)
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory(sink)

    def _out_of_memory(self, sink: Any) -> None:
        waiting = list(self.restarting)  # restarted earlier, not in this step: they keep waiting
        ran = ran_in_step(self.reset(), waiting)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.restarting.extend(waiting)
        if len(ran) <= 1:
            for r in ran:
                r.fail(sink, PoolError(ErrorKind.OUT_OF_MEMORY, OOM_ALONE))
            return
        self.max_rows = max(1, min(self.max_rows, len(ran)) // 2)
        for r in ran:
            again = r.restarted()
            again.state = self._row_state(r.request)
            self.restarting.append(again)

    def _step(self, sink: Any) -> None:
        hidden, consumed = [], []
        if self.rows:
            h = self._forward(self.pos, self.embeds, advance=None)
            hidden.append(h)
            consumed.append(self.embeds[:, 0])
        joined = self.joining
        self.joining = []
        if joined:
            hidden.append(self._prefill(joined))
            bos = self.embed(torch.tensor([self.bos_id], device=self.device))
            consumed.append(bos.expand(len(joined), -1))
            for row in joined:
                row.slot = self.free_slots.pop(0)
            self.speech.zero(torch.tensor([r.slot for r in joined], device=self.device))
        self.rows.extend(joined)
        hidden_t = torch.cat(hidden)
        consumed_t = torch.cat(consumed)[:, None]
        tokens = self._choose(self.model.lm_head(hidden_t))
        toks = tokens.tolist()
        self.steps += 1

        diffuse = []
        for i, (row, tok) in enumerate(zip(self.rows, toks, strict=True)):
            row.steps += 1
            if tok in self.eos_ids:
                row.finish(sink, "eos")
            elif tok == self.audio_id:
                diffuse.append(i)
            elif tok == self.end_id:
                self.speech.zero(torch.tensor([row.slot], device=self.device))
            elif tok == self.bos_id:
                self._reset_negative(i)
        next_embeds = self.embed(tokens)[:, None]
        if diffuse:
            idx = torch.tensor(diffuse, device=self.device)
            advance = torch.zeros(len(self.rows), dtype=torch.bool, device=self.device)
            advance[idx] = True
            neg_hidden = self._forward(self.neg, consumed_t, advance=advance)
            speaking = [self.rows[i] for i in diffuse]
            latents = self.speech.diffuse(speaking, hidden_t[idx], neg_hidden[idx])
            audio, embeds = self.speech.decode([r.slot for r in speaking], latents)
            next_embeds[idx] = embeds.to(next_embeds.dtype)
            pcm = audio[:, 0, :].float().cpu().numpy()
            for k, i in enumerate(diffuse):
                self.rows[i].add_audio(pcm[k], sink)
        for row in self.rows:
            if not row.closed and row.out_of_budget:
                row.finish(sink, row.cap_reason)
        self.embeds = next_embeds
        self._drop_closed()
        sink.step()

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token, in self.rows order: the argmax over the four tokens
        VibeVoice allows (it ignores sampling, as transformers' and microsoft's loops do)."""
        return (logits.float() + self.token_bias).argmax(dim=-1)

    def _prefill(self, rows: list[Row]) -> torch.Tensor:
        """Run the joining rows' prompts, batched (left-padded, per-row positions, each
        voice's latent noise from its own row's generator); their KV joins the positive
        branch, their negative branch starts empty. Returns last hidden states (n, H)."""
        from transformers import DynamicCache

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
        cache = DynamicCache(config=self.text_cfg)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **{self.cache_arg: cache},
            use_cache=True,
        )
        n = len(rows)
        layers = [[layer.keys, layer.values] for layer in cache.layers]
        self.pos.add(layers, mask, mask.sum(dim=-1))
        self.neg.add(None, mask[:, :0], torch.zeros(n, dtype=torch.long, device=self.device))
        return out.last_hidden_state[:, -1]

    def _forward(self, branch: BranchKV, embeds: torch.Tensor, advance) -> torch.Tensor:
        """One LM forward of a branch for every row; `advance` (None: all) says which
        rows keep the new column. Every row attends its own new column during the pass,
        so no row's attention is empty. Returns the last hidden states (rows, H)."""
        rows = branch.rows
        ones = torch.ones(rows, 1, dtype=torch.long, device=self.device)
        cache = branch.cache()
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=torch.cat([branch.mask, ones], dim=1),
            position_ids=branch.pos[:, None],
            **{self.cache_arg: cache},
            use_cache=True,
        )
        branch.absorb(cache)
        keep = ones if advance is None else advance.long()[:, None]
        branch.mask = torch.cat([branch.mask, keep], dim=1)
        branch.pos = branch.pos + keep[:, 0]
        if advance is not None:
            for i in advance.nonzero().view(-1).tolist():
                state = self.rows[i].state
                if state.first_neg is None:
                    state.first_neg = [
                        [t[i : i + 1, :, -1:].clone() for t in kv] for kv in branch.layers
                    ]
        return out.last_hidden_state[:, -1]

    def _reset_negative(self, i: int) -> None:
        """speech_start: the row's unconditional context becomes its first entry alone
        (microsoft: mask all but the last column, copy slot 0's KV there)."""
        first = self.rows[i].state.first_neg
        if first is None or not self.neg.length:
            return
        for kv, saved in zip(self.neg.layers, first, strict=True):
            for t, s in zip(kv, saved, strict=True):
                t[i : i + 1, :, -1:] = s
        self.neg.mask[i] = 0
        self.neg.mask[i, -1] = 1
        self.neg.pos[i] = 1

    def _drop_closed(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.closed]
        if len(keep) == len(self.rows):
            return
        for r in self.rows:
            if r.closed and r.slot >= 0:
                self.free_slots.append(r.slot)
                r.slot = -1
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.pos.keep(idx)
        self.neg.keep(idx)
        if self.embeds is not None:
            self.embeds = self.embeds.index_select(0, idx) if keep else None
        self.rows = [self.rows[i] for i in keep]
