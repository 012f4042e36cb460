"""A running job's audio as the runner holds it: on disk up to its last progress save,
in memory only past it.

    progress/<job id>.pcm   samples [0, on_disk): saved (progress.py), read back only
                            to encode the result
    memory                  samples [on_disk, made): the chunks read from the job's
                            RequestHandle since that save (the handle itself lets go
                            of what the runner has read: handle.stream(release=True))

The runner adds each chunk it reads (add); a progress save takes what is past the
disk's end (since) and lets it go once written (saved). A save the disk refuses
leaves both as they were: the prefix stays on disk, the tail waits here until the
disk has room (progress.py). The result is encoded from pieces(): the file in
blocks, then the tail (encoders.write_whole), never the whole audio as one array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vibevoice_pool.audio import float_blocks

BLOCK = 1 << 18  # samples read from the file at a time for the result (1 MiB)
_EMPTY = np.zeros(0, dtype=np.float32)


class JobAudio:
    def __init__(self, path: Path, on_disk: int = 0):
        """`path`: the job's progress audio, whose first `on_disk` samples are saved."""
        self.path = path
        self.on_disk = on_disk  # samples saved in the file; the memory holds the rest
        self.made = on_disk  # samples made in all (by this run and the runs before)
        self._tail: list[np.ndarray] = []

    @property
    def held(self) -> int:
        """Samples held in memory: made, not on disk yet."""
        return self.made - self.on_disk

    def add(self, pcm: np.ndarray) -> None:
        self._tail.append(pcm)
        self.made += len(pcm)

    def since(self, start: int) -> np.ndarray:
        """The samples from `start` (at least on_disk) to the last made, one array."""
        skip = start - self.on_disk
        if skip < 0:
            raise ValueError(f"sample {start} is on disk (memory holds from {self.on_disk})")
        if not self._tail:
            return _EMPTY
        tail = self._tail[0] if len(self._tail) == 1 else np.concatenate(self._tail)
        self._tail = [tail]  # one array from here: the next save copies only what is new
        return tail[skip:]

    def saved(self, upto: int) -> None:
        """The samples before `upto` are on disk now: memory lets them go."""
        drop = min(upto, self.made) - self.on_disk
        if drop <= 0:
            return
        while drop and self._tail:
            first = self._tail[0]
            if len(first) <= drop:
                self._tail.pop(0)
                drop -= len(first)
                self.on_disk += len(first)
            else:  # a copy: a view would keep the whole array alive
                self._tail[0] = first[drop:].copy()
                self.on_disk += drop
                drop = 0

    def pieces(self, block: int = BLOCK):
        """All the audio, in order: the saved samples read from the file a block at a
        time, then the tail. OSError when the file holds fewer than on_disk."""
        if self.on_disk:
            with open(self.path, "rb") as f:
                yield from float_blocks(f, self.on_disk, block)
        yield from list(self._tail)


def saved_only(path: Path) -> JobAudio:
    """The audio a job saved, all of it on disk (its run has ended: nothing in memory)."""
    try:
        samples = path.stat().st_size // 4
    except OSError:
        samples = 0
    return JobAudio(path, samples)
