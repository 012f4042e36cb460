"""The worker's end of voice keeping: the samples its parent sent to keep.

Owns: the last KEPT_VOICES KeptVoice samples received, first in first out (the
parent's VoiceSender mirrors this exactly). Crossing its border: a Request
whose voices may hold KeptVoice and VoiceRef in, the same Request with plain
arrays out.
"""

from __future__ import annotations

import collections
from dataclasses import replace

from workers.wire import messages as m


class VoiceCache:
    def __init__(self, size: int = m.KEPT_VOICES):
        self.size = size
        self._kept: collections.OrderedDict[int, object] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def resolve(self, request: m.Request) -> m.Request:
        """`request` with plain samples; PoolError(ENGINE_ERROR) for a key never kept."""
        if not any(isinstance(v, (m.KeptVoice, m.VoiceRef)) for v in request.voices):
            return request
        return replace(request, voices=tuple(self._one(v, request.id) for v in request.voices))

    def _one(self, voice, rid: str):
        if isinstance(voice, m.KeptVoice):
            self._kept.pop(voice.key, None)  # a key sent again is the newest again
            self._kept[voice.key] = voice.samples
            if len(self._kept) > self.size:
                self._kept.popitem(last=False)
            return voice.samples
        if isinstance(voice, m.VoiceRef):
            samples = self._kept.get(voice.key)
            if samples is None:
                raise m.PoolError(
                    m.ErrorKind.ENGINE_ERROR,
                    f"request {rid}: voice {voice.key} was never kept by this worker "
                    "(the parent and the worker disagree about kept voices: a bug)",
                )
            return samples
        return voice
