"""How a job's run ends: its request's outcome in the pool made the job's end (the
runner's, runner.py, once the handle it follows has its outcome).

    Live                      a job this process has handed to the pool (runner.py)
    conclude(runner, live)    its run's handle has its outcome (`runner`: the JobRunner,
                              whose store, progress and clock it uses, and its retries
                              of writes the disk refused):
        Done                  its result written from its audio (on disk, then the tail
                              in memory: job_audio.py), the job done; a result a full
                              disk refuses is written again each RESULT_RETRY_S until
                              there is room (the audio is whole: the job stays running,
                              and runs once), or the server stops (it goes on from its
                              saved audio at the next start); a finish the disk refuses
                              is written when there is room; a result that cannot be
                              written for another reason (a size limit, a damaged
                              folder): failed
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
import time
from dataclasses import dataclass
from typing import Any

from vibevoice_pool.jobs import results
from vibevoice_pool.jobs.job_audio import JobAudio
from vibevoice_pool.jobs.records import JobError, JobErrorKind, say
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool")

TAIL_MAX_S = 60.0  # unsaved audio a job may hold in memory while the disk refuses (5.5 MiB)
RESULT_RETRY_S = 5.0  # a whole job's result the disk refused: written again this often
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
    written = await _write_result(r, live)
    if written is None:
        return
    rel, size = written
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


async def _write_result(r, live: Live) -> tuple[str, int] | None:
    """Its result written from its audio (on disk, the tail in memory); a full disk:
    written again each RESULT_RETRY_S while the server runs. None when it failed, or the
    server stopped first (then queued again, its progress kept, to go on from it)."""
    waited = False
    while True:
        try:
            args = (r.store, live.job_id, live.fmt, live.audio)
            return await asyncio.to_thread(results.write, *args)
        except JobError as e:
            if e.kind is not JobErrorKind.DISK_FULL:
                r._fail(live.job_id, e.kind.value, e.message, live.handle.worker)
                return None
            if not waited:
                made = live.audio.made / m.SAMPLE_RATE
                line = ": its %.1f s of audio are made; its result waits for room on the disk"
                say(log.warning, live.job_id, line, made)
                waited = True
            r._disk_full(e)
        until = time.monotonic() + RESULT_RETRY_S
        while not live.stopping and time.monotonic() < until:
            await asyncio.sleep(min(0.1, RESULT_RETRY_S))
        if live.stopping:  # the server stops: it goes on from what its progress saved
            with contextlib.suppress(JobError):  # else the next start requeues it
                r.store.requeue(live.job_id, STOPPED, r.clock())
            return None
