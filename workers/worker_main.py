"""The worker process: one per device slot, forked from the zygote or spawned.

    parent                          worker (this module, `run`)
    ------                          ---------------------------
    request queue  --Synthesize-->  main thread, when idle and once per generation
                   --Cancel------>  step: pending / cancelled
                   --Shutdown---->
    response pipe  <--Ready/...---  main thread: engine.load(), then batches
    death pipe     (EOF = parent gone)  watcher thread: os._exit
    StatusBoard row                 heartbeat thread + main thread write it

The device is pinned by CUDA_VISIBLE_DEVICES first thing in `run`: before the
engine imports torch (spawned), or before any CUDA call (forked from the zygote,
which has imported torch but never initialised CUDA), so the worker sees its
GPU as cuda:0. SIGINT and SIGTERM are ignored: they reach
the whole process group, and the parent decides how the pool drains.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from workers import messages as m
from workers.batching import BatchSizer, run_engine, speed_ema, take_batch
from workers.board import Col, StatusBoard, WorkerState
from workers.engine import EngineSpec
from workers.voice_cache import VoiceCache

BOOT_FAILED_EXIT = 3
BURST_WAIT_S = 0.05  # longest wait for the rest of a burst before a batch starts
log = logging.getLogger("vibevoice_pool.worker")


@dataclass(frozen=True)
class WorkerSpec:
    slot: int
    generation: int
    engine: EngineSpec
    board_name: str
    board_rows: int
    cuda_device: int | None = None  # the physical CUDA ordinal, None for CPU / sim
    heartbeat_s: float = 0.25
    log_level: str = "INFO"
    env: dict = field(default_factory=dict)


def run(spec: WorkerSpec, requests, responses, death) -> None:
    """Entry point of a worker process."""
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if spec.cuda_device is None else str(spec.cuda_device)
    threads = str(spec.engine.torch_threads)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    os.environ.update(spec.env)
    # Forked from the zygote, torch is loaded already and sized its thread pool
    # from the zygote's environment: size it as a spawned worker's would be.
    torch = sys.modules.get("torch")
    if torch is not None and os.environ["OMP_NUM_THREADS"].isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    # Ctrl+C and `kill -TERM <group>` (systemd, timeout) reach every process of
    # the group; only the parent decides how the pool drains, so a worker ends
    # by Shutdown, by SIGKILL, or when its death pipe says the parent is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s worker {spec.slot} %(levelname)s %(message)s",
    )
    _watch_parent(death)
    board = StatusBoard.attach(spec.board_name, spec.board_rows)
    Worker(spec, board, requests, responses).main()


def _watch_parent(death) -> None:
    def watch():
        try:
            death.recv()  # the parent never sends: this returns only by EOF
        except (EOFError, OSError):
            pass
        os._exit(0)

    threading.Thread(target=watch, name="death-pipe", daemon=True).start()


class Worker:
    def __init__(self, spec: WorkerSpec, board: StatusBoard, requests, responses):
        self.spec = spec
        self.row = spec.slot
        self.board = board
        self.requests = requests
        self.responses = responses
        self._send_lock = threading.Lock()
        self._pending: collections.deque[m.Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._shutdown = False
        self._following = 0  # requests the parent said are right behind the last one
        self.voices = VoiceCache()  # the voice samples the parent sent to keep

    # ---- plumbing ------------------------------------------------------

    def send(self, msg) -> None:
        try:
            with self._send_lock:
                self.responses.send(msg)
        except (BrokenPipeError, EOFError, OSError):
            os._exit(0)  # the parent is gone

    def _beat(self) -> None:
        while True:
            self.board.set(self.row, Col.HEARTBEAT, time.monotonic())
            time.sleep(self.spec.heartbeat_s)

    def _poll(self, timeout: float | None) -> None:
        """Take every message waiting on the request queue, waiting up to `timeout`
        for the first (None: as long as it takes; 0: not at all). The main thread
        calls it when idle and once per generation step, so a Cancel is seen
        within a step and no thread stands between the queue and the engine."""
        try:
            if not self.requests.poll(timeout):
                return
            while True:
                msg = self.requests.recv()
                if isinstance(msg, m.Synthesize):
                    self._following = msg.following
                    try:
                        self._pending.append(self.voices.resolve(msg.request))
                    except m.PoolError as e:
                        log.error("%s", e.message)
                        self.send(m.Failed(msg.request.id, e.kind, e.message))
                elif isinstance(msg, m.Cancel):
                    self._cancel(msg.request_id)
                elif isinstance(msg, m.Shutdown):
                    self._shutdown = True
                if not self.requests.poll(0):
                    return
        except (EOFError, OSError):
            os._exit(0)  # the parent is gone

    def _cancel(self, rid: str) -> None:
        for req in self._pending:
            if req.id == rid:
                self._pending.remove(req)
                self.send(m.Failed(rid, m.ErrorKind.CANCELLED, "cancelled before it started"))
                return
        self._cancelled.add(rid)

    # ---- life ----------------------------------------------------------

    def main(self) -> None:
        b, row = self.board, self.row
        b.set(row, Col.PID, os.getpid())
        b.set(row, Col.GENERATION, self.spec.generation)
        b.set(row, Col.WORKER_STATE, WorkerState.BOOTING)
        for col in (Col.AUDIO_S, Col.COMPUTE_S, Col.COMPLETED, Col.FAILED, Col.SPEED):
            b.set(row, col, 0.0)
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        t0 = time.monotonic()
        try:
            from workers.engine import build_engine

            engine = build_engine(self.spec.engine)
            info = engine.load()
        except m.PoolError as e:
            self._boot_failed(e.kind, e.message)
        except Exception as e:  # any load failure is reported, typed by its class
            self._boot_failed(m.ErrorKind.ENGINE_ERROR, f"{type(e).__name__}: {e}")
        self.sizer = BatchSizer(info.max_batch_size)
        b.set(row, Col.BATCH_LIMIT, self.sizer.limit)
        b.set(row, Col.PROGRESS, time.monotonic())
        b.set(row, Col.WORKER_STATE, WorkerState.IDLE)
        self.send(m.Ready(self.row, os.getpid(), info, time.monotonic() - t0))
        self._loop(engine)

    def _boot_failed(self, kind: m.ErrorKind, message: str) -> None:
        log.error("engine failed to load: %s", message)
        self.board.set(self.row, Col.WORKER_STATE, WorkerState.STOPPING)
        self.send(m.BootFailed(kind, message))
        self.responses.close()
        os._exit(BOOT_FAILED_EXIT)

    def _loop(self, engine) -> None:
        while True:
            if not self._pending:
                if self._shutdown:
                    break
                self._poll(None)
                continue
            # A burst the parent sent together is batched together.
            deadline = time.monotonic() + BURST_WAIT_S
            while self._following and len(self._pending) < self.sizer.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._poll(left)
            self._run_batch(engine, take_batch(self._pending, self.sizer.limit))
        self.board.set(self.row, Col.WORKER_STATE, WorkerState.STOPPING)
        self.responses.close()
        os._exit(0)

    def _run_batch(self, engine, batch: list[m.Request]) -> None:
        b, row = self.board, self.row
        sink = _Sink(self, batch)
        b.set(row, Col.CURRENT, batch[0].seq)
        b.set(row, Col.BATCH_ROWS, len(batch))
        b.set(row, Col.BATCH_AUDIO_S, 0.0)
        b.set(row, Col.PROGRESS, time.monotonic())
        b.set(row, Col.WORKER_STATE, WorkerState.BUSY)
        for req in batch:
            self.send(m.Started(req.id, len(batch), sink.t0))
        run_engine(engine, batch, sink)
        if self.sizer.record(len(batch), sink.ooms):
            b.set(row, Col.BATCH_LIMIT, self.sizer.limit)
        reusable = getattr(engine, "reusable_bytes", None)
        if reusable is not None:
            b.set(row, Col.MEM_REUSABLE, reusable())
        wall = time.monotonic() - sink.t0
        b.set(row, Col.SPEED, speed_ema(b.get(row, Col.SPEED), sink.audio_s, wall))
        self._cancelled.difference_update(r.id for r in batch)
        b.set(row, Col.CURRENT, 0)
        b.set(row, Col.BATCH_ROWS, 0)
        b.set(row, Col.WORKER_STATE, WorkerState.IDLE)


class _Sink:
    """The BatchSink the worker hands to its engine for one batch."""

    def __init__(self, worker: Worker, batch: list[m.Request]):
        self.w = worker
        self.t0 = time.monotonic()
        self.open = {r.id: r for r in batch}
        self.samples = dict.fromkeys(self.open, 0)
        self.seqs = dict.fromkeys(self.open, 0)
        self.audio_s = 0.0
        self.ooms = 0

    def chunk(self, request_id: str, pcm) -> None:
        if request_id not in self.open:
            return
        n = len(pcm)
        self.samples[request_id] += n
        self.audio_s += n / m.SAMPLE_RATE
        self.w.board.set(self.w.row, Col.BATCH_AUDIO_S, self.audio_s)
        self.w.send(m.Chunk(request_id, self.seqs[request_id], pcm))
        self.seqs[request_id] += 1

    def finish(self, request_id: str, stop_reason: str = m.StopReason.EOS.value) -> None:
        if self.open.pop(request_id, None) is None:
            return
        audio_s = self.samples[request_id] / m.SAMPLE_RATE
        compute_s = time.monotonic() - self.t0
        b, row = self.w.board, self.w.row
        b.add(row, Col.AUDIO_S, audio_s)
        b.add(row, Col.COMPUTE_S, compute_s)
        b.add(row, Col.COMPLETED, 1)
        self.w.send(m.Done(request_id, audio_s, compute_s, stop_reason))

    def fail(self, request_id: str, error: m.PoolError) -> None:
        if self.open.pop(request_id, None) is None:
            return
        self.w.board.add(self.w.row, Col.FAILED, 1)
        self.ooms += error.kind == m.ErrorKind.OUT_OF_MEMORY
        self.w.send(m.Failed(request_id, error.kind, error.message, error.retryable))

    def fail_open(self, error: m.PoolError) -> None:
        for rid in list(self.open):
            self.fail(rid, error)

    def cancelled(self, request_id: str) -> bool:
        return request_id in self.w._cancelled

    def step(self) -> None:
        self.w.board.set(self.w.row, Col.PROGRESS, time.monotonic())
        self.w._poll(0)  # cancels (and new requests) that arrived during the step
