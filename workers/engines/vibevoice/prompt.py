"""VibeVoice prompts, token for token as microsoft/VibeVoice's processor builds them.

This module owns turning requests into the model's prefill inputs:

    prompt_ids(tokens, request)      -> the ids of one request's prompt (a list of ints)
    build_inputs(processor, requests) -> PromptBatch: left-padded input_ids and
                                         attention_mask, the voice samples (input_values,
                                         padding_mask) and which row owns each sample
    ProcessorPrompts(processor)      -> the step engine's prompt seam over the two

The format (microsoft's `VibeVoiceProcessor._process_single` and `_create_voice_prompt`;
each piece is encoded on its own and the ids are concatenated, as microsoft does):

    " Transform the text provided by various speakers into speech output, utilizing the
     distinct voice of each respective speaker.\\n"
    " Voice input:\\n"                                  only if some speaker has a sample
    " Speaker N:" <speech_start> <speech_diffusion> x ceil(samples / 3200) <speech_end> "\\n"
                                                       per speaker WITH a sample, by number
    " Text input:\\n"
    " Speaker N: <text>\\n"                             per turn; N 0-based; the text is
                                                       stripped at its ends, inner spaces kept,
                                                       "’" written "'" as microsoft's demos do
    " Speech output:\\n" <speech_start>

A speaker without a sample is simply left out of the voice section (no made-up voice).
Text is encoded as text: a special token's name written in a script ("<|vision_pad|>",
"<|endoftext|>") stays those characters, so the special ids appear only where the
format puts them.
Rows are padded on the LEFT whatever the checkpoint's tokenizer says (microsoft always
pads left; a right-padded row corrupts the shorter rows of a batch). The voice samples
are normalised to -25 dBFS by the checkpoint's feature extractor, as microsoft's
AudioNormalizer does. The step engine (workers/engines/vibevoice/step.py) calls build_inputs to
prefill the rows that join together; the tests' reference run of transformers'
`generate` (tests/vibevoice_reference.py) uses it too. Nothing here draws a random
number: the voice-latent noise is the row's own (workers/engines/vibevoice/noise.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from workers.wire.messages import SAMPLE_RATE, ErrorKind, PoolError, Request

HOP_SAMPLES = 3200  # samples per audio token (the acoustic tokenizer's compression)

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, "
    "utilizing the distinct voice of each respective speaker.\n"
)
VOICE_HEADER = " Voice input:\n"
TEXT_HEADER = " Text input:\n"
OUTPUT_HEADER = " Speech output:\n"


@dataclass(frozen=True)
class PromptTokens:
    """What prompt_ids needs from a tokenizer: an encode function and the special ids."""

    encode: Any  # str -> list[int], without special tokens added
    speech_start: int
    speech_end: int
    speech_diffusion: int
    pad: int

    @classmethod
    def from_processor(cls, processor: Any) -> PromptTokens:
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # split_special_tokens: a script that writes a special token's text
        # ("<|vision_pad|>") is read as that text, never as the token (a stray
        # speech_diffusion placeholder failed the prefill of every row joining it).
        return cls(
            encode=lambda text: tok.encode(
                text, add_special_tokens=False, split_special_tokens=True
            ),
            speech_start=int(processor.audio_bos_token_id),
            speech_end=int(processor.audio_eos_token_id),
            speech_diffusion=int(processor.audio_token_id),
            pad=int(pad),
        )


def voiced_speakers(req: Request) -> list[int]:
    """Speakers of the script that bring a voice sample, by number (the voice section's
    order, as microsoft's processor enumerates its voice samples)."""
    spoken = {t.speaker for t in req.turns}
    return [s for s in sorted(spoken) if s < len(req.voices) and req.voices[s] is not None]


def voice_tokens(samples: int) -> int:
    """Audio placeholder tokens for a voice sample of `samples` samples."""
    return math.ceil(samples / HOP_SAMPLES)


# What both of microsoft's demos (demo/gradio_demo.py, demo/inference_from_file.py) do
# to a script before its processor sees it ("defend against common mistake"): the
# typographic apostrophe of word processors and smart keyboards becomes the ASCII one.
# Left as it is, it reaches the model as other tokens (its three UTF-8 bytes in place
# of the "'" of "'t", "'s", ...), a prompt the demos never make.
DEMO_REPLACEMENTS = (("\u2019", "'"),)


def turn_text(text: str) -> str:
    """A turn's text as microsoft's demos and `_parse_script` pass it on: the demos'
    replacements made (DEMO_REPLACEMENTS), ends stripped, one leading space, inner
    whitespace as written."""
    for old, new in DEMO_REPLACEMENTS:
        text = text.replace(old, new)
    return " " + text.strip()


def prompt_ids(tokens: PromptTokens, req: Request) -> list[int]:
    """The ids of one request's prompt, exactly microsoft's format (module docstring)."""
    enc = tokens.encode
    ids = list(enc(SYSTEM_PROMPT))
    voiced = voiced_speakers(req)
    if voiced:
        ids += enc(VOICE_HEADER)
        for s in voiced:
            n = voice_tokens(len(req.voices[s]))
            ids += enc(f" Speaker {s}:")
            ids += [tokens.speech_start] + [tokens.speech_diffusion] * n + [tokens.speech_end]
            ids += enc("\n")
    ids += enc(TEXT_HEADER)
    for turn in req.turns:
        ids += enc(f" Speaker {turn.speaker}:{turn_text(turn.text)}\n")
    ids += enc(OUTPUT_HEADER) + [tokens.speech_start]
    return ids


def check_script_text(req: Request) -> None:
    """BAD_INPUT when a turn cannot be encoded as UTF-8 (a lone surrogate, say)."""
    for n, turn in enumerate(req.turns, 1):
        try:
            turn.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PoolError(
                ErrorKind.BAD_INPUT,
                f"turn {n}: the text holds a character that is not valid Unicode text "
                f"(position {exc.start}: a lone surrogate such as \\ud800); send UTF-8 text",
            ) from None


@dataclass
class PromptBatch:
    """Left-padded model inputs for a list of requests, plus what a caller needs to
    keep rows apart: each row's prompt length and which row owns each voice sample."""

    inputs: dict[str, Any]  # input_ids, attention_mask[, input_values, padding_mask]
    prompt_lens: list[int]
    voice_rows: list[int] = field(default_factory=list)  # row index of each voice sample
    voice_tokens: list[int] = field(default_factory=list)  # placeholder count of each

    @property
    def width(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def build_inputs(
    processor: Any,
    requests: Sequence[Request],
    *,
    tokens: PromptTokens | None = None,
    device: Any = None,
    dtype: Any = None,
) -> PromptBatch:
    """The prefill inputs of `requests`, one row each, padded on the left.

    input_values rows follow the requests in order, and within a request its voiced
    speakers by number: the order in which the model scatters them into the
    placeholders (row-major over input_ids). `dtype` applies to input_values.
    """
    import torch

    tokens = tokens or PromptTokens.from_processor(processor)
    rows = [prompt_ids(tokens, req) for req in requests]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokens.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    samples, owners, counts = [], [], []
    for i, req in enumerate(requests):
        for s in voiced_speakers(req):
            voice = np.asarray(req.voices[s], dtype=np.float32)
            samples.append(voice)
            owners.append(i)
            counts.append(voice_tokens(len(voice)))
    if samples:
        audio = processor.feature_extractor(
            samples, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt"
        )
        inputs["input_values"] = audio["input_values"]
        inputs["padding_mask"] = audio["padding_mask"]
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None and "input_values" in inputs:
        inputs["input_values"] = inputs["input_values"].to(dtype)
    return PromptBatch(inputs, [len(r) for r in rows], owners, counts)


__all__ = [
    "HOP_SAMPLES",
    "PromptBatch",
    "PromptTokens",
    "build_inputs",
    "check_script_text",
    "prompt_ids",
    "turn_text",
    "voice_tokens",
    "voiced_speakers",
]


class ProcessorPrompts:
    """The step engine's prompt seam (.length(request), .batch(requests, device, dtype))
    over a checkpoint's processor, as microsoft's processor builds the prompts."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokens = PromptTokens.from_processor(processor)

    def length(self, req: Request) -> int:
        return len(prompt_ids(self.tokens, req))

    def batch(self, requests: list[Request], device: Any, dtype: Any) -> PromptBatch:
        return build_inputs(
            self.processor, requests, tokens=self.tokens, device=device, dtype=dtype
        )
