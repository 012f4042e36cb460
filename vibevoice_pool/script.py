"""Scripts: the text a user writes, parsed into speaker turns.

    Speaker 1: Hello there.        explicit speaker (numbered 1-4 or 0-3)
    Speaker 2: Hi!
    And a line with no prefix.     unprefixed lines rotate through the speakers

Numbering: if any line says "Speaker 0", numbers are 0-based (0-3), as the
VibeVoice samples write them; otherwise 1-based (1-4), as people write them.
At most four speakers. Every violation is BAD_INPUT naming the line, and so
is text that is not valid Unicode (a lone surrogate such as "\ud800", which
JSON can carry but UTF-8 cannot): every route parses its script here, so such a
script is refused with 400 before it is admitted.
"""

from __future__ import annotations

import re
import unicodedata

from workers.wire.messages import ErrorKind, PoolError, Turn

MAX_SPEAKERS = 4
MAX_NUMBER_DIGITS = 6  # a longer speaker number is out of range without being read
_PREFIX = re.compile(r"^\s*speaker\s*(\d+)\s*[:：]\s*(.*)$", re.IGNORECASE)


def _invisible(ch: str) -> bool:
    """Whitespace, a control character or an invisible format character: the byte-order
    mark a file saved as "UTF-8 with BOM" starts with, a zero-width space, a word joiner."""
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf")


def _trim(line: str) -> str:
    """The line without invisible ends (left on, a BOM hid the first line's "Speaker N:",
    which was then spoken, label and all, by the wrong speaker)."""
    start, end = 0, len(line)
    while start < end and _invisible(line[start]):
        start += 1
    while end > start and _invisible(line[end - 1]):
        end -= 1
    return line[start:end]


def _blank(text: str) -> bool:
    """Nothing to say (a turn the model would be left to babble over)."""
    return not _trim(text)


def _bad(message: str) -> PoolError:
    return PoolError(ErrorKind.BAD_INPUT, message)


def _speaker_number(digits: str) -> int:
    """The number of a "Speaker N:" prefix; any digits (ASCII, Arabic-Indic...).
    A number too long to be a speaker is -1 (out of range), never converted:
    int() refuses strings of more than 4,300 digits."""
    return int(digits) if len(digits) <= MAX_NUMBER_DIGITS else -1


def check_encodable(text: str, what: str = "the script") -> None:
    """BAD_INPUT when `text` cannot be encoded as UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1
        raise _bad(
            f"{what} is not valid Unicode text: line {line} holds a lone surrogate "
            f"(U+{ord(text[exc.start]):04X}); send the text as UTF-8"
        ) from None


def parse_script(
    text: str, *, max_chars: int = 20000, num_speakers: int | None = None
) -> tuple[Turn, ...]:
    """Turns of a script, speakers 0-based. `num_speakers` sets how many
    speakers unprefixed lines rotate through (default: every speaker up to the
    highest one named, so Speaker 1 and Speaker 3 make three; or 1)."""
    if not isinstance(text, str) or not text.strip():
        raise _bad("the script is empty: write at least one line, e.g. 'Speaker 1: Hello'")
    if len(text) > max_chars:
        raise _bad(f"the script has {len(text)} characters; the limit is {max_chars}")
    check_encodable(text)
    lines = [(n, _trim(line)) for n, line in enumerate(text.splitlines(), 1) if not _blank(line)]
    if not lines:
        raise _bad("the script is empty: write at least one line, e.g. 'Speaker 1: Hello'")
    numbered = [(n, _PREFIX.match(line)) for n, line in lines]
    numbers = [_speaker_number(mt.group(1)) for _, mt in numbered if mt]
    zero_based = 0 in numbers
    turns: list[Turn] = []
    for (n, line), (_, mt) in zip(lines, numbered, strict=False):
        if mt:
            number, said = _speaker_number(mt.group(1)), _trim(mt.group(2))
            speaker = number if zero_based or number < 0 else number - 1
            if not 0 <= speaker < MAX_SPEAKERS:
                allowed = "0-3" if zero_based else "1-4"
                shown = mt.group(1) if len(mt.group(1)) <= 12 else mt.group(1)[:12] + "..."
                raise _bad(
                    f"line {n}: 'Speaker {shown}' is out of range; speakers are numbered "
                    f"{allowed} (at most {MAX_SPEAKERS} speakers)"
                )
            if _blank(said):
                raise _bad(f"line {n}: Speaker {number} says nothing")
            turns.append(Turn(speaker, said))
        else:
            turns.append(Turn(-1, line))
    named = {t.speaker for t in turns if t.speaker >= 0}
    rotation = num_speakers or (max(named) + 1 if named else 1)
    if rotation > MAX_SPEAKERS:
        raise _bad(f"{rotation} speakers given; at most {MAX_SPEAKERS} are supported")
    out, k = [], 0
    for t in turns:
        if t.speaker < 0:
            out.append(Turn(k % rotation, t.text))
            k += 1
        else:
            out.append(t)
    return tuple(out)


def script_text(turns: tuple[Turn, ...]) -> str:
    """The canonical form, Speaker 1-4, one turn a line."""
    return "\n".join(f"Speaker {t.speaker + 1}: {t.text}" for t in turns)
