"""VibeVoiceEngine: the real model, through transformers.

This module owns running VibeVoice inside a worker: loading the model and processor
(`VibeVoiceForConditionalGeneration`, `VibeVoiceProcessor`) from a local folder or a hub
id in the HF format, refusing a checkpoint in the original microsoft/VibeVoice layout with
the command that converts it, checking each request and capping its length before it
joins the running set. The loop itself is the step engine (workers/engines/vibevoice/step.py):
rows join and leave at every step, and audio leaves as it is made.
torch and transformers are imported inside load(), so importing this module is cheap.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.engines.contract import EngineSpec, StepOutput
from workers.engines.row import Row
from workers.engines.vibevoice.prompt import check_script_text
from workers.wire.messages import (
    MAX_CFG_SCALE,
    MAX_INFERENCE_STEPS,
    MAX_VOICE_S,
    MIN_CFG_SCALE,
    SAMPLE_RATE,
    DeviceInfo,
    ErrorKind,
    PoolError,
    Request,
    StopReason,
)

log = logging.getLogger("vibevoice_pool.worker")

HOP_SAMPLES = 3200  # one audio token = 3200 samples = 0.133 s at 24 kHz
MAX_SPEAKERS = 4
MAX_STEPS = MAX_INFERENCE_STEPS
DEFAULT_RUNAWAY_FACTOR = 2.0  # microsoft's max_length_times


TOKENS_PER_S = SAMPLE_RATE / HOP_SAMPLES  # 7.5 audio tokens a second
RUNAWAY_FLOOR_S = 5.0  # the runaway cap never cuts a row before this much audio


def audio_tokens_for(seconds: float) -> int:
    """Audio tokens that fit in `seconds` (at least one)."""
    return max(1, int(seconds * SAMPLE_RATE // HOP_SAMPLES))


@dataclass(frozen=True)
class RowCap:
    """A row's two caps: the audio tokens it may make (`tokens`, ended with `reason`) and
    the decode steps it may act in (`steps`; on step index `steps` it ends before it
    acts, as microsoft's loop does, with `step_reason`)."""

    tokens: int
    reason: str  # a StopReason value
    steps: int = 1 << 30
    step_reason: str = StopReason.RUNAWAY_CAP.value


def row_cap(
    req: Request,
    *,
    prompt_tokens: int,
    runaway_factor: float = DEFAULT_RUNAWAY_FACTOR,
    context_limit: int = 1 << 30,
    scripted_end: bool = False,
) -> RowCap:
    """A row's caps.

    Steps: the runaway cap, `runaway_factor` x the longest of
      - the prompt in tokens, voice placeholders included (microsoft's
        `max_length_times` x the prompt length: with the default factor of 2 never
        tighter than microsoft's),
      - the script's estimated length in audio tokens (workers/wire/estimate.py), which a
        short prompt of a long script (Chinese) would otherwise cut,
      - and never under RUNAWAY_FLOOR_S, so that a short line can finish;
    a row that never emits EOS stops there and says so (StopReason.RUNAWAY_CAP), or
    where the model's context is full (StopReason.CONTEXT), whichever comes first.
    Audio tokens: the request's max_audio_s (StopReason.MAX_AUDIO) and, with
    `scripted_end` (the tiny model, whose random weights never choose EOS), the
    estimated length itself, as a stand-in for EOS (StopReason.ESTIMATE).
    Raises BAD_INPUT when the prompt alone fills the context."""
    if prompt_tokens >= context_limit:
        msg = f"the script is too long for the model's context ({context_limit} tokens)"
        raise PoolError(ErrorKind.BAD_INPUT, msg)
    est = max(req.est_audio_s, HOP_SAMPLES / SAMPLE_RATE)
    longest = max(
        prompt_tokens, est * TOKENS_PER_S, RUNAWAY_FLOOR_S * TOKENS_PER_S / runaway_factor
    )
    steps = [
        (math.ceil(runaway_factor * longest), StopReason.RUNAWAY_CAP.value),
        (context_limit - prompt_tokens, StopReason.CONTEXT.value),
    ]
    audio = [(audio_tokens_for(req.max_audio_s), StopReason.MAX_AUDIO.value)]
    if scripted_end:  # after the cap: an estimate the cap cut (the pool caps it) is the cap's
        audio.append((audio_tokens_for(est), StopReason.ESTIMATE.value))
    tokens, reason = min(audio, key=lambda c: c[0])  # the first wins a tie
    step_cap, step_reason = min(steps, key=lambda c: c[0])
    return RowCap(max(1, tokens), reason, max(1, step_cap), step_reason)


def direct_load(device: str) -> bool:
    """Whether a worker loads its weights straight onto its device: on a GPU, when
    accelerate (which transformers needs for a device map) is installed."""
    return device.startswith("cuda") and importlib.util.find_spec("accelerate") is not None


def load_weights(cls: Any, path: str, dtype: Any, attention: str, device: str = "") -> Any:
    """The model of `path`. With `device`, each weight goes from the file straight to
    it (a device map of one device): no copy of the whole model in host memory first,
    which N workers of VibeVoice-Large (18.7 GB each) loading at once would need.
    Should that fail for any reason but a bad checkpoint, it loads on the CPU (the
    caller moves it)."""
    kwargs = {"dtype": dtype, "attn_implementation": {"text_config": attention}}
    if device:
        try:
            return cls.from_pretrained(path, device_map={"": device}, **kwargs)
        except (OSError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 (the host-memory path still works)
            log.warning(
                "loading the weights straight onto %s failed (%r): loading on the CPU first",
                device,
                exc,
            )
    return cls.from_pretrained(path, **kwargs)


def attention_for(requested: str, device: str) -> tuple[str, str]:
    """The LM's attention implementation to load, and why. "auto" (and an explicit
    "flash_attention_2") take flash_attention_2 on a GPU where the flash-attn package
    is installed, as microsoft's demo does (it warns that SDPA may lower audio quality);
    elsewhere sdpa, with a log line that says why. Any other name is loaded as given."""
    if requested not in ("auto", "flash_attention_2"):
        return requested, "as configured"
    if not device.startswith("cuda"):
        why = "flash_attention_2 needs a GPU"
    elif importlib.util.find_spec("flash_attn") is None:
        why = "the flash-attn package is not installed"
    else:
        return "flash_attention_2", "flash-attn is installed (microsoft's demo runs it)"
    msg = f"attention: sdpa, not flash_attention_2 ({why})"
    if requested == "flash_attention_2":
        log.warning("%s; microsoft warns that sdpa may lower audio quality", msg)
    else:
        log.info("%s", msg)
    return "sdpa", why


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
    if not (math.isfinite(req.cfg_scale) and MIN_CFG_SCALE <= req.cfg_scale <= MAX_CFG_SCALE):
        raise bad(
            f"cfg_scale must be in [{MIN_CFG_SCALE:g}, {MAX_CFG_SCALE:g}], got {req.cfg_scale}"
        )
    if not (math.isfinite(req.max_audio_s) and req.max_audio_s > 0):
        raise bad(f"max_audio_s must be positive, got {req.max_audio_s}")


class VibeVoiceEngine:
    """The Engine protocol over transformers' VibeVoice (workers/engines/contract.py)."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.is_tiny = False
        self.steps: Any = (
            None  # the step engine (workers/engines/vibevoice/step.py), made by load()
        )
        self.attention = ""  # the LM's attention implementation load() chose

    # ---- load ---------------------------------------------------------------------
    def load(self) -> DeviceInfo:
        import torch
        from transformers import VibeVoiceForConditionalGeneration, VibeVoiceProcessor
        from transformers.utils import logging as hf_logging

        from workers.checkpoints.convert import refusal_for
        from workers.checkpoints.tiny import TINY_NOTE, is_tiny_model

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
        self.attention, _ = attention_for(spec.attn_implementation, self.device)
        try:
            self.processor = VibeVoiceProcessor.from_pretrained(spec.model_path)
            model = load_weights(
                VibeVoiceForConditionalGeneration,
                spec.model_path,
                dtype,
                self.attention,
                self.device if direct_load(self.device) else "",
            )
        except (OSError, ValueError) as exc:
            msg = f"cannot load a VibeVoice model from {spec.model_path!r}: {exc}"
            raise PoolError(ErrorKind.BAD_INPUT, msg) from exc
        self.model = model.to(self.device).eval()
        from workers.engines.vibevoice.prompt import ProcessorPrompts
        from workers.engines.vibevoice.row_memory import MIB
        from workers.engines.vibevoice.step import StepEngine

        self.steps = StepEngine(
            self.model,
            self.device,
            spec.max_batch_size,
            ProcessorPrompts(self.processor),
            mem_budget_bytes=int(spec.mem_budget_mb * MIB),
            mem_headroom_bytes=int(spec.mem_headroom_mb * MIB),
            gpu_share=spec.gpu_share,
            head_compile=spec.head_compile,
            engine_mode=spec.engine_mode,
        )
        with torch.no_grad():  # graphs mode: every bucket's graphs made before serving
            self.steps.speech.capture(spec.inference_steps, spec.max_batch_size)
        self.is_tiny = os.path.isdir(spec.model_path) and is_tiny_model(spec.model_path)
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(0)
            name, mem = torch.cuda.get_device_name(0), int(props.total_memory)
        else:
            name, mem = "CPU", _physical_memory()
        dtype_name = str(dtype).replace("torch.", "")
        note = TINY_NOTE if self.is_tiny else f"{spec.model_path} ({dtype_name}, {self.attention})"
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

    # ---- the step contract (workers/engines/contract.py) -------------------------
    @property
    def live(self) -> int:
        return self.steps.live if self.steps is not None else 0

    @property
    def max_rows(self) -> int:
        return self.steps.max_rows if self.steps is not None else self.spec.max_batch_size

    def prepare(self, req: Request) -> Row:
        if self.steps is None:
            raise PoolError(ErrorKind.ENGINE_ERROR, "prepare() before load()")
        check_request(req)
        prompt = self.steps.prompts.length(req)
        cap = self._caps(req, prompt)
        return self.steps.prepare(
            req, cap.tokens, cap.steps, cap.reason, cap.step_reason, prompt_len=prompt
        )

    def fits(self, row: Row) -> bool:
        return self.steps.fits(row)

    def admit(self, row: Row) -> None:
        """Raises PoolError(OUT_OF_MEMORY) when a resumed row's rebuild does not fit:
        that row fails as out of memory (StepHost._join), the others go on."""
        import torch

        try:
            self.steps.admit(row)
        except torch.cuda.OutOfMemoryError:
            raise PoolError(
                ErrorKind.OUT_OF_MEMORY,
                "out of device memory while resuming this request; send it again",
            ) from None

    def execute(self) -> StepOutput:
        import torch

        from workers.engines.vibevoice.step import OOM_ALONE

        out = StepOutput()
        try:
            self.steps.step(out)
        except torch.cuda.OutOfMemoryError:
            out.out_of_memory = OOM_ALONE  # what the step handed out before still counts
        return out

    def cancel(self, request_id: str) -> Row | None:
        return self.steps.cancel(request_id)

    def reset(self) -> list[Row]:
        return self.steps.reset() if self.steps is not None else []

    def _caps(self, req: Request, prompt_tokens: int) -> RowCap:
        """The row's caps (row_cap) for this model: its context and, for the tiny model,
        the scripted end at the estimated length."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", 1 << 30)
        return row_cap(
            req,
            prompt_tokens=prompt_tokens,
            runaway_factor=self.spec.runaway_factor,
            context_limit=limit,
            scripted_end=self.is_tiny,
        )


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


__all__ = ["RowCap", "VibeVoiceEngine", "check_request", "row_cap"]
