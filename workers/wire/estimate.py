"""How much audio a script makes, before any model has run.

The parent uses it to size work for the scheduler; the SimEngine uses it as
the length of the tone it returns. Both sides must agree, so it lives here.
"""

from __future__ import annotations

# Conversational English runs at about 150 words a minute, ~14-15 characters
# a second including spaces; the dispatcher corrects this by what it measures.
CHARS_PER_AUDIO_SECOND = 15.0
MIN_AUDIO_S = 0.5


def audio_seconds_for(text: str, max_audio_s: float | None = None) -> float:
    """Estimated seconds of speech for `text`, at least MIN_AUDIO_S."""
    est = max(MIN_AUDIO_S, len(text.strip()) / CHARS_PER_AUDIO_SECOND)
    if max_audio_s is not None:
        est = min(est, max_audio_s)
    return est
