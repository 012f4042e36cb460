"""JobRunner: runs the durable jobs of a JobStore on the Pool, one by one, to the end.

    submit(owner, body)   (POST /v1/jobs, the Jobs tab): validate it as /v1/synthesize would,
        fix its seed, write it down: queued (an Idempotency-Key seen before: that job)
    the runner thread (its own asyncio loop), while the pool's admission queue
    holds fewer than `queue_depth` requests:
        next queued job, fair between owners (store.next_queued), an owner
        holding at most `owner_running` jobs in the pool (0: its rows but one,
        so another owner's job starts at once)
        -> Request from the stored body (unreadable: failed) -> pool.submit (OVERLOADED /
           UNAVAILABLE: it stays queued; try again in a moment)
        -> claim (queued -> running) -> follow the handle, letting go of what it read:
           audio made = progress, saved each second; memory holds only the unsaved tail
        Done: encode from disk and tail, write results/<id>.<fmt> (temp file, fsync,
        rename), running -> done;
        a write error (disk full, I/O) -> failed. Failed: running -> failed (the pool retried)
    cancel(id, wait_s): cancelled in the store first, then the pool request is stopped;
        waits up to wait_s for its row to leave its worker (POST /v1/jobs/{id}/cancel)
    start(): jobs a previous server left queued or running are queued again (a running
        one goes on from the audio and history it saved, progress.py); the saved audio of
        a job that ended meanwhile goes (a cancelled one's: kept as its result)
    hold() at the stop signal: start no queued job; stop(grace): running jobs finish
        within grace, the rest are queued again (their progress saved) for the next start

A full data disk (JobError DISK_FULL, or under 1 MB free): new jobs are refused (507), nothing
new goes to the pool for DISK_RETRY_S, an unwritable finish is written when space returns, and
each tick a `running` job no run of this process holds is queued again: nothing stays `running`
without a worker. A running job's refused saves keep its audio past the disk in memory, up to
ending.TAIL_MAX_S; then it stops and is queued again, to go on from what it saved (ending.py).

Exactly once: a job ends through one compare-and-set in the store (finished_count <= 1 is a
CHECK), so a racing cancel and finish cannot both win. A run killed at any point leaves the job
`queued` or `running`, run again at the next start; a result renamed into place before the kill is
replaced by the rerun's (same name, seed), visible only once `done`. Workers die with the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vibevoice_pool.jobs import ending, results
from vibevoice_pool.jobs.disk import out_of_space, sweep_orphans
from vibevoice_pool.jobs.ending import Live
from vibevoice_pool.jobs.places import Places
from vibevoice_pool.jobs.progress import Progress
from vibevoice_pool.jobs.records import say
from vibevoice_pool.jobs.store import Job, JobError, JobErrorKind, JobState, JobStore
from vibevoice_pool.jobs.view import job_view
from workers.wire import messages as m

if TYPE_CHECKING:
    from vibevoice_pool.pool.facade import Pool

log = logging.getLogger("vibevoice_pool")

RETRY_LATER = (m.ErrorKind.OVERLOADED, m.ErrorKind.UNAVAILABLE)  # "not now": stays queued
RETRY_S = 1.0  # pause after the pool said "not now"
DISK_RETRY_S = 5.0  # pause after the store said the disk is full
POLL_S = 0.5  # the loop wakes at least this often (events wake it sooner)
STOP_CANCEL_WAIT_S = 10.0  # at stop, how long cancelled runs get to answer
BYTES_PER_AUDIO_S = {"wav": 48_000, "pcm": 48_000, "flac": 48_000, "mp3": 16_000}  # upper bounds
BYTES_PER_AUDIO_S |= {"opus": 8_000, "aac": 16_000}  # of result sizes: disk reserved for a job
INTERNAL = "internal_error"


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        pool: Pool,
        build: Callable[[dict], m.Request],
        *,
        queue_depth: int = 1,
        ttl_s: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
        owner_running: int = 0,
        capacity: Callable[[], int] | None = None,
    ):
        """`build` turns a stored body into a validated Request (PoolError BAD_INPUT
        otherwise), as /v1/synthesize does; `queue_depth` is how many job requests may
        wait in the pool's admission queue at once; `owner_running` caps one owner's
        jobs in the pool (0: `capacity()`, the rows the pool runs at once, minus one)."""
        self.store = store
        self.pool = pool
        self.queue_depth = max(1, queue_depth)
        self.ttl_s = ttl_s
        self.clock = clock
        self._build = build
        self._lock = threading.Lock()
        self._live: dict[str, Live] = {}
        self._let_go = threading.Condition(self._lock)  # a run left _live (cancel waits)
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopping = self._held = False  # held: the server stops; no new job starts
        self._stop_at = 0.0
        self._retry_at = 0.0
        self._said_later = False
        self._want_room = False  # queued jobs wait for room in the pool's queue
        self._sweep_s = max(1.0, min(60.0, ttl_s / 4))
        self.owner_running = owner_running
        self._capacity = capacity or (lambda: len(pool.placements))
        self._unsettled: dict[str, Callable[[], object]] = {}  # writes the disk refused
        self._said_full = False
        self.progress = Progress(store.folder)  # a running job's audio and history on disk
        self.places = Places(clock)  # where each run's row is now (preempted, moved...)
        self.counts = dict.fromkeys(("created", "replayed", "done", "failed", "cancelled"), 0)

    # ---- life ----------------------------------------------------------

    def start(self) -> JobRunner:
        try:
            queued = self.store.requeue_unfinished(self.clock())
            for job_id in self.progress.ids() - set(queued):  # it ended, its run killed
                results.keep_saved(self.store, self.progress, job_id)  # cancelled: kept
            sweep_orphans(self.store)
            self.expire()
        except JobError as e:  # a full disk: the loop queues them again once it can
            log.error("Jobs: %s", e.message)
            queued = []
        if queued:
            log.info("Jobs: %d job(s) from before are queued to run", len(queued))
        self.pool.subscribe(self._on_pool_event)
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self, grace_s: float = 0.0) -> None:
        """Take no new job; running ones get `grace_s` to finish, then are cancelled
        and queued again for the next start. Closes the store."""
        if self._thread is not None:
            self._stop_at = time.monotonic() + grace_s
            self._stopping = True
            self._poke()
            self._thread.join(grace_s + STOP_CANCEL_WAIT_S + 5)
            self._thread = None
        with contextlib.suppress(ValueError):
            self.pool.unsubscribe(self._on_pool_event)
        self.store.close()

    def hold(self) -> None:  # the stop signal: no queued job starts; running ones go on
        self._held = True

    def hurry(self) -> None:  # a forced stop: running jobs are cancelled now (run next start)
        self._stop_at = 0.0

    # ---- the API side --------------------------------------------------

    def submit(self, owner: str, body: dict, idem: tuple[str, str] | None = None) -> Job:
        """Validate and write down a job; it runs when the pool has room (`idem`: see
        JobStore.create). PoolError (BAD_INPUT, UNAVAILABLE), JobError(DISK_LIMIT)."""
        if self._stopping or self._held:
            raise m.PoolError(m.ErrorKind.UNAVAILABLE, "the server is shutting down", True)
        body = {**body, "stream": False}
        req = self._build(body)  # validates; picks a seed when none is given
        body["seed"] = req.seed  # a rerun after a restart makes the same audio
        fmt = str(body.get("format") or "wav").strip().lower()
        est_bytes = int(req.est_audio_s * BYTES_PER_AUDIO_S.get(fmt, 48_000)) + 4096
        job_id = uuid.uuid4().hex
        job = self.store.create(
            job_id,
            owner=owner,
            body=body,
            fmt=fmt,
            seed=req.seed,
            est_audio_s=req.est_audio_s,
            est_bytes=est_bytes,
            at=self.clock(),
            idem=idem,
        )
        if job.id != job_id:  # the job an Idempotency-Key made before
            self._count("replayed")
            return job
        self._count("created")
        say(log.info, job.id, " queued (about %.0f s of audio)", job.est_audio_s)
        self._poke()
        return job

    def _count(self, what: str) -> None:  # /metrics reads them (api/metrics.py)
        with self._lock:
            self.counts[what] += 1

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise JobError(JobErrorKind.NOT_FOUND, f"no job {job_id} (it may have expired)")
        return job

    def cancel(self, job_id: str, wait_s: float = 0.0) -> Job:
        """Cancel a queued or running job; with `wait_s`, wait that long for its run to
        end (its row gone from its worker). JobError NOT_FOUND / CONFLICT (it had ended)."""
        self.store.cancel(job_id, self.clock())
        with self._lock:
            self.counts["cancelled"] += 1
            live = self._live.get(job_id)
            if live is not None:
                live.cancelled = True
        if live is None:  # queued (maybe to go on after a restart): its saved audio is kept
            results.keep_saved(self.store, self.progress, job_id)
        elif live.handle is not None:
            live.handle.cancel()
        say(log.info, job_id, " cancelled")
        if live is not None and wait_s > 0:
            with self._let_go:
                self._let_go.wait_for(lambda: job_id not in self._live, wait_s)
        return self.get(job_id)

    def result_file(self, job: Job) -> Path:  # see results.py
        return results.result_file(self.store, job)

    def describe(self, job: Job) -> dict:
        """The JSON view of a job, with live progress while it runs."""
        with self._lock:
            live = self._live.get(job.id)
            made, handle = (live.audio.made / m.SAMPLE_RATE, live.handle) if live else (0, None)
        if handle is None or job.state is not JobState.RUNNING:
            return job_view(job, job.audio_s, job.worker, now=self.clock(), ttl_s=self.ttl_s)
        worker, note, eta = self.places.shown(handle.id, handle.worker, made, job.est_audio_s)
        return job_view(job, made, worker, now=self.clock(), ttl_s=self.ttl_s, note=note, eta=eta)

    def expire(self) -> int:
        """Forget jobs finished more than ttl_s ago and delete their results."""
        paths = self.store.expire(self.clock() - self.ttl_s)
        for rel in paths:
            with contextlib.suppress(FileNotFoundError):
                (self.store.folder / rel).unlink()
        if paths:
            log.info("Jobs: %d expired result(s) deleted", len(paths))
            self.store.reclaim(force=True)
        return len(paths)

    def owner_cap(self) -> int:
        """How many jobs of one owner may be in the pool at once."""
        return self.owner_running if self.owner_running > 0 else max(1, self._capacity() - 1)

    def _upkeep(self) -> None:
        """Each tick, off the loop: places changed, writes the disk refused, orphans, space."""
        for job_id, worker in self.places.changed():  # None: it waits for a place again
            with contextlib.suppress(JobError):
                self.store.note_worker(job_id, worker, self.clock())
        for job_id, write in list(self._unsettled.items()):
            try:
                write()
            except JobError:
                return  # still full: try again next tick
            self._unsettled.pop(job_id, None)
            say(log.info, job_id, ": its outcome is written down now")
        running = self.store.running_ids()
        with self._lock:
            held = set(self._live) | set(self._unsettled)
        for job_id in running - held:  # no run of this process holds it
            with contextlib.suppress(JobError):
                if self.store.requeue(job_id, "no worker held it", self.clock()):
                    say(log.warning, job_id, " was running without a worker: queued again")
        self.store.reclaim()

    def _write_later(self, job_id: str, write: Callable[[], object], err: JobError) -> None:
        """A store write the disk refused: kept, and tried again each tick."""
        self._unsettled[job_id] = write
        self._disk_full(err)

    def _disk_full(self, err: JobError) -> None:
        self._retry_at = time.monotonic() + DISK_RETRY_S
        if not self._said_full:
            log.error("Jobs: %s", err.message)
            self._said_full = True

    # ---- the loop --------------------------------------------------------

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(wake.set)

    def _on_pool_event(self, event) -> None:
        # a row's place changed (preempted, moved...), or room in the admission queue while
        # a queued job waits for it (a wake at every request cost a query and a thread hop)
        room = self._want_room and event.kind in ("finished", "dispatched")
        if self.places.on_event(event) is not None or room:
            self._poke()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._started.set()
        next_sweep = time.monotonic() + self._sweep_s
        while not self._stopping:
            try:
                await asyncio.to_thread(self._upkeep)
                await self._fill()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self._sweep_s
                    await asyncio.to_thread(self.expire)
            except JobError as e:
                self._disk_full(e)
            except Exception:
                log.exception("Jobs: the runner hit an error; it carries on")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
        await self._wind_down()

    async def _wind_down(self) -> None:
        pending = set(self._tasks)
        while pending and (left := self._stop_at - time.monotonic()) > 0:  # hurry() ends it
            _, pending = await asyncio.wait(pending, timeout=min(left, 0.1))
        if not pending:
            return
        with self._lock:
            lives = list(self._live.values())
        for live in lives:
            live.stopping = True
            live.handle.cancel()
        _, pending = await asyncio.wait(pending, timeout=STOP_CANCEL_WAIT_S)
        for task in pending:  # still `running` in the store: the next start requeues it
            task.cancel()

    async def _fill(self) -> None:
        """Hand queued jobs to the pool, oldest first, while its queue has room."""
        while not (self._stopping or self._held) and time.monotonic() >= self._retry_at:
            self._want_room = True  # before the look: an event after it wakes the loop
            if self.pool.queue_length() >= self.queue_depth:
                return
            if out_of_space(self.store.folder):  # its progress could not be saved
                self._retry_at = time.monotonic() + DISK_RETRY_S
                return
            job = self.store.next_queued(self.owner_cap())
            if job is None:
                self._want_room = False  # a new job pokes the loop itself (submit)
                return
            try:
                req = await asyncio.to_thread(self._build, self.store.body(job.id))
                req, made = self.progress.resume(job.id, req)  # a restart goes on
            except JobError as e:
                if e.kind is JobErrorKind.STORAGE:  # its body is gone or damaged on disk
                    self._fail(job.id, e.kind.value, e.message)
                continue  # else it expired or went away meanwhile
            except m.PoolError as e:
                self._fail(job.id, e.kind.value, f"the stored request cannot run: {e.message}")
                continue
            except Exception as e:
                say(log.exception, job.id, ": building its request failed")
                self._fail(job.id, INTERNAL, f"building the request failed: {e!r}")
                continue
            if self._stopping or self._held:
                return  # it stays queued for the next start
            try:
                handle = self.pool.submit(replace(req, priority=m.Priority.BATCH.value))
            except m.PoolError as e:
                if e.kind in RETRY_LATER:
                    if not self._said_later:
                        log.info("Jobs: the pool says %s; jobs wait", e.kind.value)
                        self._said_later = True
                    self._retry_at = time.monotonic() + RETRY_S
                    return
                self._fail(job.id, e.kind.value, e.message)
                continue
            self._said_later = False
            live = Live(job.id, job.format, handle, made)
            self.places.track(handle.id, job.id, made.made / m.SAMPLE_RATE)
            with self._lock:
                self._live[job.id] = live
            try:
                claimed = self.store.claim(job.id, handle.id, self.clock())
            except JobError as e:  # the disk is full: it stays queued, the run stops
                claimed = False
                self._disk_full(e)
            if not claimed:
                self._forget(job.id)  # cancelled while it was being built, or not written
                self.places.forget(handle.id)
                handle.cancel()
                if time.monotonic() < self._retry_at:
                    return
                continue
            self._said_full = False
            say(log.info, job.id, " running as request %s", handle.id, request_id=handle.id)
            task = asyncio.create_task(self._follow(live))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _follow(self, live: Live) -> None:
        handle = live.handle
        try:
            try:
                await handle.started()
                with contextlib.suppress(JobError):  # a note only: a full disk skips it
                    self.store.note_worker(live.job_id, handle.worker, self.clock())
                async for pcm in handle.stream(release=True):  # the handle lets it go
                    live.audio.add(pcm)
                    self.progress.tick(live.job_id, handle.history, live.audio)
                    if ending.too_far(self, live):  # the disk stays full: go on later
                        ending.set_aside(self, live)
            except m.PoolError:
                pass  # the handle's outcome says how it ended
            await ending.conclude(self, live)
        except Exception as e:
            say(log.exception, live.job_id, ": following it failed")
            handle.cancel()  # no one reads it now: its row must not run on
            self.progress.drop(live.job_id)
            self._fail(live.job_id, INTERNAL, f"the server lost track of this job: {e!r}")
        finally:
            self._forget(live.job_id)
            self.places.forget(handle.id)
            self._poke()

    def _forget(self, job_id: str) -> None:
        with self._let_go:
            self._live.pop(job_id, None)
            self._let_go.notify_all()

    def _fail(self, job_id: str, code: str, message: str, worker: int | None = None) -> None:
        at = self.clock()

        def fail() -> None:
            if self.store.fail(job_id, code, message, at, worker):
                self._count("failed")
                say(log.warning, job_id, " failed: %s: %s", code, message)

        try:
            fail()
        except JobError as e:
            self._write_later(job_id, fail, e)
