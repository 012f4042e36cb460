"""A fake pool for the job runner's tests, without processes: threads play a worker's
events (Started, 0.5 s chunks, Done) into real RequestHandles."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
from conftest import wait_until

from vibevoice_pool.jobs.runner import JobRunner
from vibevoice_pool.jobs.store import JobState, JobStore
from vibevoice_pool.pool.handle import RequestHandle
from workers.wire import messages as m
from workers.wire.estimate import audio_seconds_for


class FakeDispatcher:
    def __init__(self):
        self.listeners = []
        self.waiting = 0  # what queue_length() answers

    def queue_length(self) -> int:
        return self.waiting


class FakePool:
    """Plays Started, 0.5 s chunks and Done into each handle from a thread.
    hold(n): every request pauses after n chunks until release(); `refuse`
    makes submit raise that kind."""

    placements = (0, 1)

    def __init__(self):
        self.dispatcher = FakeDispatcher()
        self.gate = threading.Event()
        self.gate.set()
        self.begin = threading.Event()  # cleared: requests wait in the admission queue
        self.begin.set()
        self.free_chunks = 10**9
        self.refuse: m.ErrorKind | None = None
        self.submitted: list[str] = []
        self.cancelled: set[str] = set()
        self.stop_reason = m.StopReason.EOS.value  # what Done says ended each row

    def subscribe(self, listener) -> None:
        self.dispatcher.listeners.append(listener)

    def unsubscribe(self, listener) -> None:
        self.dispatcher.listeners.remove(listener)

    def queue_length(self) -> int:
        return self.dispatcher.queue_length()

    def hold(self, after_chunks: int = 0) -> None:
        self.free_chunks = after_chunks
        self.gate.clear()

    def release(self) -> None:
        self.free_chunks = 10**9
        self.gate.set()

    def submit(self, req: m.Request) -> RequestHandle:
        if self.refuse is not None:
            raise m.PoolError(self.refuse, "not now", True)
        handle = RequestHandle(req, self.cancelled.add)
        handle.worker = len(self.submitted) % 2
        self.submitted.append(req.id)
        threading.Thread(target=self._play, args=(handle,), daemon=True).start()
        return handle

    def may_go_on(self, handle: RequestHandle, seq: int) -> bool:
        """Wait until chunk `seq` may be made (hold/release); False once the request is
        cancelled, its Failed pushed."""
        req = handle.request
        while seq >= self.free_chunks and not self.gate.wait(0.01):
            if req.id in self.cancelled:
                break
        if req.id in self.cancelled:
            handle.push(m.Failed(req.id, m.ErrorKind.CANCELLED, "cancelled"))
            return False
        return True

    def _play(self, handle: RequestHandle) -> None:
        req = handle.request
        self.begin.wait()
        handle.push(m.Started(req.id))
        total = int(round(req.est_audio_s * m.SAMPLE_RATE))
        step, done, seq = m.SAMPLE_RATE // 2, 0, 0
        while done < total:
            if not self.may_go_on(handle, seq):
                return
            n = min(step, total - done)
            handle.push(m.Chunk(req.id, seq, np.full(n, 0.1, np.float32)))
            done, seq = done + n, seq + 1
            time.sleep(0.002)
        handle.push(m.Done(req.id, total / m.SAMPLE_RATE, 0.01, stop_reason=self.stop_reason))


def build(body: dict) -> m.Request:
    script = body.get("script", "")
    if not script.strip():
        raise m.PoolError(m.ErrorKind.BAD_INPUT, "the script is empty")
    return m.Request(
        id=uuid.uuid4().hex[:16],
        turns=(m.Turn(0, script),),
        seed=body.get("seed") or 1234,
        est_audio_s=audio_seconds_for(script),
    )


def runners(tmp_path):
    """The `runner` fixture's body: make(pool=None, store_=None, **kw) starts a
    JobRunner on the fake pool; every one made is stopped at the end."""
    made = []

    def make(pool=None, store_=None, **kw) -> JobRunner:
        st = store_ or JobStore.open(tmp_path / "data")
        r = JobRunner(st, pool or FakePool(), build, queue_depth=2, **kw).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def wait_state(r: JobRunner, job_id: str, state: JobState, timeout: float = 10):
    wait_until(lambda: r.store.get(job_id).state is state, timeout, what=f"{job_id} {state}")
    return r.store.get(job_id)


SCRIPT = "Speaker 1: " + "a" * 49  # 4.0 s of audio (the fake estimates the whole text)
