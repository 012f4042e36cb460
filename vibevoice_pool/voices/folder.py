"""The voices folder on disk: which files in it are voices, a file written whole, and
one server's turn to change it.

A voice is an audio file (VOICE_EXTENSIONS) directly in the folder, named by its stem;
of two with one stem, the earlier extension wins. A file is written to a hidden temp
file and renamed into place, so a reader never sees half of one. Servers sharing the
folder change it one at a time (an flock on the folder). Used by library.py and
owners.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

VOICE_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".mp3", ".ogg")  # preference order


def list_voices(folder: Path) -> dict[str, Path]:
    """name (file stem) -> path, for the audio files directly in folder."""
    found: dict[str, Path] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        ext = ext.lower()
        if not stem or entry.name.startswith(".") or ext not in VOICE_EXTENSIONS:
            continue
        if not entry.is_file():
            continue
        known = found.get(stem)
        if known is None or VOICE_EXTENSIONS.index(ext) < VOICE_EXTENSIONS.index(
            known.suffix.lower()
        ):
            found[stem] = Path(entry.path)
    return found


@contextlib.contextmanager
def folder_turn(folder: Path):
    """Servers sharing the folder (two pools on one host do by default) change it one
    at a time: an flock on the folder itself (made if it is not there yet), let go when
    its holder exits."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(folder: Path, filename: str, data: bytes) -> Path:
    """Write data to folder/filename via a hidden temp file and a rename."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target = folder / filename
        os.replace(tmp, target)
        return target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
