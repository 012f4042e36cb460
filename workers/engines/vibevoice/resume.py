"""Resume: a row rebuilt from its history (workers/wire/history.py) at its last step.

A request sent again (its worker died, it was preempted, it moved) carries the
row's history: each step's token and, for a speech step, what it fed back (the
acoustic latent and the semantic features), and the row's noise generator state
now and then. The step engine (step.py) calls two hooks:

    keep_history(engine, row)   at prepare: the row gets its trail; one sent again
                                takes its history's counts
                                (steps, audio tokens, samples), or, when the history
                                does not fit this engine and request, starts over
                                (the reason is logged; the listener still hears no
                                repeat: the parent skips what it has)
    bring_in(engine, row)       at admit, between two steps: the row joins the
                                running set as if it had never left (one that
                                raises gives back the blocks and slot it took)

bring_in rebuilds, without running a single decode step:
  - the next input embedding of every step, from its token or its feedback
    (projector(latent) + connector(semantic)), as the step made it;
  - the positive branch: ONE prefill of the prompt plus the embeddings the row
    consumed (the first step's is the prompt's own speech_start, so steps 1..k-1);
  - the negative branch: one prefill of the columns it kept since its last
    speech_start (a step's column is kept only when that step spoke; microsoft's
    loop);
  - the acoustic decoder's and semantic encoder's streaming caches: the decoder
    and the encoder run over the last `speech.stream_frames` latents since the
    caches were last zeroed (the row's start, or its last speech_end), from zero
    caches, in one call each: a causal conv stack's state depends only on a window of
    its past, and that window is the loaded model's own (receptive.py: 116 frames for
    VibeVoice-1.5B's towers, 29 for the tiny model's);
  - the noise generator: its last saved state, then one draw per speech step since.
Its next step feeds the embedding of its last step, and it sends only new audio.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from workers.engines.row import Row
from workers.engines.trail import Trail
from workers.engines.vibevoice.caches import to_device
from workers.wire.messages import SAMPLE_RATE

log = logging.getLogger("vibevoice_pool.worker")

NOISE_EVERY = 32  # a speech step count at which the trail keeps the generator's state


def keep_history(eng: Any, row: Row) -> None:
    """Give a new row its trail; one sent with a history (request.resume) takes that
    history's counts, or stays at its start when the history does not fit (logged)."""
    row.trail = Trail(eng.speech.feedback_width, eng.audio_id)
    hist = row.request.resume
    if hist is None:
        return
    why = _unusable(eng, row, hist)
    if why:
        log.warning("request %s cannot resume (%s): replayed from its start", row.id, why)
        return
    toks = hist.token_array()
    row.steps = len(toks)
    row.audio_tokens = int((toks == eng.audio_id).sum())
    row.made_samples = row.sent_samples = hist.samples
    row.trail = Trail.after(hist, eng.audio_id)


def _unusable(eng: Any, row: Row, hist: Any) -> str:
    if hist is None or not hist.steps:
        return "no history"
    if hist.width != eng.speech.feedback_width:
        return (
            f"its feedback has {hist.width} values a step, this model {eng.speech.feedback_width}"
        )
    toks = hist.token_array()
    allowed = set(eng.allowed.tolist())
    if not set(np.unique(toks).tolist()) <= allowed:
        return "it holds tokens this model does not draw"
    if any(int(t) in eng.eos_ids for t in toks):
        return "it had already ended"
    spoke = int((toks == eng.audio_id).sum())
    if spoke * eng.hop != hist.samples:
        return f"{spoke} speech steps do not make {hist.samples} samples"
    if len(toks) >= row.max_steps or spoke >= row.budget_tokens:
        return "it is at its cap"
    return ""


def bring_in(eng: Any, row: Row) -> None:
    """The resumed row joins eng's running set now (between two steps)."""
    hist = row.request.resume
    toks = hist.token_array()
    fed = torch.from_numpy(hist.feedback_array().copy()).to(eng.device)
    with torch.no_grad():
        gen = row.state.generator  # fresh: the prompt's voice noise comes first
        prompt = _prompt_embeds(eng, row)
        made = _step_embeds(eng, toks, fed)  # (k, H): what step j fed to step j + 1
        pos_layers, pos_len = _prefill(eng, torch.cat([prompt, made[:-1]])[None])
        neg_cols = _negative_columns(eng, toks, made)
        neg = _prefill(eng, neg_cols[None]) if len(neg_cols) else (None, 0)
        _restore_noise(eng, gen, toks, hist.noise)
        latents = _stream_window(eng, toks, fed)
        # every piece is built: now the row joins (nothing above touched the engine)
        try:
            _join_kv(eng, row, pos_layers, pos_len, *neg)
            row.slot = eng.free_slots.pop(0)
            slot = to_device([row.slot], eng.device)
            eng.speech.zero(slot)
            if len(latents):
                _rebuild_streams(eng, slot, latents)
            nxt = made[-1:][:, None].to(eng.dtype)
            embeds = nxt if eng.embeds is None else torch.cat([eng.embeds, nxt])
        except BaseException:  # out of memory on a GPU, any bug: the engine as it was
            _leave(eng, row)
            raise
        eng.embeds = embeds
        eng.rows.append(row)
    log.info(
        "request %s resumed at step %d (%.1f s of audio): 1 prefill of %d positions, "
        "%d negative columns, %d frames re-decoded",
        row.id,
        len(toks),
        hist.samples / SAMPLE_RATE,
        pos_len,
        len(neg_cols),
        len(latents),
    )


def _leave(eng: Any, row: Row) -> None:
    """A row that failed as it joined gives back the KV blocks and the stream slot it
    took, so that nothing stays held for a row the engine does not run."""
    eng.kv.release_row(row.state)
    if row.slot >= 0:
        eng.free_slots.append(row.slot)
        row.slot = -1


def _prompt_embeds(eng: Any, row: Row) -> torch.Tensor:
    """The row's prompt as embeddings (P, H), its voice latents noised from its (fresh)
    generator, as the step engine's prefill makes them."""
    embeds, mask = eng._prompt_embeds([row])
    return embeds[0][mask[0].bool()]


def _step_embeds(eng: Any, toks: np.ndarray, fed: torch.Tensor) -> torch.Tensor:
    """(k, H): each step's next input: its token's embedding, or for a speech step
    projector(latent) + connector(semantic features)."""
    m = eng.model.model
    ids = torch.as_tensor(toks.astype(np.int64), device=eng.device)
    out = eng.embed(ids)
    speech = ids == eng.audio_id
    if bool(speech.any()):
        width = eng.speech.width
        sel = fed[speech].to(eng.dtype)
        made = m.multi_modal_projector(sel[:, None, :width]) + m.semantic_connector(
            sel[:, None, width:]
        )
        out[speech] = made[:, 0].to(out.dtype)
    return out


def _negative_columns(eng: Any, toks: np.ndarray, made: torch.Tensor) -> torch.Tensor:
    """The negative branch's kept inputs: from its last speech_start on, the input of
    each step that spoke (step 1's input is speech_start itself)."""
    starts = np.nonzero(toks == eng.bos_id)[0]
    first = int(starts[-1]) + 1 if len(starts) else 0  # 0-based step after the reset
    bos = eng.embed(to_device([eng.bos_id], eng.device))
    cols = [
        bos[0] if j == 0 else made[j - 1]
        for j in range(first, len(toks))
        if toks[j] == eng.audio_id
    ]
    if not cols:
        return made[:0]
    return torch.stack(cols)


def _prefill(eng: Any, embeds: torch.Tensor) -> tuple[list, int]:
    """One LM forward over (1, L, H) at positions 0..L-1; its KV per layer and L."""
    from transformers import DynamicCache

    length = embeds.shape[1]
    cache = DynamicCache(config=eng.text_cfg)
    mask = torch.ones(1, length, dtype=torch.long, device=eng.device)
    eng.lm(
        inputs_embeds=embeds.to(eng.dtype),
        attention_mask=mask,
        position_ids=torch.arange(length, device=eng.device)[None],
        **{eng.cache_arg: cache},
        use_cache=True,
    )
    return [(layer.keys, layer.values) for layer in cache.layers], length


def _join_kv(eng: Any, row: Row, pos_layers: list, pos_len: int, neg_layers, neg_len) -> None:
    """The row's two branches take fresh blocks of the paged store (paged_kv.PagedKV):
    the positive one holds its prompt and history, the negative one its kept columns."""
    row.state.pos, row.state.neg = eng.kv.seq(), eng.kv.seq()
    eng.kv.store_prompt([row.state.pos], pos_layers, [pos_len])
    if neg_len:
        eng.kv.store_prompt([row.state.neg], neg_layers, [neg_len])


def _restore_noise(eng: Any, gen: torch.Generator, toks: np.ndarray, noise: Any) -> None:
    """The generator as it was after the row's last step: its saved state, then one
    draw (the diffusion's starting noise) per speech step after it."""
    start = 0
    if noise is not None:
        start, state = noise
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    for _ in range(int((toks[start:] == eng.audio_id).sum())):
        torch.randn(eng.speech.width, generator=gen)


def _stream_window(eng: Any, toks: np.ndarray, fed: torch.Tensor) -> torch.Tensor:
    """The latents (w, width) of the last stream_frames speech steps since the stream
    caches were last zeroed (the row's start or its last speech_end)."""
    ends = np.nonzero(toks == eng.end_id)[0]
    first = int(ends[-1]) + 1 if len(ends) else 0
    spoke = first + np.nonzero(toks[first:] == eng.audio_id)[0]
    window = eng.speech.stream_frames
    spoke = spoke if window is None else spoke[-window:]
    index = torch.as_tensor(spoke.astype(np.int64), device=fed.device)
    return fed.index_select(0, index)[:, : eng.speech.width]


def _rebuild_streams(eng: Any, slot: torch.Tensor, latents: torch.Tensor) -> None:
    """Run the decoder and the semantic encoder over `latents` in one call each,
    starting from the slot's zero caches, and keep the caches they leave."""
    from workers.engines.vibevoice.conv_stacks import run_stack

    m = eng.model.model
    sp = eng.speech
    scaled = latents[None].to(eng.dtype) / m.latent_scaling_factor - m.latent_bias_factor
    audio = run_stack(m.audio_tower.decoder, scaled.permute(0, 2, 1), sp.acoustic.at(slot))
    run_stack(m.semantic_tokenizer_encoder, audio, sp.semantic.at(slot))


def noise_state(row: Row) -> bytes | None:
    """The row's generator state when its speech step count is due for one."""
    if row.audio_tokens % NOISE_EVERY:
        return None
    return row.state.generator.get_state().numpy().tobytes()
