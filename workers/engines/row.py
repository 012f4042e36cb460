"""One request while it runs in the step engine: what it has made and sent.

A Row is engine-neutral bookkeeping (the VibeVoice step engine and the
simulator both use it): the request, its audio-token budget and step cap, the
audio held back for a non-streamed row, the samples a resumed row must skip,
and how it ended. Model state lives with the engine: its KV blocks in
vibevoice/paged_kv.py (the row's state names them), its stream caches in
vibevoice/caches.py, at the row's slot.

What crosses out is only through the sink (the step's contract.StepOutput):
    sink.chunk(request_id, pcm[, history])
                                  float32 mono audio at 24 kHz, in order, with the
                                  row's history since the last chunk (a HistoryDelta)
    sink.finish(request_id, why)  the row ended on its own (EOS or its cap)
    sink.fail(request_id, err)    the row ended with a typed PoolError
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.engines.trail import Trail
from workers.wire.messages import PoolError, Request

HELD_TOKENS = 8  # a non-streamed row sends its audio every 8 tokens (~1.07 s)


@dataclass
class Row:
    request: Request
    budget_tokens: int  # audio tokens this row may make (max_audio_s, the tiny model's length)
    max_steps: int  # decode steps that may act: on step index max_steps the row ends unacted
    cap_reason: str = "eos"  # the StopReason of a row that reaches its audio budget
    step_reason: str = "runaway_cap"  # the StopReason of a row that reaches max_steps
    skip: int = 0  # samples a rerun makes again that the listener already has
    slot: int = -1  # its place in the stream caches (vibevoice/caches.py StreamSlots)
    steps: int = 0
    audio_tokens: int = 0
    sent_samples: int = 0
    made_samples: int = 0  # audio made so far, skipped or not
    closed: bool = False
    held: list[np.ndarray] = field(default_factory=list)
    state: Any = None  # engine-owned per-row state (generator, pending embeds, ...)
    trail: Trail | None = None  # its history as it is made (engines/trail.py)
    joined_at: int = 0  # its step count when it last joined an engine (preemption policy)

    @property
    def id(self) -> str:
        return self.request.id

    def add_audio(self, pcm: np.ndarray, sink: Any, counted: bool = False) -> None:
        """A streamed row sends every step's audio; others about a second at a time,
        enough for progress and the scheduler's accounting. `counted`: the engine
        already counted this audio token (it hands the samples over a step later)."""
        if not counted:
            self.audio_tokens += 1
        self.made_samples += len(pcm)
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
            send(sink, self.id, pcm, self.trail, self.made_samples)
            self.sent_samples += len(pcm)

    def hand_back(self, sink: Any) -> None:
        """It leaves before its end (preempted, moved): what it holds goes out with its
        history."""
        self._flush(sink)
        self.closed = True

    @property
    def out_of_budget(self) -> bool:
        """It made all the audio it may (its max_audio_s, or the tiny model's scripted end)."""
        return self.audio_tokens >= self.budget_tokens

    def finish(self, sink: Any, stop_reason: str = "eos") -> None:
        self._flush(sink)
        self.closed = True
        sink.finish(self.id, stop_reason)

    def fail(self, sink: Any, error: PoolError) -> None:
        self.held = []
        self.closed = True
        sink.fail(self.id, error)

    @property
    def covered(self) -> int:
        """Samples of its audio the listener has or will have: what a rerun from the start
        (the same seed makes the same audio) must skip. Held audio is not covered: it
        was never sent."""
        return self.made_samples - sum(len(p) for p in self.held) + self.skip


def send(sink: Any, request_id: str, pcm, trail: Trail | None, made: int) -> None:
    """One chunk, with the row's history since its last chunk when it keeps one."""
    delta = trail.take(made) if trail is not None else None
    if delta is None:
        sink.chunk(request_id, pcm)
    else:
        sink.chunk(request_id, pcm, delta)
