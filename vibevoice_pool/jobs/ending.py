"""How a job's run ends: its request's outcome in the pool made the job's end (the
runner's, runner.py, once the handle it follows has its outcome).

    Live                      a job this process has handed to the pool (runner.py)
    conclude(runner, live)    its run's handle has its outcome (`runner`: the JobRunner,
                              whose store, progress and clock it uses, and its retries
                              of writes the disk refused):
        Done                  its result written from its audio (on disk, then the tail
                              in memory: job_audio.py), the job done; a finish the disk
                              refuses is written when there is room; a result it
                              refuses: failed
        cancelled, stopping   the server stops it, or it was set aside: its progress
                              saved (what the disk takes), queued again to go on from it
        cancelled by owner    the audio it made kept as its result
        failed                failed (the pool retried it)
    too_far(runner, live)     its unsaved audio passed TAIL_MAX_S while the disk refuses
                              its saves
    set_aside(runner, live)   then its run stops: memory holds at most TAIL_MAX_S of a
                              job; it goes on from its saved audio once there is room

Its progress files go once the job has ended, after its result is on disk (a server
killed while it writes resumes); a job queued again keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from vibevoice_pool.jobs import results
from vibevoice_pool.jobs.job_audio import JobAudio
from vibevoice_pool.jobs.records import JobError, JobErrorKind, say
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool")

TAIL_MAX_S = 60.0  # unsaved audio a job may hold in memory while the disk refuses (5.5 MiB)
STOPPED = "the server stopped before it finished"
SET_ASIDE = "the data disk stayed full: it goes on from its saved audio once there is room"


@dataclass
class Live:
    """A job this process has handed to the pool: its run."""

    job_id: str
    fmt: str
    handle: Any = None  # RequestHandle
    audio: JobAudio | None = None  # made so far: on disk, the unsaved tail in memory
    cancelled: bool = False  # its owner cancelled it
    stopping: bool = False  # the server is stopping (or set_aside): queue it again
    set_aside: bool = False  # the disk stayed full too long (ending.set_aside)


def too_far(r, live: Live) -> bool:
    """Whether the run's unsaved audio passed TAIL_MAX_S and the disk refuses its saves."""
    return live.audio.held > TAIL_MAX_S * m.SAMPLE_RATE and r.progress.refused(live.job_id)


def set_aside(r, live: Live) -> None:
    if live.stopping:
        return
    live.stopping = live.set_aside = True
    live.handle.cancel()
    say(
        log.warning,
        live.job_id,
        ": %.0f s of its audio wait for a full disk: it stops, to go on from the %.1f s "
        "saved once there is room",
        live.audio.held / m.SAMPLE_RATE,
        live.audio.on_disk / m.SAMPLE_RATE,
    )
    r._disk_full(JobError(JobErrorKind.DISK_FULL, f"job {live.job_id}: {SET_ASIDE}"))


async def conclude(r, live: Live) -> None:
    outcome = live.handle.outcome
    try:
        if isinstance(outcome, m.Done):
            await _deliver(r, live, outcome)
        elif outcome.error is m.ErrorKind.CANCELLED and live.stopping:
            r.progress.tick(live.job_id, live.handle.history, live.audio, force=True)
            why = SET_ASIDE if live.set_aside else STOPPED
            with contextlib.suppress(JobError):  # still running: requeued when it can be
                r.store.requeue(live.job_id, why, r.clock())
        elif outcome.error is m.ErrorKind.CANCELLED and live.cancelled:  # the store says so
            args = (r.store, live.job_id, live.fmt, live.audio, live.handle.worker)
            await asyncio.to_thread(results.keep_partial, *args)
        else:
            r._fail(live.job_id, outcome.error.value, outcome.message, live.handle.worker)
    finally:  # kept until the result is on disk: a server killed while it writes resumes
        if not live.stopping:  # a job queued again keeps it to go on from
            r.progress.drop(live.job_id)


async def _deliver(r, live: Live, done: m.Done) -> None:
    handle = live.handle
    try:  # from the saved audio on disk and the tail in memory (job_audio.py)
        args = (r.store, live.job_id, live.fmt, live.audio)
        rel, size = await asyncio.to_thread(results.write, *args)
    except JobError as e:
        r._fail(live.job_id, e.kind.value, e.message, handle.worker)
        return
    at, audio_s = r.clock(), live.audio.made / m.SAMPLE_RATE

    def finish() -> bool:  # now, or once the disk has room again (_write_later)
        ended = r.store.finish_done(
            live.job_id,
            result_path=rel,
            result_bytes=size,
            audio_s=audio_s,
            compute_s=done.compute_s,
            worker=handle.worker,
            at=at,
            stop_reason=done.stop_reason,
        )
        if ended:
            r._count("done")
        return ended

    try:
        finished = finish()
    except JobError as e:
        r._write_later(live.job_id, finish, e)
        return
    if finished:
        done_line = " done: %.1f s of audio, %d bytes"
        say(log.info, live.job_id, done_line, audio_s, size, request_id=handle.id)
    else:  # cancelled while it was being written: all of it is what it made
        results.attach(r.store, live.job_id, rel, size, audio_s, handle.worker)
