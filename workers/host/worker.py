"""The worker process: one per device slot, forked from the zygote or spawned.

    parent                          worker (this module, `run`)
    ------                          ---------------------------
    request queue  --Synthesize-->  main thread, when idle and between two steps:
                   --Cancel------>  a request joins the running rows at the next
                   --Shutdown---->  step, a cancel frees its row; each step is
                                    step_host.StepHost.run_step()
    response pipe  <--Ready/...---  main thread: engine.load(), then engine steps
    death pipe     (EOF = parent gone)  watcher thread: os._exit
    StatusBoard row                 heartbeat thread + main thread write it

The device is pinned by CUDA_VISIBLE_DEVICES (in PCI bus order) first thing in `run`: before the
engine imports torch (spawned), or before any CUDA call (forked from the zygote,
which has imported torch but never initialised CUDA), so the worker sees its
GPU as cuda:0. SIGINT and SIGTERM are ignored: they reach
the whole process group, and the parent decides how the pool drains.

Its Python stack is one signal away: faulthandler writes every thread's stack
to the spec's stack file on STACK_SIGNAL (the parent sends it to a hung or
stalled worker before SIGKILL) and on a fatal error (SIGSEGV, SIGABRT, ...);
the parent puts the file in its log when the worker has died.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from workers.engines.contract import EngineSpec
from workers.host import log_lines, preemption
from workers.host.sink import HostSink
from workers.host.step_host import StepHost
from workers.host.voice_cache import VoiceCache
from workers.wire import messages as m
from workers.wire.board import Col, StatusBoard, WorkerState

STACK_SIGNAL = signal.SIGUSR1  # "write your stack": faulthandler answers it, the worker lives on
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
    log_format: str = "text"  # or "json": the parent's --log-format
    env: dict = field(default_factory=dict)
    stack_file: str = ""  # where faulthandler writes its stacks ("" = nowhere)


def pin_device(cuda_device: int | None, env) -> None:
    """Leave the worker one GPU, `cuda_device` as nvidia-smi and NVML number it (None:
    none). CUDA numbers GPUs fastest first unless told to follow the PCI bus, as
    nvidia-smi does: on a machine of mixed GPUs a worker would otherwise run on
    another card than the one the panel and the monitor show for it."""
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = "" if cuda_device is None else str(cuda_device)


def run(spec: WorkerSpec, requests, responses, death) -> None:
    """Entry point of a worker process."""
    pin_device(spec.cuda_device, os.environ)
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
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal
        signal.signal(stop, signal.SIG_IGN)
    _dump_stacks_to(spec.stack_file)
    log_lines.setup_worker(spec.log_level, spec.log_format, spec.slot)
    _watch_parent(death)
    board = StatusBoard.attach(spec.board_name, spec.board_rows)
    Worker(spec, board, requests, responses).main()


def _dump_stacks_to(path: str) -> None:
    if not path:
        return
    stacks = open(path, "w")  # open for the whole life of the process
    faulthandler.enable(file=stacks, all_threads=True)
    faulthandler.register(STACK_SIGNAL, file=stacks, all_threads=True)


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
        self._shutdown = False
        self._following = 0  # requests the parent said are right behind the last one
        self.voices = VoiceCache()  # the voice samples the parent sent to keep
        self.sink = _BoardSink(self)
        self.host: StepHost | None = None
        self._poller = select.poll()  # the request pipe's: Connection.poll builds a selector
        self._poller.register(requests.fileno(), select.POLLIN)  # at every call

    def _waiting(self, timeout: float | None) -> bool:
        """A message (or the parent's end) waits on the request pipe, within `timeout`."""
        return bool(self._poller.poll(None if timeout is None else max(0.0, timeout) * 1000))

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
        calls it when idle and between steps, never inside one: a request that
        arrives joins the running set at the next step, a Cancel frees its row there."""
        try:
            if not self._waiting(timeout):
                return
            while True:
                msg = self.requests.recv()
                if isinstance(msg, m.Synthesize):
                    self._following = msg.following
                    try:
                        req = self.voices.resolve(msg.request)
                    except m.PoolError as e:
                        log.error("%s", e.message)
                        self.send(m.Failed(msg.request.id, e.kind, e.message))
                    else:
                        self.sink.track(req)
                        self.host.submit(req)
                elif isinstance(msg, m.Cancel):
                    self.host.cancel(msg.request_id)
                elif isinstance(msg, m.HandBack):
                    self.host.hand_back(msg.request_id)
                elif isinstance(msg, m.Shutdown):
                    self._shutdown = True
                if not self._waiting(0):
                    return
        except (EOFError, OSError):
            os._exit(0)  # the parent is gone

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
            from workers.engines.factory import build_engine

            engine = build_engine(self.spec.engine)
            info = engine.load()
        except m.PoolError as e:
            self._boot_failed(e)
        except Exception as e:  # any load failure is reported, typed by its class
            self._boot_failed(m.unexpected(e))
        self.host = StepHost(engine, self.sink, preempt=preemption.victim, give_back=True)
        b.set(row, Col.BATCH_LIMIT, engine.max_rows)
        b.set(row, Col.PROGRESS, time.monotonic())
        b.set(row, Col.WORKER_STATE, WorkerState.IDLE)
        self.send(m.Ready(self.row, os.getpid(), info, time.monotonic() - t0))
        self._loop()

    def _boot_failed(self, e: m.PoolError) -> None:
        log.error("engine failed to load: %s", e.message)
        self.board.set(self.row, Col.WORKER_STATE, WorkerState.STOPPING)
        self.send(m.BootFailed(e.kind, e.message, e.traceback))
        self.responses.close()
        os._exit(1)

    def _loop(self) -> None:
        host, b, row = self.host, self.board, self.row
        while True:
            if self._shutdown:
                # Sent only once the parent holds none of this worker's requests (each
                # was answered, or moved): rows still running here are no one's work.
                break
            if host.idle:
                self._idle()
                self._poll(None)
                continue
            self._poll(0)
            if not host.live and self._following:
                # A burst the parent sent together starts together (one batched prefill).
                deadline = time.monotonic() + BURST_WAIT_S
                while self._following and len(host.pending) < host.max_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._poll(left)
            if b.get(row, Col.WORKER_STATE) != WorkerState.BUSY:
                # the stall clock starts with the work, not at the last step before idling
                b.set(row, Col.PROGRESS, time.monotonic())
                b.set(row, Col.WORKER_STATE, WorkerState.BUSY)
            # the rows this step holds at most (the schedule inside run_step decides)
            b.set(row, Col.BATCH_ROWS, min(host.max_rows, host.live + len(host.pending)))
            host.run_step()
            b.set(row, Col.BATCH_ROWS, host.live)
            b.set(row, Col.BATCH_LIMIT, host.max_rows)
            b.set(row, Col.SPEED, host.speed)
        self.board.set(self.row, Col.WORKER_STATE, WorkerState.STOPPING)
        self.responses.close()
        os._exit(0)

    def _idle(self) -> None:
        b, row = self.board, self.row
        b.set(row, Col.BATCH_ROWS, 0)
        b.set(row, Col.WORKER_STATE, WorkerState.IDLE)
        reusable = getattr(self.host.engine, "reusable_bytes", None)
        if reusable is not None:
            b.set(row, Col.MEM_REUSABLE, reusable())


class _BoardSink(HostSink):
    """The worker's sink: the rows' messages go out on its response pipe, and the
    board's totals follow them."""

    def __init__(self, worker: Worker):
        super().__init__(worker.send)
        self.w = worker

    def done(self, audio_s: float, compute_s: float) -> None:
        b, row = self.w.board, self.w.row
        b.add(row, Col.AUDIO_S, audio_s)
        b.add(row, Col.COMPUTE_S, compute_s)
        b.add(row, Col.COMPLETED, 1)

    def failed(self) -> None:
        self.w.board.add(self.w.row, Col.FAILED, 1)

    def step(self) -> None:
        self.w.board.set(self.w.row, Col.PROGRESS, time.monotonic())
