"""A running job's progress on disk, beside its audio: what a restart resumes from.

    progress/<job id>.pcm    the audio made so far, float32 mono, appended as it comes
    progress/<job id>.steps  the row's history (workers/wire/history.py), appended
                             step by step: per step its int32 token, then its
                             float32 feedback (width values)
    progress/<job id>.hist   how much of those is saved: the steps, the samples, the
                             width and the noise generator's latest state, rewritten
                             (temp file, fsync, rename) every CHECKPOINT_S, after the
                             audio and the steps it counts are on disk

The runner (runner.py) calls:
    resume(job_id, request) -> (request, JobAudio)
                              at start: a job a previous server left running goes
                              on from its last saved step (request.resume), and its
                              saved audio (on disk, job_audio.py) is the beginning of
                              its result
    tick(job_id, history, audio, force=False)
                              while it runs: save when CHECKPOINT_S has passed (at
                              once with force: the server stops it), and let the
                              saved audio go from memory (JobAudio.saved); a save the
                              disk refuses keeps what is on disk, the rest waits in
                              memory, tried again in RETRY_S
    refused(job_id)           whether its last save was refused (the disk is full)
    drop(job_id)              once it is done, failed or cancelled
    saved(job_id), saved_audio(job_id), ids()
                              the audio saved of a job (a cancelled job keeps it as its
                              result: results.keep_saved), the jobs with files here

The history is saved only up to audio already on disk, so a restart never misses
audio; the audio and steps past the .hist's counts are cut off at the restart and
made again. A save writes only what is new since the last (the audio from
JobAudio.since(start), the steps from HistoryLog.since(step)): a tick's cost does
not grow with the job's length, and the memory holds only the audio not saved.
A refused save (a full disk) leaves the files as the last good save left them:
a restart resumes from there, and the next save appends past it. A .hist written whole (tokens and feedback
inside, before .steps) is still read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from vibevoice_pool.jobs.disk import PROGRESS_DIR, write_atomic
from vibevoice_pool.jobs.job_audio import JobAudio, saved_only
from workers.wire import messages as m
from workers.wire.history import TOKEN, VALUE, History, HistoryDelta

log = logging.getLogger("vibevoice_pool")

CHECKPOINT_S = 1.0
RETRY_S = 5.0  # after a save the disk refused


class Progress:
    def __init__(self, folder: Path, clock=time.monotonic):
        self.dir = Path(folder) / PROGRESS_DIR
        self.clock = clock
        # job -> (when, samples on disk, steps on disk)
        self._saved: dict[str, tuple[float, int, int]] = {}
        self._refused: set[str] = set()  # jobs whose last save the disk refused

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        return self.dir / f"{job_id}.pcm", self.dir / f"{job_id}.hist"

    def _steps_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.steps"

    def resume(self, job_id: str, req: m.Request) -> tuple[m.Request, JobAudio]:
        """The request with the job's saved history, and the audio that history covers,
        on disk (none when nothing usable was saved)."""
        pcm_path, hist_path = self._paths(job_id)
        empty = JobAudio(pcm_path)
        try:
            hist, whole = _read_history(hist_path.read_bytes(), self._steps_path(job_id))
            pcm_bytes = pcm_path.stat().st_size
        except FileNotFoundError:
            return req, empty
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # cut, bad
            log.warning(
                "job %s: its saved progress is unreadable (%s): run from its start", job_id, e
            )
            return req, empty
        if pcm_bytes < hist.samples * 4:
            log.warning(
                "job %s: its saved audio is shorter than its history: from its start", job_id
            )
            return req, empty
        log.info(
            "job %s resumes from its saved step %d (%.1f s)",
            job_id,
            hist.steps,
            hist.samples / m.SAMPLE_RATE,
        )
        # an old whole .hist: the next save writes every step to .steps
        self._saved[job_id] = (self.clock(), hist.samples, 0 if whole else hist.steps)
        self._refused.discard(job_id)  # a new run: its saves are tried afresh
        with open(pcm_path, "r+b") as f:  # what came after the history is made again
            f.truncate(hist.samples * 4)
        return replace(req, resume=hist), JobAudio(pcm_path, hist.samples)

    def tick(self, job_id: str, history, audio: JobAudio, force: bool = False) -> None:
        """Save the job's progress (its HistoryLog `history` and the `audio` past what
        is on disk) when CHECKPOINT_S has passed since the last save (or now, `force`:
        the server stops the job, and the next start goes on from here); the audio
        saved leaves memory."""
        now = self.clock()
        when, on_disk, steps = self._saved.get(job_id, (0.0, audio.on_disk, 0))
        if now - when < CHECKPOINT_S and not (force and now >= when):
            return
        piece = history.since(steps)
        if piece is None or piece.samples <= on_disk:
            return
        new = audio.since(on_disk)
        if len(new) < piece.samples - on_disk:
            return  # its audio is on its way: next time
        try:
            self._save(job_id, new[: piece.samples - on_disk], on_disk, piece)
        except OSError as e:  # a full disk, say: what is on disk stays, the rest waits
            if job_id not in self._refused:
                log.warning(
                    "job %s: its progress could not be saved (%s): the %.1f s saved stay on "
                    "disk, the %.1f s past them wait in memory; tried again every %.0f s",
                    job_id,
                    e.strerror or e,
                    on_disk / m.SAMPLE_RATE,
                    audio.held / m.SAMPLE_RATE,
                    RETRY_S,
                )
            self._refused.add(job_id)
            self._saved[job_id] = (now + RETRY_S, on_disk, steps)
            return
        if job_id in self._refused:
            self._refused.discard(job_id)
            log.info("job %s: its progress is saved again", job_id)
        self._saved[job_id] = (now, piece.samples, piece.start + piece.steps)
        audio.saved(piece.samples)

    def refused(self, job_id: str) -> bool:
        """Whether the disk refused the job's last save (its tail waits in memory)."""
        return job_id in self._refused

    def _save(self, job_id: str, new: np.ndarray, on_disk: int, piece: HistoryDelta) -> None:
        """`new`: the audio past the `on_disk` samples saved, up to the end of `piece`,
        the steps past those saved (it starts at the first step not on disk)."""
        pcm_path, hist_path = self._paths(job_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        _append(pcm_path, on_disk * 4, np.ascontiguousarray(new, dtype=np.float32).tobytes())
        _append(self._steps_path(job_id), piece.start * _record(piece.width), _records(piece))
        write_atomic(hist_path, _meta_bytes(piece))

    def saved(self, job_id: str) -> JobAudio:
        """All the audio saved of a job whose run has ended, on disk."""
        return saved_only(self._paths(job_id)[0])

    def saved_audio(self, job_id: str) -> np.ndarray:
        """All the audio saved of a job (none when there is no file, or it is unreadable)."""
        try:
            return np.fromfile(self._paths(job_id)[0], dtype=np.float32)
        except (OSError, ValueError):
            return np.zeros(0, dtype=np.float32)

    def ids(self) -> set[str]:
        """The jobs with saved progress here."""
        try:
            return {p.name.lstrip(".").split(".")[0] for p in self.dir.iterdir()}
        except FileNotFoundError:
            return set()

    def drop(self, job_id: str) -> None:
        self._saved.pop(job_id, None)
        self._refused.discard(job_id)
        pcm, hist = self._paths(job_id)
        steps = self._steps_path(job_id)
        for path in (pcm, steps, hist, hist.with_name(f".{hist.name}.tmp")):  # write_atomic's
            path.unlink(missing_ok=True)


def _append(path: Path, keep: int, data: bytes) -> None:
    """`data` after the first `keep` bytes of `path` (what a failed save left past
    them goes), on disk before this returns. Refused (a full disk): the file is cut
    back to `keep` bytes, as far as it can be, and the OSError raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, keep)
        view, at = memoryview(data), keep
        while view:  # unbuffered: nothing is left to be written at close
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, keep)
        raise
    finally:
        os.close(fd)


def _record(width: int) -> int:
    """The bytes of one step in .steps: its token, then its feedback."""
    return TOKEN.itemsize + width * VALUE.itemsize


def _records(piece: HistoryDelta) -> bytes:
    rows = np.zeros((piece.steps, _record(piece.width)), dtype=np.uint8)
    rows[:, : TOKEN.itemsize] = np.frombuffer(piece.tokens, np.uint8).reshape(piece.steps, -1)
    if piece.width:
        rows[:, TOKEN.itemsize :] = np.frombuffer(piece.feedback, np.uint8).reshape(piece.steps, -1)
    return rows.tobytes()


def _meta_bytes(piece: HistoryDelta) -> bytes:
    buf = io.BytesIO()
    noise_at, noise = piece.noise if piece.noise else (-1, b"")
    steps = piece.start + piece.steps
    np.savez(
        buf,
        meta=np.array([piece.width, piece.samples, noise_at, steps], dtype=np.int64),
        noise=np.frombuffer(noise, dtype=np.uint8),
    )
    return buf.getvalue()


def _read_history(data: bytes, steps_path: Path) -> tuple[History, bool]:
    """The saved history, and whether it was a whole one (.hist alone, as written
    before .steps)."""
    with np.load(io.BytesIO(data)) as z:
        meta = [int(x) for x in z["meta"]]
        width, samples, noise_at = meta[:3]
        noise = (noise_at, z["noise"].tobytes()) if noise_at >= 0 else None
        if "tokens" in z:
            tokens, feedback = z["tokens"].tobytes(), z["feedback"].tobytes()
            return History(tokens, feedback, width, samples, noise), True
    steps = meta[3]
    size = steps * _record(width)
    with open(steps_path, "r+b") as f:
        rows = np.frombuffer(f.read(size), dtype=np.uint8)
        if len(rows) < size:
            raise ValueError(f"{steps_path.name} holds fewer than {steps} steps")
        f.truncate(size)  # steps past the count are made again
    rows = rows.reshape(steps, -1)
    tokens = rows[:, : TOKEN.itemsize].tobytes()
    feedback = rows[:, TOKEN.itemsize :].tobytes()
    return History(tokens, feedback, width, samples, noise), False
