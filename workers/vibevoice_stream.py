"""Streaming out of transformers' VibeVoice generation, step by step.

This module owns the per-step glue between `VibeVoiceForConditionalGeneration.generate`
and a BatchSink. It hooks two public, documented extension points and nothing private:

- a forward hook (`nn.Module.register_forward_hook`) on `model.model.audio_tower.decoder`.
  In transformers' VibeVoice `_sample` loop the acoustic decoder runs exactly once per
  step in which some row drew an audio token, on the whole batch; the hook keeps that
  step's waveform (batch, 1, 3200).
- a `StoppingCriteria` passed to `generate(stopping_criteria=...)`. The loop calls it once
  per step, after that step's audio was decoded, with the token ids so far. It is where
  each row's new audio leaves through `sink.chunk`, where `sink.step()` proves progress,
  where cancellation is read (`sink.cancelled`), and where a row that ended (EOS, its own
  length cap, the global cap) is finished at once, while the others go on. Returning True
  for a row is what stops it; when every row is done, generation stops.

A row's audio in a step is the decoded waveform of the rows that the loop sent through the
diffusion head: those still running whose new token is the audio token. Rows we stop are
exactly the rows the loop stops, because our criterion covers every reason the built-in
ones have (EOS, max length), so the two views of "still running" never differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.messages import ErrorKind, PoolError, Request

try:  # transformers is imported lazily by the engine; this module is only used after that.
    from transformers import StoppingCriteria
except ImportError:  # pragma: no cover - the engine cannot run without transformers anyway
    StoppingCriteria = object  # type: ignore[assignment,misc]


HELD_TOKENS = 8  # a non-streamed row sends its audio every 8 tokens (~1.07 s)


@dataclass
class RowState:
    """One request of a running batch: its cap, what it has sent, whether it is closed."""

    request: Request
    budget_tokens: int
    audio_tokens: int = 0
    sent_samples: int = 0
    closed: bool = False
    held: list[np.ndarray] = field(default_factory=list)  # audio not sent yet
    skip: int = 0  # samples a rerun makes again that were already sent (see restart())
    cap_reason: str = "eos"  # the StopReason of a row that reaches budget_tokens

    @property
    def id(self) -> str:
        return self.request.id

    def add_audio(self, pcm: np.ndarray, sink: Any) -> None:
        """A streamed row sends every step's audio; others send about a second at a time,
        which is enough for progress and the scheduler's accounting."""
        self.audio_tokens += 1
        if self.skip:
            drop = min(self.skip, len(pcm))
            self.skip -= drop
            pcm = pcm[drop:]
            if not len(pcm):
                return
        self.held.append(pcm)
        if self.request.stream or len(self.held) >= HELD_TOKENS:
            self._flush(sink)

    def _flush(self, sink: Any) -> None:
        if self.held:
            pcm = np.concatenate(self.held)
            self.held = []
            sink.chunk(self.id, pcm)
            self.sent_samples += len(pcm)

    def restart(self) -> None:
        """The row runs again from its start (after a batch split): per-row noise makes
        the same audio, and what was already sent is skipped."""
        self.skip, self.sent_samples = self.sent_samples, 0
        self.audio_tokens, self.held = 0, []

    def finish(self, sink: Any, stop_reason: str = "eos") -> None:
        self._flush(sink)
        self.closed = True
        sink.finish(self.id, stop_reason)

    def fail(self, sink: Any, error: PoolError) -> None:
        self.held = []
        self.closed = True
        sink.fail(self.id, error)


class BatchStreamer(StoppingCriteria):
    """Per-step streaming, cancellation and row ends for one `generate` call."""

    def __init__(
        self,
        rows: list[RowState],
        sink: Any,
        *,
        audio_token_id: int,
        eos_token_ids: set[int],
        prompt_len: int,
        max_new_tokens: int,
    ):
        self.rows = rows
        self.sink = sink
        self.audio_token_id = audio_token_id
        self.eos_token_ids = eos_token_ids
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.steps = 0
        self._decoded = None
        self._hook = None

    # -- the decoder hook -------------------------------------------------------------
    def attach(self, model: Any) -> None:
        decoder = model.model.audio_tower.decoder
        self._hook = decoder.register_forward_hook(self._on_decoded)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_decoded(self, module: Any, args: Any, output: Any) -> None:
        self._decoded = output.audio

    # -- the stopping criterion -------------------------------------------------------
    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        self.sink.step()
        last = input_ids[:, -1].tolist()
        generated = input_ids.shape[1] - self.prompt_len
        decoded, self._decoded = self._decoded, None
        spoke = [i for i, row in enumerate(self.rows) if not row.closed]
        spoke = [i for i in spoke if last[i] == self.audio_token_id]
        pcm: dict[int, np.ndarray] = {}
        if spoke:
            if decoded is None:
                raise PoolError(
                    ErrorKind.ENGINE_ERROR,
                    "an audio token was drawn but no audio was decoded in that step: this "
                    "transformers version generates VibeVoice audio differently than expected",
                )
            block = decoded[spoke, 0, :].detach().float().cpu().numpy()
            pcm = {i: block[k] for k, i in enumerate(spoke)}

        done = []
        for i, row in enumerate(self.rows):
            if not row.closed:
                if self.sink.cancelled(row.id):
                    row.fail(self.sink, PoolError(ErrorKind.CANCELLED, "cancelled by the client"))
                else:
                    if i in pcm:
                        row.add_audio(pcm[i], self.sink)
                    if last[i] in self.eos_token_ids:
                        row.finish(self.sink, "eos")
                    elif row.audio_tokens >= row.budget_tokens or generated >= self.max_new_tokens:
                        row.finish(self.sink, row.cap_reason)
            done.append(row.closed)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
