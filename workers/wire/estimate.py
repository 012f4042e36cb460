"""How much audio a script makes, before any model has run.

The parent uses it to size work for the scheduler (the dispatcher then scales it
by what each worker measures); the SimEngine uses it as the length of the tone it
returns; the VibeVoice engine caps a row at a multiple of it
(workers/engines/vibevoice/engine.py, row_cap). All of them call
`audio_seconds_for`, so they agree.

The estimate knows the script: each kind of text is spoken at its own rate.
  - Han characters: one syllable each, spoken at CJK_CHARS_PER_S;
  - kana (half-width katakana too; a voicing mark is part of its kana): one
    mora each, at KANA_PER_S; Hangul: one syllable block each, at HANGUL_PER_S;
  - words of spaced scripts (Latin, Cyrillic, Greek, ...; an apostrophe inside a
    word is part of it): WORDS_PER_S, a long word counting as one word per
    LETTERS_PER_WORD letters; a run of an unspaced
    script (Thai, ...) is cut into words the same way;
  - digits: each read aloud as about a word, at DIGITS_PER_S;
  - punctuation: a pause after each sentence end, clause mark and line (turn).
"""

from __future__ import annotations

import unicodedata

# Conversational English: about 150 words a minute (2.5 a second), the commonly
# cited conversational rate of American English (read speech runs faster: 6.2
# syllables a second in Pellegrino et al. 2011, below). The rate holds the short
# gaps between words.
WORDS_PER_S = 2.5
LETTERS_PER_WORD = 7.0  # a longer word counts as len/7 words (compounds, Thai runs)
# Mandarin: about 4-5 characters (syllables) a second in conversation, 240-300 a
# minute (read speech measured at 5.2 syllables a second: Pellegrino, Coupé &
# Marsico 2011, "A cross-language perspective on speech information rate",
# Language 87(3)); 4.5 sits in the conversational range.
CJK_CHARS_PER_S = 4.5
# Japanese: about 7.8 morae a second in the same study (read speech); conversation
# is a little slower.
KANA_PER_S = 7.0
# Korean: no measured figure at hand; a syllable block is a syllable, placed between
# Mandarin's and Japanese's rates. The dispatcher's measured ratio corrects it.
HANGUL_PER_S = 5.5
DIGITS_PER_S = 2.5  # "2024" is spoken as two to four words
# Pauses: silent pauses in speech run from about 0.2 s to 0.5 s and more, longest
# between sentences and speakers. The rates above already hold some of them, so
# these are the part a punctuation mark adds.
SENTENCE_PAUSE_S = 0.25
CLAUSE_PAUSE_S = 0.1
TURN_PAUSE_S = 0.3
MIN_AUDIO_S = 0.5

SENTENCE_ENDS = set(".!?…。！？")
CLAUSE_MARKS = set(",;:，、；：—–")


APOSTROPHES = set("'’")


def _kind(ch: str) -> str:
    """One of: han, kana, hangul, digit, letter, sentence, clause, line, other."""
    if ch in APOSTROPHES:
        return "letter"
    if ch == "\n":
        return "line"
    if ch in SENTENCE_ENDS:
        return "sentence"
    if ch in CLAUSE_MARKS:
        return "clause"
    o = ord(ch)
    if 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF:
        return "han"
    if 0x20000 <= o <= 0x3FFFF:
        return "han"
    if 0x3099 <= o <= 0x309C or 0xFF9E <= o <= 0xFF9F:
        return "other"  # voicing marks (゛ ゜, half-width ﾞ ﾟ): part of the kana before
    if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
        return "kana"  # hiragana, katakana, half-width katakana
    if 0xAC00 <= o <= 0xD7AF:
        return "hangul"
    if ch.isdigit():
        return "digit"
    if ch.isalpha() or unicodedata.category(ch).startswith("M"):  # marks join their letter
        return "letter"
    return "other"


def speech_seconds(text: str) -> float:
    """Natural spoken length of `text` in seconds, by script (no floor, no cap)."""
    seconds = 0.0
    word = 0  # letters in the current word
    prev = ""

    def end_word() -> float:
        return max(1.0, word / LETTERS_PER_WORD) / WORDS_PER_S if word else 0.0

    for ch in text.strip():
        kind = _kind(ch)
        if kind == "letter":
            word += 1
            continue
        seconds += end_word()
        word = 0
        if kind == "han":
            seconds += 1 / CJK_CHARS_PER_S
        elif kind == "kana":
            seconds += 1 / KANA_PER_S
        elif kind == "hangul":
            seconds += 1 / HANGUL_PER_S
        elif kind == "digit":
            seconds += 1 / DIGITS_PER_S
        elif kind == "sentence" and prev != "sentence":
            seconds += SENTENCE_PAUSE_S
        elif kind == "clause":
            seconds += CLAUSE_PAUSE_S
        elif kind == "line":
            seconds += TURN_PAUSE_S
        prev = kind
    return seconds + end_word()


def audio_seconds_for(text: str, max_audio_s: float | None = None) -> float:
    """Estimated seconds of speech for `text`, at least MIN_AUDIO_S, at most max_audio_s."""
    est = max(MIN_AUDIO_S, speech_seconds(text))
    if max_audio_s is not None:
        est = min(est, max_audio_s)
    return est
