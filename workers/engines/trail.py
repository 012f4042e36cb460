"""Trail: a row's history as its engine makes it, step by step (worker side).

The engine notes each step's token (`token`) and, for a speech step, what it fed
back (`feedback`, possibly a step later: on CUDA the values reach the host with
the audio); `take` hands the steps not sent yet, as one wire HistoryDelta, to the
chunk that carries their audio (Row._flush). Only whole steps go: a speech step
waits for its feedback, so a delta never gets ahead of the audio it rides with.
A resumed row's trail starts where its history ends.
"""

from __future__ import annotations

import numpy as np

from workers.wire.history import TOKEN, VALUE, History, HistoryDelta


class Trail:
    def __init__(self, width: int, speaks: int | None = None, start: int = 0):
        self.width = width  # feedback values per step (0: the engine feeds nothing back)
        self.speaks = speaks  # the token whose step feeds back (None: no step does)
        self.start = start  # the first step not sent yet
        self.tokens: list[int] = []  # steps start, start + 1, ...
        self.fed: dict[int, np.ndarray] = {}  # step -> feedback, until it is sent
        self.noise: tuple[int, bytes] | None = None  # the newest generator state not sent

    @classmethod
    def after(cls, history: History, speaks: int | None) -> Trail:
        return cls(history.width, speaks, start=history.steps)

    def token(self, tok: int) -> None:
        self.tokens.append(int(tok))

    def feedback(self, step: int, values, noise: bytes | None = None) -> None:
        """Step `step`'s (0-based) feedback; `noise`: the generator's state after it."""
        self.fed[step] = np.asarray(values, dtype=VALUE).reshape(self.width)
        if noise is not None:
            self.noise = (step + 1, noise)

    def take(self, samples: int) -> HistoryDelta | None:
        """The whole steps not sent yet (None if none); `samples`: the audio the row
        has made, which those steps cover."""
        n = 0
        for tok in self.tokens:
            if tok == self.speaks and self.width and self.start + n not in self.fed:
                break
            n += 1
        if not n:
            return None
        rows = np.zeros((n, self.width), dtype=VALUE)
        for k in range(n):
            got = self.fed.pop(self.start + k, None)
            if got is not None:
                rows[k] = got
        noise = self.noise if self.noise and self.noise[0] <= self.start + n else None
        if noise is not None:
            self.noise = None
        delta = HistoryDelta(
            self.start,
            np.asarray(self.tokens[:n], dtype=TOKEN).tobytes(),
            rows.tobytes(),
            self.width,
            samples,
            noise,
        )
        del self.tokens[:n]
        self.start += n
        return delta
