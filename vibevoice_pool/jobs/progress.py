"""A running job's progress on disk, beside its audio: what a restart resumes from.

    progress/<job id>.pcm    the audio made so far, float32 mono, appended as it comes
    progress/<job id>.hist   the row's history (workers/wire/history.py) up to a step,
                             rewritten whole (temp file, fsync, rename) every
                             CHECKPOINT_S, after the audio it covers is on disk

The runner (runner.py) calls:
    resume(job_id, request) -> (request, audio so far)
                              at start: a job a previous server left running goes
                              on from its last saved step (request.resume), and its
                              saved audio is the beginning of its result
    tick(job_id, handle, prior, force=False)
                              while it runs: save when CHECKPOINT_S has passed (at
                              once with force: the server stops it); a save the disk
                              refuses drops the files (the space goes back; the job
                              goes on) and is tried again in RETRY_S
    drop(job_id)              once it is done, failed or cancelled
    saved_audio(job_id), ids()  the audio saved of a job (a cancelled job keeps it as its
                              result: results.keep_saved), the jobs with files here

The history is saved only up to audio already on disk, so a restart never misses
audio; the audio past the history is cut off at the restart and made again.
"""

from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from vibevoice_pool.jobs.disk import PROGRESS_DIR, write_atomic
from workers.wire import messages as m
from workers.wire.history import History

log = logging.getLogger("vibevoice_pool")

CHECKPOINT_S = 1.0
RETRY_S = 30.0  # after a save the disk refused


class Progress:
    def __init__(self, folder: Path, clock=time.monotonic):
        self.dir = Path(folder) / PROGRESS_DIR
        self.clock = clock
        self._saved: dict[str, tuple[float, int]] = {}  # job -> (when, samples on disk)

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        return self.dir / f"{job_id}.pcm", self.dir / f"{job_id}.hist"

    def resume(self, job_id: str, req: m.Request) -> tuple[m.Request, np.ndarray]:
        """The request with the job's saved history, and the audio that history covers
        (none when nothing usable was saved)."""
        pcm_path, hist_path = self._paths(job_id)
        empty = np.zeros(0, dtype=np.float32)
        try:
            hist = _read_history(hist_path.read_bytes())
            pcm = np.fromfile(pcm_path, dtype=np.float32)
        except FileNotFoundError:
            return req, empty
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # cut, bad
            log.warning(
                "job %s: its saved progress is unreadable (%s): run from its start", job_id, e
            )
            return req, empty
        if len(pcm) < hist.samples:
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
        self._saved[job_id] = (self.clock(), hist.samples)
        with open(pcm_path, "r+b") as f:  # what came after the history is made again
            f.truncate(hist.samples * 4)
        return replace(req, resume=hist), pcm[: hist.samples].copy()

    def tick(self, job_id: str, handle, prior: np.ndarray, force: bool = False) -> None:
        """Save the job's progress when CHECKPOINT_S has passed since the last save (or
        now, `force`: the server stops the job, and the next start goes on from here)."""
        now = self.clock()
        when, on_disk = self._saved.get(job_id, (0.0, 0))
        if now - when < CHECKPOINT_S and not (force and now >= when):
            return
        hist = handle.history.snapshot()
        if hist is None or hist.samples <= on_disk:
            return
        new = _unsaved(handle, prior, on_disk)
        if len(new) < hist.samples - on_disk:
            return  # its audio is on its way: next time
        try:
            self._save(job_id, new[: hist.samples - on_disk], on_disk, hist)
        except OSError as e:  # a full disk, say: the job goes on, its audio is in memory
            log.warning(
                "job %s: its progress could not be saved (%s): dropped, so that the disk "
                "gets the space back (a restart would run it from its start); tried again "
                "in %.0f s",
                job_id,
                e.strerror or e,
                RETRY_S,
            )
            self.drop(job_id)
            self._saved[job_id] = (now + RETRY_S, 0)
            return
        self._saved[job_id] = (now, hist.samples)

    def _save(self, job_id: str, new: np.ndarray, on_disk: int, hist: History) -> None:
        """`new`: the audio past the `on_disk` samples saved, up to the history's end."""
        pcm_path, hist_path = self._paths(job_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(pcm_path, "ab") as f:
            f.truncate(on_disk * 4)
            f.write(np.ascontiguousarray(new, dtype=np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())
        write_atomic(hist_path, _history_bytes(hist))

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
        pcm, hist = self._paths(job_id)
        for path in (pcm, hist, hist.with_name(f".{hist.name}.tmp")):  # write_atomic's
            path.unlink(missing_ok=True)


def _unsaved(handle, prior: np.ndarray, on_disk: int) -> np.ndarray:
    """The job's audio past its first `on_disk` samples: the previous server's (`prior`)
    then the handle's. Only what is past `on_disk` is copied: a tick costs the audio
    made since the last one, not the row's whole audio (O(n^2) in all for a long row)."""
    if on_disk >= len(prior):
        return handle.audio(on_disk - len(prior))
    return np.concatenate([prior[on_disk:], handle.audio()])


def _history_bytes(h: History) -> bytes:
    buf = io.BytesIO()
    noise_at, noise = h.noise if h.noise else (-1, b"")
    np.savez(
        buf,
        tokens=np.frombuffer(h.tokens, dtype=np.uint8),
        feedback=np.frombuffer(h.feedback, dtype=np.uint8),
        meta=np.array([h.width, h.samples, noise_at], dtype=np.int64),
        noise=np.frombuffer(noise, dtype=np.uint8),
    )
    return buf.getvalue()


def _read_history(data: bytes) -> History:
    with np.load(io.BytesIO(data)) as z:
        width, samples, noise_at = (int(x) for x in z["meta"])
        noise = (noise_at, z["noise"].tobytes()) if noise_at >= 0 else None
        return History(z["tokens"].tobytes(), z["feedback"].tobytes(), width, samples, noise)
