"""An answer sent whole: its audio kept as it comes, in memory up to a minute and past
that in a temporary file, then encoded into a file that is sent with its length.

    AnswerAudio()             add(pcm) per chunk read from the request's handle (which
                              lets each go: handle.stream(release=True)); past
                              SPILL_SAMPLES in memory, what is held goes to an unnamed
                              temporary file (float32), so the parent holds at most a
                              minute of an answer (5.5 MiB) however long it is, not its
                              whole audio (96 KB a second: 518 MB for 90 minutes, and
                              about three times that while it was joined, stretched and
                              encoded). A temporary folder with no room keeps the rest in
                              memory (logged once a process)
    encoded(audio, fmt, speed) -> (body, size, type): the answer as bytes, when it never
                              left memory (the encode the server always did); else as an
                              unnamed temporary file of `size` bytes (encoders.write_whole
                              from the pieces, stretched a piece at a time at speed != 1)
    file_chunks(f)            the file's bytes for a StreamingResponse, closed at the end

The files live in the system's temporary folder ($TMPDIR), unnamed: a crash leaves
nothing behind.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np

from vibevoice_pool import encoders
from vibevoice_pool.api import tempo
from vibevoice_pool.audio import float_blocks
from workers.wire.messages import SAMPLE_RATE

SPILL_SAMPLES = 60 * SAMPLE_RATE  # an answer's audio held in memory before it goes to a file
BLOCK = 1 << 18  # samples read back at a time (1 MiB)
SEND_BYTES = 1 << 16  # bytes of the encoded file sent at a time
log = logging.getLogger("vibevoice_pool")
_said_no_room = False


class AnswerAudio:
    def __init__(self, spill: int | None = None):
        self.spill = SPILL_SAMPLES if spill is None else spill
        self.made = 0  # samples added in all
        self.on_disk = 0  # of them, in the file (the first ones)
        self.peak = 0  # the most samples held in memory at once
        self._mem: list[np.ndarray] = []
        self._file = None

    @property
    def spilled(self) -> bool:
        return self.on_disk > 0

    def add(self, pcm: np.ndarray) -> None:
        self._mem.append(pcm)
        self.made += len(pcm)
        self.peak = max(self.peak, self.made - self.on_disk)
        if self.made - self.on_disk > self.spill:
            self._to_file()

    def _to_file(self) -> None:
        global _said_no_room
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="vibevoice-pool-answer-")
            for part in self._mem:
                self._file.write(np.ascontiguousarray(part, dtype=np.float32).tobytes())
            self._file.flush()
        except OSError as e:  # no room: the file back to what it held, the rest in memory
            if self._file is not None:
                self._file.seek(self.on_disk * 4)
                self._file.truncate()
            self.spill = self.made + self.spill  # try again a spill later
            if not _said_no_room:
                _said_no_room = True
                log.warning(
                    "An answer's audio stays in memory: the temporary folder (%s) has no "
                    "room for it (%s)",
                    tempfile.gettempdir(),
                    e.strerror or e,
                )
            return
        self.on_disk = self.made
        self._mem = []

    def pieces(self, block: int = BLOCK):
        """All the audio, in order: the file's a block at a time, then memory's."""
        if self._file is not None and self.on_disk:
            self._file.seek(0)
            yield from float_blocks(self._file, self.on_disk, block)
        yield from list(self._mem)

    def whole(self) -> np.ndarray:
        parts = list(self.pieces())
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = []


def _stretched(audio: AnswerAudio, speed: float) -> AnswerAudio:
    """The audio at `speed`, stretched a piece at a time into a new AnswerAudio."""
    out = AnswerAudio(audio.spill)
    st = tempo.Stretcher(speed)
    try:
        for pcm in audio.pieces():
            out.add(st.push(pcm))
        out.add(st.end())
    finally:
        st.close()
    audio.close()
    return out


def encoded(audio: AnswerAudio, fmt: str, speed: float = 1.0):
    """(body, size, samples, content type): bytes when the audio never left memory;
    else an unnamed temporary file at its start (the caller sends it: file_chunks)."""
    if not audio.spilled:
        pcm = audio.whole()
        audio.close()
        if speed != 1.0:
            pcm = tempo.stretch(pcm, speed)
        data, ctype = encoders.encode(pcm, fmt)
        return data, len(data), len(pcm), ctype
    if speed != 1.0:
        audio = _stretched(audio, speed)
    try:
        out = tempfile.TemporaryFile(prefix="vibevoice-pool-answer-")
        try:
            encoders.write_whole(out, audio.pieces(), audio.made, fmt)
            size = out.tell()
            out.seek(0)
        except OSError:  # no room for the file: encoded in memory, as before
            out.close()
            data, ctype = encoders.encode(audio.whole(), fmt)
            return data, len(data), audio.made, ctype
        return out, size, audio.made, encoders.content_type(fmt)
    finally:
        audio.close()


def file_chunks(f):
    """The bytes of an encoded answer's file, SEND_BYTES at a time; the file closed (and
    so gone) once sent, or once the client left."""
    try:
        while data := f.read(SEND_BYTES):
            yield data
    finally:
        f.close()
