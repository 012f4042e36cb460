"""The parent's end of voice keeping: one worker's request queue, voices sent once.

Owns: which read-only voice samples (the presets) one worker process keeps,
mirroring the worker's VoiceCache (the last KEPT_VOICES sent, first in first
out). A sample seen for the first time goes as KeptVoice; the same array
object later goes as VoiceRef, so a preset's samples cross the queue once per
worker process instead of with every request. Writable arrays (uploads) are
sent as they are. A respawned worker gets a new VoiceSender.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import replace
from typing import Callable

import numpy as np

from workers.wire import messages as m


class VoiceSender:
    def __init__(self, put: Callable[[object], None], size: int = m.KEPT_VOICES):
        self._put = put
        self.size = size
        self._order: collections.deque[int] = collections.deque()  # keys, oldest first
        self._by_id: dict[int, tuple[weakref.ref, int]] = {}  # id(array) -> (its ref, key)
        self._next_key = 0

    def __call__(self, msg) -> None:
        if isinstance(msg, m.Synthesize) and any(_keepable(v) for v in msg.request.voices):
            voices = tuple(self._voice(v) for v in msg.request.voices)
            msg = replace(msg, request=replace(msg.request, voices=voices))
        self._put(msg)

    def _voice(self, samples):
        if not _keepable(samples):
            return samples
        known = self._by_id.get(id(samples))
        if known is not None and known[0]() is samples and known[1] in self._order:
            return m.VoiceRef(known[1])
        key, self._next_key = self._next_key, self._next_key + 1
        self._order.append(key)
        self._by_id[id(samples)] = (weakref.ref(samples), key)
        if len(self._order) > self.size:
            gone = self._order.popleft()
            for ident in [i for i, (_, k) in self._by_id.items() if k == gone]:
                del self._by_id[ident]
        return m.KeptVoice(key, samples)


def _keepable(samples) -> bool:
    """Only an array nobody can write to may be named by its identity."""
    return isinstance(samples, np.ndarray) and not samples.flags.writeable
