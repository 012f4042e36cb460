"""The Ray Serve replica of one pool slot: the same Engine a local worker runs.

    RaySupervisor (parent)                      SlotReplica (one Ray actor per slot)
    ----------------------                      ------------------------------------
    synthesize.remote(request), stream=True -->  queue the request; yield lists of its
                                                 messages (Started, Chunk..., then Done
                                                 or Failed) as the engine thread makes
                                                 them: one list a step
    generator.cancel() (Cancel, timeout)    -->  the stream's finally cancels the row
    hand_back.remote(id) (HandBack)         -->  the row leaves at the next step: its
                                                 stream ends with Preempted (its
                                                 history went with its chunks)
    ping.remote()                           -->  ReplicaStats: boot id, pid, speed, ...
    Serve's health check                    -->  check_health(): raises when stalled,
                                                 and Serve replaces the replica

One engine thread per replica loads the engine, then runs it step by step
through the same StepHost (workers/host/step_host.py) as a local worker: between two
steps it hands the host what arrived and the cancels, then calls run_step() (the
host lets waiting requests join, runs the step, sends what it made). The replica's event loop only moves messages between
that thread and each request's stream. What crosses back is the
workers.wire.messages dataclasses, nothing else.

Each item a stream yields is a list: every message of that request that is ready,
in order. Every item costs a Ray object and a round of Serve's streaming, so the
engine thread holds what a step makes and hands each stream its part at once at two
points of the step (once scheduling is done, so Started never waits for the
engine's work; and once the step's output is applied), and after the cancels and
hand-backs it applies between steps; the stream then also takes whatever else is
already queued for it. Nothing waits for more to come: no timer, no count.

Nothing here imports Ray: SlotReplica is a plain class (a test drives it in
process) and vibevoice_pool/ray/cluster.py wraps it with `serve.deployment`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from workers.engines.contract import EngineSpec
from workers.engines.factory import build_engine
from workers.host import preemption
from workers.host.sink import HostSink
from workers.host.step_host import StepHost
from workers.wire import messages as m

log = logging.getLogger("vibevoice_pool.replica")


class StalledError(RuntimeError):
    """Raised by check_health: the engine has made no step for too long."""


@dataclass(frozen=True)
class ReplicaStats:
    """What a replica says of itself; the parent copies it onto the board."""

    boot_id: str  # new for every replica process: a change means Ray replaced it
    pid: int
    node: str  # host name of the Ray node
    ready: bool  # the engine is loaded
    boot_error: m.ErrorKind | None  # set when the engine failed to load
    boot_message: str
    boot_s: float
    info: m.DeviceInfo | None
    rows: int  # requests in the running batch
    pending: int  # requests waiting for the next batch
    speed: float  # audio seconds per wall second (EMA), 0 = unknown
    batch_limit: int
    progress_age_s: float  # since the engine's last step (0 when idle)
    mem_used_bytes: int
    mem_total_bytes: int
    util: float  # percent
    mem_reusable_bytes: int = 0  # held by the engine's allocator, not in use
    gpu_ids: tuple[str, ...] = ()


class SlotReplica:
    """One slot's engine behind Serve. Construct with the slot's EngineSpec."""

    def __init__(self, spec: EngineSpec, stall_timeout_s: float = 300.0):
        self.spec = spec
        self.stall_timeout_s = stall_timeout_s
        self.boot_id = uuid.uuid4().hex[:12]
        self.node = socket.gethostname()
        self._cond = threading.Condition()
        self._pending: collections.deque[m.Request] = collections.deque()  # not yet in the host
        self._cancels: set[str] = set()  # for the engine thread, at the next step boundary
        self._hand_backs: set[str] = set()  # rows to give back (their slot is removed)
        self._host: StepHost | None = None
        self._outboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._made: list = []  # the engine thread's messages since its last flush
        self._rows = 0
        self._stepping = False  # the engine thread is in run_step
        self._progress = 0.0
        self.speed = 0.0
        self.batch_limit = max(1, spec.max_batch_size)
        self.info: m.DeviceInfo | None = None
        self.boot_error: m.ErrorKind | None = None
        self.boot_message = ""
        self.boot_s = 0.0
        self._engine = None
        self._load()
        if self._engine is not None:
            threading.Thread(target=self._loop, name="engine", daemon=True).start()

    # ---- boot ----------------------------------------------------------

    def _load(self) -> None:
        t0 = time.monotonic()
        threads = str(self.spec.torch_threads)
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)
        try:
            engine = build_engine(self.spec)
            self.info = engine.load()
        except m.PoolError as e:
            self.boot_error, self.boot_message = e.kind, e.message
        except Exception as e:  # any load failure is reported, typed by its class
            self.boot_error = m.ErrorKind.ENGINE_ERROR
            self.boot_message = f"{type(e).__name__}: {e}"
        else:
            self._engine = engine
            self.batch_limit = engine.max_rows
        self.boot_s = time.monotonic() - t0
        if self.boot_error is not None:
            log.error("engine failed to load: %s", self.boot_message)

    # ---- what Serve calls ----------------------------------------------

    async def synthesize(self, request: m.Request):
        """Run one request; yield lists of its messages (each what is ready, in
        order), the last one ending with Done, Failed or Preempted."""
        if self._engine is None:
            yield [m.Failed(request.id, m.ErrorKind.UNAVAILABLE, self.boot_message, True)]
            return
        queue: asyncio.Queue = asyncio.Queue()  # of lists of messages
        with self._cond:
            self._outboxes[request.id] = (asyncio.get_running_loop(), queue)
            self._pending.append(request)
            self._cond.notify_all()
        finished = False
        try:
            while True:
                msgs = await queue.get()
                while not queue.empty():  # flushes that came while we were away
                    msgs += queue.get_nowait()
                ends = [i for i, msg in enumerate(msgs) if isinstance(msg, m.ROW_ENDS)]
                finished = bool(ends)
                yield msgs[: ends[0] + 1] if ends else msgs  # nothing follows a row's end
                if finished:
                    return
        finally:
            if not finished:  # the caller cancelled or went away: free the row
                self.cancel(request.id)
            with self._cond:
                self._outboxes.pop(request.id, None)

    def cancel(self, request_id: str) -> None:
        with self._cond:
            for req in self._pending:
                if req.id == request_id:
                    self._pending.remove(req)
                    self._send(
                        request_id, [m.Failed(request_id, m.ErrorKind.CANCELLED, "cancelled")]
                    )
                    return
            self._cancels.add(request_id)
            self._cond.notify_all()

    async def hand_back(self, request_id: str) -> None:
        """Give this row back at the next step (its slot is being removed): its
        stream ends with Preempted, and the parent resumes it on another replica
        from the history its chunks carried."""
        with self._cond:
            self._hand_backs.add(request_id)
            self._cond.notify_all()

    async def ping(self) -> ReplicaStats:
        return self.stats()

    async def check_health(self) -> None:
        """Serve's health check: a busy engine with no step for stall_timeout_s
        is stuck (a hung kernel); raising makes Serve replace the replica."""
        age = self._progress_age()
        if age > self.stall_timeout_s:
            raise StalledError(
                f"stalled: no generation step for {age:.0f} s "
                f"(stall_timeout_s={self.stall_timeout_s:g})"
            )

    # ---- status --------------------------------------------------------

    def _progress_age(self) -> float:
        return time.monotonic() - self._progress if self._rows or self._stepping else 0.0

    def stats(self) -> ReplicaStats:
        used, total, util = _memory(self.info)
        with self._cond:
            pending = len(self._pending) + (len(self._host.pending) if self._host else 0)
        return ReplicaStats(
            boot_id=self.boot_id,
            pid=os.getpid(),
            node=self.node,
            ready=self._engine is not None,
            boot_error=self.boot_error,
            boot_message=self.boot_message,
            boot_s=self.boot_s,
            info=self.info,
            rows=self._rows,
            pending=pending,
            speed=self.speed,
            batch_limit=self.batch_limit,
            progress_age_s=self._progress_age(),
            mem_used_bytes=used,
            mem_total_bytes=total,
            util=util,
            mem_reusable_bytes=self._reusable(),
            gpu_ids=tuple(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")),
        )

    def _reusable(self) -> int:
        reusable = getattr(self._engine, "reusable_bytes", None)
        return int(reusable()) if reusable is not None else 0

    # ---- the engine thread ---------------------------------------------

    def _post(self, msg) -> None:
        """A message the engine thread made: held until its next flush."""
        self._made.append(msg)

    def _flush(self) -> None:
        """Hand each stream what the engine thread made for it since the last flush,
        as one list (engine thread only)."""
        if not self._made:
            return
        made, self._made = self._made, []
        by_request: dict[str, list] = {}
        for msg in made:
            by_request.setdefault(msg.id, []).append(msg)
        for request_id, msgs in by_request.items():
            self._send(request_id, msgs)

    def _send(self, request_id: str, msgs: list) -> None:
        """Hand messages to their request's stream (from any thread)."""
        box = self._outboxes.get(request_id)
        if box is None:
            return  # the stream is gone (cancelled by its caller)
        loop, queue = box
        try:
            loop.call_soon_threadsafe(queue.put_nowait, msgs)
        except RuntimeError:  # the loop is closed: the replica is stopping
            pass

    def _loop(self) -> None:
        sink = _ReplicaSink(self)
        host = self._host = StepHost(
            self._engine,
            sink,
            preempt=preemption.victim,
            give_back=True,
            scheduled=self._flush,
        )
        while True:
            with self._cond:
                while not (self._pending or self._cancels or self._hand_backs or not host.idle):
                    self._cond.wait()
                arrived, cancels = list(self._pending), set(self._cancels)
                hand_backs = set(self._hand_backs)
                self._pending.clear()
                self._cancels.clear()
                self._hand_backs.clear()
            for req in arrived:
                sink.track(req)
                host.submit(req)
            for rid in cancels:
                host.cancel(rid)
            for rid in hand_backs:
                host.hand_back(rid)
            self._flush()
            # a cancel or a hand-back can empty the batch between two steps: the row count (what
            # pings report and the stall check reads) follows it now, not at a
            # step that may never come
            self._rows = host.live
            if host.idle:
                continue
            self._progress = time.monotonic()
            self._stepping = True
            host.run_step()
            self._flush()
            self._stepping = False
            self._rows = host.live
            self.speed = host.speed
            self.batch_limit = host.max_rows


class _ReplicaSink(HostSink):
    """The replica's sink: each row's messages go to its request's stream."""

    def __init__(self, replica: SlotReplica):
        super().__init__(replica._post)
        self.r = replica

    def step(self) -> None:
        self.r._progress = time.monotonic()


_PROC = None  # this process, kept so that cpu_percent measures between pings


def _memory(info: m.DeviceInfo | None) -> tuple[int, int, float]:
    """(used, total, utilisation %) of this replica's device, as far as it knows."""
    if info is not None and info.device.startswith("cuda") and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            free, total = torch.cuda.mem_get_info(0)
            return int(total - free), int(total), 0.0
        except RuntimeError:
            return 0, 0, 0.0
    global _PROC
    try:
        import psutil

        proc = _PROC = _PROC or psutil.Process()
        return (
            int(proc.memory_info().rss),
            int(psutil.virtual_memory().total),
            min(100.0, proc.cpu_percent(None)),
        )
    except ImportError:
        return 0, 0, 0.0
