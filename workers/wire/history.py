"""A row's history: what an engine needs to rebuild a row at its last step.

VibeVoice feeds its own audio back into the language model, so a row's history
is more than its tokens: for each step, the token it drew and, for a speech
step, what that step fed back (the acoustic latent and the semantic features;
`width` float32 values, zeros for a step that did not speak), and now and then
the state of the row's noise generator. The simulator's feedback is empty
(width 0): its tokens and sample count are all it needs.

    worker (engines/trail.py Trail)             parent (pool/dispatcher.py)
    -------------------------------             ---------------------------
    each Chunk carries a HistoryDelta    -->    HistoryLog.extend(delta)
      the steps since the last chunk            (a durable job also writes it
                                                 beside its audio)
    Request.resume: History              <--    HistoryLog.snapshot() when the
      a resumed row starts from it               request is sent again

Everything is bytes (int32 tokens, float32 feedback), never lists of floats:
about 0.8 KB a step for VibeVoice-1.5B, against 12.8 KB of audio.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

TOKEN = np.dtype("<i4")
VALUE = np.dtype("<f4")


@dataclass(frozen=True)
class HistoryDelta:
    """The steps [start, start + steps) of a row, sent with one chunk."""

    start: int  # the index of the first step here (0 = the row's first step)
    tokens: bytes  # int32 per step
    feedback: bytes  # float32, width per step
    width: int
    samples: int  # audio samples the row had made at the end of these steps
    noise: tuple[int, bytes] | None = None  # (steps, generator state) after that step

    @property
    def steps(self) -> int:
        return len(self.tokens) // TOKEN.itemsize


@dataclass(frozen=True)
class History:
    """A row's whole history up to a step: what a resumed request carries."""

    tokens: bytes
    feedback: bytes
    width: int
    samples: int
    noise: tuple[int, bytes] | None = None  # the latest generator state: (steps, state)

    @property
    def steps(self) -> int:
        return len(self.tokens) // TOKEN.itemsize

    def token_array(self) -> np.ndarray:
        return np.frombuffer(self.tokens, dtype=TOKEN)

    def feedback_array(self) -> np.ndarray:
        """(steps, width) float32."""
        return np.frombuffer(self.feedback, dtype=VALUE).reshape(self.steps, self.width)

    @property
    def nbytes(self) -> int:
        return len(self.tokens) + len(self.feedback) + (len(self.noise[1]) if self.noise else 0)


class HistoryLog:
    """The parent's copy of a row's history, grown chunk by chunk. A delta that
    starts past its end (a chunk lost) is refused; one that starts before it (a row
    replayed from its start makes the same steps again) adds only what is new."""

    def __init__(self, base: History | None = None):
        self._lock = threading.Lock()  # extended by the dispatcher, read by a job's saver
        self.tokens = bytearray(base.tokens if base else b"")
        self.feedback = bytearray(base.feedback if base else b"")
        self.width = base.width if base else -1
        self.samples = base.samples if base else 0
        self.noise = base.noise if base else None

    @property
    def steps(self) -> int:
        return len(self.tokens) // TOKEN.itemsize

    def extend(self, delta: HistoryDelta) -> bool:
        """Add what `delta` has past this log's end; False when it cannot join."""
        with self._lock:
            return self._extend(delta)

    def _extend(self, delta: HistoryDelta) -> bool:
        have = self.steps
        if delta.start > have or (self.width >= 0 and delta.width != self.width):
            return False
        skip = have - delta.start
        if skip >= delta.steps:
            return True  # nothing new
        self.width = delta.width
        self.tokens += delta.tokens[skip * TOKEN.itemsize :]
        self.feedback += delta.feedback[skip * delta.width * VALUE.itemsize :]
        self.samples = delta.samples
        if delta.noise is not None:
            self.noise = delta.noise
        return True

    def since(self, step: int) -> HistoryDelta | None:
        """The steps from `step` to its end as one piece (None when it has none past
        `step`): a reader that keeps the history elsewhere (a job's progress on disk)
        copies what is new, not the row's whole history each time."""
        with self._lock:
            if self.steps <= step:
                return None
            width = max(0, self.width)
            return HistoryDelta(
                step,
                bytes(self.tokens[step * TOKEN.itemsize :]),
                bytes(self.feedback[step * width * VALUE.itemsize :]),
                width,
                self.samples,
                self.noise,
            )

    def snapshot(self) -> History | None:
        with self._lock:
            if not self.steps:
                return None
            return History(
                bytes(self.tokens),
                bytes(self.feedback),
                max(0, self.width),
                self.samples,
                self.noise,
            )
