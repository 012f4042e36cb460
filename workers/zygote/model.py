"""The model stack the zygote imports for VibeVoice workers (see workers/zygote/preload.py).

Everything `VibeVoiceEngine.load()` and a first `synthesize` import lazily is
imported here once, so a forked worker spends its boot on the checkpoint, not
on imports (about 3.5 s of imports on a 2-core machine). Imports and
pure-Python tables only: no tensor is made, no device is asked about. A module missing from this
transformers release is skipped: the worker then imports what it needs itself.
"""

from __future__ import annotations

import importlib
import time

import workers.zygote.preload  # noqa: F401  (thread-count variables first)

_T0 = time.monotonic()

import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

MODULES = (
    # load(): the model, its processor, the checkpoint reader
    "transformers.models.vibevoice.modeling_vibevoice",
    "transformers.models.vibevoice.processing_vibevoice",
    "transformers.models.vibevoice_acoustic_tokenizer.modeling_vibevoice_acoustic_tokenizer",
    "transformers.models.vibevoice_acoustic_tokenizer.feature_extraction_vibevoice_acoustic_tokenizer",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen2.tokenization_qwen2",
    "transformers.feature_extraction_sequence_utils",
    "transformers.modeling_layers",
    "transformers.generation.utils",
    "transformers.generation.logits_process",
    "transformers.generation.stopping_criteria",
    "safetensors.torch",
    "transformers.models.audioflamingo3",  # the processor's auto classes look it up
    # this project's engine
    "workers.engines.vibevoice.engine",
    "workers.engines.vibevoice.step",
    "workers.engines.vibevoice.audio",
    "workers.engines.vibevoice.caches",
    "workers.engines.vibevoice.paged_kv",
    "workers.engines.vibevoice.prompt",
    "workers.engines.vibevoice.noise",
    "workers.checkpoints.convert",
    "workers.checkpoints.tiny",
    "workers.engines.row",
)
# diffusers is not preloaded: the step engine computes the schedule of the scheduler
# VibeVoice checkpoints ship with itself (workers/engines/vibevoice/noise_schedule.py),
# and a worker imports diffusers after the fork only for another one. On a CUDA build
# its import asks torch which accelerator there is (diffusers.utils.torch_utils:
# torch.accelerator.is_available()), which loads the CUDA driver: seen on an H200
# (2026-12-04), where it left the zygote unfit to fork GPU workers.
NAMES = ("VibeVoiceForConditionalGeneration", "VibeVoiceProcessor", "Qwen2TokenizerFast")

missing: list[str] = []
for _name in MODULES:
    try:
        importlib.import_module(_name)
    except ImportError:
        missing.append(_name)
for _name in NAMES:  # transformers resolves these lazily: resolve them now
    try:
        getattr(transformers, _name)
    except (AttributeError, ImportError):
        missing.append(f"transformers.{_name}")

# transformers builds its table of checkpoint renamings (about 1,400 compiled
# patterns, pure Python) at a process's first from_pretrained: build it here
# once, and every forked worker inherits it.
try:
    from transformers import conversion_mapping

    conversion_mapping.get_checkpoint_conversion_mapping("vibevoice")
except (ImportError, AttributeError):
    missing.append("transformers.conversion_mapping")

IMPORT_S = time.monotonic() - _T0
