"""VibeVoiceEngine: the real model, through transformers.

This module owns running VibeVoice inside a worker: loading the model and processor
(`VibeVoiceForConditionalGeneration`, `VibeVoiceProcessor`) from a local folder or a hub
id in the HF format, refusing a checkpoint in the original microsoft/VibeVoice layout with
the command that converts it, checking each request before it joins a batch, building one
batched processor call, seeding, capping lengths, and splitting a batch that runs out of
CUDA memory. Audio leaves while it is generated (see workers/vibevoice_stream.py).
torch and transformers are imported inside load(), so importing this module is cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.engine import BatchSink, EngineSpec
from workers.messages import (
    SAMPLE_RATE,
    DeviceInfo,
    ErrorKind,
    PoolError,
    Request,
    StopReason,
)
from workers.vibevoice_prompt import build_inputs, check_script_text

HOP_SAMPLES = 3200  # one audio token = 3200 samples = 0.133 s at 24 kHz
MAX_SPEAKERS = 4
MAX_VOICE_S = 120.0
MAX_STEPS = 100
MAX_CFG = 10.0
DEFAULT_RUNAWAY_FACTOR = 2.0  # microsoft's max_length_times


def audio_tokens_for(seconds: float) -> int:
    """Audio tokens that fit in `seconds` (at least one)."""
    return max(1, int(seconds * SAMPLE_RATE // HOP_SAMPLES))


@dataclass(frozen=True)
class RowCap:
    """Audio tokens a row may make, and the stop reason a row that reaches them gets."""

    tokens: int
    reason: str  # a StopReason value


def row_cap(
    req: Request,
    *,
    runaway_factor: float = DEFAULT_RUNAWAY_FACTOR,
    context_limit: int = 1 << 30,
    scripted_end: bool = False,
) -> RowCap:
    """A row's length cap in audio tokens: the smallest of
    - the runaway cap, `runaway_factor` x the script's estimated length (microsoft's
      `max_length_times`, there a multiple of the prompt length): a row that never emits
      EOS stops here and says so (StopReason.RUNAWAY_CAP);
    - the request's max_audio_s (StopReason.MAX_AUDIO);
    - the room left in the model's context after the prompt (StopReason.CONTEXT);
    - with `scripted_end` (the tiny model, whose random weights never choose EOS), the
      estimated length itself, as a stand-in for EOS (StopReason.ESTIMATE).
    Raises BAD_INPUT when the prompt alone fills the context."""
    # A byte-level BPE never makes more tokens than UTF-8 bytes: a safe upper bound.
    prompt = 64 + sum(len(t.text.encode("utf-8")) + 8 for t in req.turns)
    prompt += sum(math.ceil(len(v) / HOP_SAMPLES) + 8 for v in req.voices if v is not None)
    if prompt >= context_limit:
        msg = f"the script is too long for the model's context ({context_limit} tokens)"
        raise PoolError(ErrorKind.BAD_INPUT, msg)
    est = max(req.est_audio_s, HOP_SAMPLES / SAMPLE_RATE)
    caps = [
        (audio_tokens_for(runaway_factor * est), StopReason.RUNAWAY_CAP.value),
        (audio_tokens_for(req.max_audio_s), StopReason.MAX_AUDIO.value),
        (context_limit - prompt, StopReason.CONTEXT.value),
    ]
    if scripted_end:
        caps.insert(0, (audio_tokens_for(est), StopReason.ESTIMATE.value))
    tokens, reason = min(caps, key=lambda c: c[0])  # the first wins a tie
    return RowCap(max(1, tokens), reason)


def batch_seed(rows: Sequence[Request]) -> int:
    """One seed for a batch: a row's own seed alone, else a fixed mix of all in order."""
    if len({r.seed for r in rows}) == 1:
        return int(rows[0].seed) % (2**63)
    mixed = 0
    for r in rows:
        mixed = (mixed * 1_000_003 + int(r.seed)) % (2**63)
    return mixed


def check_request(req: Request) -> None:
    """Raise PoolError(BAD_INPUT) when a row cannot run; the message says what to fix."""

    def bad(msg: str) -> PoolError:
        return PoolError(ErrorKind.BAD_INPUT, msg)

    if not req.turns:
        raise bad("the script is empty: give at least one speaker turn")
    check_script_text(req)
    for n, turn in enumerate(req.turns, 1):
        if not 0 <= turn.speaker < MAX_SPEAKERS:
            raise bad(f"turn {n}: speaker {turn.speaker + 1} is out of range (1-{MAX_SPEAKERS})")
        if not turn.text or not turn.text.strip():
            raise bad(f"turn {n} (speaker {turn.speaker + 1}) has no text")
    if len(req.voices) > MAX_SPEAKERS:
        raise bad(f"{len(req.voices)} voices given; VibeVoice takes at most {MAX_SPEAKERS}")
    for i, voice in enumerate(req.voices):
        if voice is None:
            continue
        arr = np.asarray(voice)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
            raise bad(f"voice of speaker {i + 1} must be a non-empty mono float array")
        if arr.size > MAX_VOICE_S * SAMPLE_RATE:
            raise bad(f"voice of speaker {i + 1} is longer than {MAX_VOICE_S:.0f} s")
        if not np.all(np.isfinite(arr)):
            raise bad(f"voice of speaker {i + 1} holds NaN or infinite samples")
    if not 1 <= req.inference_steps <= MAX_STEPS:
        raise bad(f"inference_steps must be 1-{MAX_STEPS}, got {req.inference_steps}")
    if not (math.isfinite(req.cfg_scale) and 0 < req.cfg_scale <= MAX_CFG):
        raise bad(f"cfg_scale must be in (0, {MAX_CFG:g}], got {req.cfg_scale}")
    if not (math.isfinite(req.max_audio_s) and req.max_audio_s > 0):
        raise bad(f"max_audio_s must be positive, got {req.max_audio_s}")


class VibeVoiceEngine:
    """The Engine protocol over transformers' VibeVoice (see workers/engine.py)."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.is_tiny = False
        self.keep_text_cfg = False  # see _drop_text_cfg
        self.noise: Any = None  # per-row diffusion noise (workers/vibevoice_noise.py)

    # ---- load ---------------------------------------------------------------------
    def load(self) -> DeviceInfo:
        import torch
        from transformers import VibeVoiceForConditionalGeneration, VibeVoiceProcessor
        from transformers.utils import logging as hf_logging

        from workers.convert import refusal_for
        from workers.tiny import TINY_NOTE, is_tiny_model

        # N workers' "Loading weights" bars would interleave in one log, and each
        # bar takes a multiprocessing lock that a killed worker leaks.
        hf_logging.disable_progress_bar()
        spec = self.spec
        if not spec.model_path:
            raise PoolError(ErrorKind.BAD_INPUT, "no model path: pass --model_path DIR or a hub id")
        refusal = refusal_for(spec.model_path)
        if refusal:
            raise PoolError(ErrorKind.BAD_INPUT, refusal)
        if spec.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise PoolError(
                    ErrorKind.UNAVAILABLE, "a CUDA worker was asked for, but torch sees no GPU"
                )
            self.device = "cuda:0"
        else:
            self.device = "cpu"
            if spec.torch_threads > 0:
                torch.set_num_threads(spec.torch_threads)
        dtype = self._dtype(torch)
        try:
            self.processor = VibeVoiceProcessor.from_pretrained(spec.model_path)
            model = VibeVoiceForConditionalGeneration.from_pretrained(
                spec.model_path,
                dtype=dtype,
                attn_implementation={"text_config": spec.attn_implementation},
            )
        except (OSError, ValueError) as exc:
            msg = f"cannot load a VibeVoice model from {spec.model_path!r}: {exc}"
            raise PoolError(ErrorKind.BAD_INPUT, msg) from exc
        self.model = model.to(self.device).eval()
        if not self.keep_text_cfg:
            _drop_text_cfg(self.model)
        from workers.vibevoice_noise import RowNoise

        self.noise = RowNoise(self.model)
        self.noise.install()
        self.is_tiny = os.path.isdir(spec.model_path) and is_tiny_model(spec.model_path)
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(0)
            name, mem = torch.cuda.get_device_name(0), int(props.total_memory)
        else:
            name, mem = "CPU", _physical_memory()
        dtype_name = str(dtype).replace("torch.", "")
        note = TINY_NOTE if self.is_tiny else f"{spec.model_path} ({dtype_name})"
        return DeviceInfo(self.device, name, mem, spec.max_batch_size, "vibevoice", note)

    def _dtype(self, torch: Any) -> Any:
        wanted = self.spec.dtype
        if wanted in ("", "auto"):
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if wanted not in ("bfloat16", "float16", "float32"):
            raise PoolError(
                ErrorKind.BAD_INPUT, f"unknown dtype {wanted!r}: auto|bfloat16|float16|float32"
            )
        return getattr(torch, wanted)

    # ---- synthesize ---------------------------------------------------------------
    def synthesize(self, batch: Sequence[Request], sink: BatchSink) -> None:
        if self.model is None:
            raise PoolError(ErrorKind.ENGINE_ERROR, "synthesize() before load()")
        from workers.vibevoice_stream import RowState

        rows: list[RowState] = []
        for req in batch:
            try:
                check_request(req)
                cap = self._budget_tokens(req)
            except PoolError as err:
                sink.fail(req.id, err)
                continue
            if sink.cancelled(req.id):
                sink.fail(req.id, PoolError(ErrorKind.CANCELLED, "cancelled before it started"))
                continue
            rows.append(RowState(req, cap.tokens, cap_reason=cap.reason))
        # One generate call runs one cfg_scale and one step count: group rows that share them.
        groups: dict[tuple[int, float], list[RowState]] = {}
        for row in rows:
            key = (row.request.inference_steps, row.request.cfg_scale)
            groups.setdefault(key, []).append(row)
        for group in groups.values():
            self._run_splitting(group, sink)

    def _budget_tokens(self, req: Request) -> RowCap:
        """The row's cap (row_cap) for this model: its context and, for the tiny model, the
        scripted end at the estimated length."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", 1 << 30)
        return row_cap(
            req,
            runaway_factor=self.spec.runaway_factor,
            context_limit=limit,
            scripted_end=self.is_tiny,
        )

    def _run_splitting(self, rows: list, sink: BatchSink) -> None:
        """Run rows as one batch; on CUDA out-of-memory, halve and retry. Per-row noise
        (vibevoice_noise.py) makes a rerun's audio the same, so a row that already sent
        audio resumes where it was."""
        import torch

        try:
            self._generate(rows, sink)
            return
        except torch.cuda.OutOfMemoryError:
            pass
        self._free_memory()
        pending = [r for r in rows if not r.closed]
        for r in pending:  # a retry starts from nothing; what was sent is skipped
            r.restart()
        if len(pending) == 1 and len(rows) == 1:
            oom = (
                "out of GPU memory for this request alone: shorten the script or the voice "
                "samples, or lower max_audio_s"
            )
            pending[0].fail(sink, PoolError(ErrorKind.OUT_OF_MEMORY, oom))
            return
        half = (len(pending) + 1) // 2
        for part in (pending[:half], pending[half:]):
            if part:
                self._run_splitting(part, sink)

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate(self, rows: list, sink: BatchSink) -> None:
        import torch
        from transformers import StoppingCriteriaList

        from workers.vibevoice_stream import BatchStreamer

        requests = [r.request for r in rows]
        # microsoft's prompt format, padded on the left (workers/vibevoice_prompt.py)
        prompt = build_inputs(self.processor, requests, device=self.device, dtype=self.model.dtype)
        inputs = prompt.inputs
        prompt_len = prompt.width
        # Room for non-audio tokens (segment starts/ends) on top of the longest audio cap.
        max_new = max(r.budget_tokens for r in rows)
        max_new = max_new + 8 + max_new // 16
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if limit:
            max_new = min(max_new, limit - prompt_len)
            if max_new < 1:
                for r in rows:
                    too_long = "the script and voice samples fill the model's whole context"
                    r.fail(sink, PoolError(ErrorKind.BAD_INPUT, too_long))
                return
        config = self.model.config
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(config.eos_token_id)
        streamer = BatchStreamer(
            rows,
            sink,
            audio_token_id=config.audio_token_id,
            eos_token_ids=eos_ids,
            prompt_len=prompt_len,
            max_new_tokens=max_new,
        )
        req0 = requests[0]
        torch.manual_seed(batch_seed(requests))
        if self.noise is not None and self.noise.installed:
            self.noise.start([r.seed for r in requests], prompt.voice_rows, prompt.voice_tokens)
        streamer.attach(self.model)
        try:
            with torch.inference_mode():
                self.model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    num_diffusion_steps=req0.inference_steps,
                    guidance_scale=req0.cfg_scale,
                    stopping_criteria=StoppingCriteriaList([streamer]),
                )
        finally:
            streamer.detach()
            if self.noise is not None:
                self.noise.stop()
        for r in rows:  # every row ends inside generate; this is a guard, not a path
            if not r.closed:
                r.finish(sink)


def _drop_text_cfg(model: Any) -> None:
    """Keep VibeVoice's classifier-free guidance on the diffusion head only.

    In transformers 5.23 the guidance scale that VibeVoice's diffusion sampling reads is the
    generation config's `guidance_scale`, and any value other than 1 also makes `generate`
    add an `UnbatchedClassifierFreeGuidanceLogitsProcessor`: a second language-model pass
    per step whose output only re-weights the audio/EOS token choice. The original model
    guides the diffusion head only, so the extra pass is dropped (by type).
    """
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


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


__all__ = ["RowCap", "VibeVoiceEngine", "check_request", "row_cap"]
