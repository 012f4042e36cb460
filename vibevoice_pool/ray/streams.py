"""The request path of the ray backend: one Serve stream per request.

    Dispatcher (under its lock) --send(Synthesize)--> Streams.sender(): a thread
        calls the slot's handle with stream=True; each item the replica yields
        is a list of messages (what one step made for the request: Started,
        Chunk, Done / Failed), fed one by one, in order, to on_message(slot)
    --send(Cancel)--> the stream's Serve call is cancelled; its thread answers
        Failed(cancelled), as a local worker does
    --send(HandBack)--> the replica's hand_back (a removed slot's rows move): the
        stream ends with Preempted, and the dispatcher resumes the row elsewhere
    a stream that raises RayActorError (the replica is gone) -> `lost(slot,
        generation, why)`, which the RaySupervisor turns into worker_lost

Each stream carries the generation of the replica it was sent to. When a slot
is lost its streams are marked stale: whatever they still receive is dropped
and their calls are cancelled, so a request requeued elsewhere never hears
from its old attempt. Also here: the Slot record the supervisor and the
streams share, and the worker-owned board columns written on a replica's
behalf (busy / idle, completed, failed, audio and compute seconds).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Callable

from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import (
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.slots import SlotBase
from workers.host.ray_replica import ReplicaStats
from workers.wire import messages as m
from workers.wire.board import Col, StatusBoard, WorkerState

log = logging.getLogger("vibevoice_pool")

# What a Serve call raises when the replica behind it is gone (typed, never
# matched by message): the actor died or is unreachable, or Serve dropped it.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


@dataclass
class Stream:
    """One request on its way through one replica."""

    request: m.Request
    generation: int
    handle: object  # the slot's streaming synthesize handle when it was sent
    response: object = None  # DeploymentResponseGenerator, once sent
    stale: bool = False  # its slot was lost: drop what still comes, cancel it
    started: bool = False


@dataclass
class Slot(SlotBase):
    """One pool slot on Ray: its Serve application and the replica attached."""

    app: str = ""  # the Serve application now deployed for this slot
    handle: object = None  # its DeploymentHandle; None while not deployed
    synth: object = None  # the handle for synthesize, streaming
    pinger: object = None  # the handle for ping
    mover: object = None  # the handle for hand_back
    deploys: int = 0  # token: a deploy thread acts only if it is still the latest
    deploying: bool = False
    attached: bool = False  # the dispatcher may send to it
    boot_id: str = ""  # of the replica attached last
    stopped: bool = False
    busy_rows: int = 0
    progress_age: float | None = None  # since the engine's last step, as last pinged
    pid: int | None = None  # the replica's, on its own node
    node: str = ""
    streams: dict[str, Stream] = field(default_factory=dict)

    @property
    def label(self) -> str:
        p = self.placement
        return f"GPU replica {p.cuda_index}" if p.is_gpu else f"CPU replica {self.index}"


class Streams:
    def __init__(
        self,
        board: StatusBoard,
        dispatcher: Dispatcher,
        lost: Callable[[Slot, int, str], None],
        stopping: threading.Event,
    ):
        self.board = board
        self.dispatcher = dispatcher
        self.lost = lost
        self.stopping = stopping
        self._board_lock = threading.Lock()  # read-modify-write of worker columns
        # Serve calls that may wait, made off the callers' locks: a response to
        # cancel, or (handle, request id) for a hand-back
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run_calls, name="ray-cancels", daemon=True).start()

    def close(self) -> None:
        self._calls.put(None)

    # ---- what the dispatcher holds ---------------------------------------

    def sender(self, slot: Slot, generation: int) -> Callable[[object], None]:
        """The `send` for one attached replica. It runs under the dispatcher's
        lock: it takes no lock of the supervisor's and never blocks."""

        def send(msg) -> None:
            if isinstance(msg, m.Synthesize):
                if slot.generation != generation or not slot.attached:
                    return  # lost a moment ago: worker_lost is requeueing this request
                stream = Stream(msg.request, generation, slot.synth)
                slot.streams[msg.request.id] = stream
                threading.Thread(
                    target=self._run, args=(slot, stream), name="ray-stream", daemon=True
                ).start()
            elif isinstance(msg, m.Cancel):
                stream = slot.streams.get(msg.request_id)
                if stream is not None and stream.response is not None:
                    self.cancel(stream.response)
            elif isinstance(msg, m.HandBack):
                mover = slot.mover
                if slot.generation == generation and mover and msg.request_id in slot.streams:
                    self._calls.put((mover, msg.request_id))

        return send

    def drop(self, slot: Slot) -> None:
        """The slot's replica is gone: silence and cancel its streams."""
        for stream in list(slot.streams.values()):
            stream.stale = True
            if stream.response is not None:
                self.cancel(stream.response)
        slot.streams.clear()

    def cancel(self, response) -> None:
        """Cancel a Serve call without blocking: Serve's cancel() waits for the
        call to be assigned to a replica, and our callers hold locks."""
        self._calls.put(response)

    def _run_calls(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                if isinstance(call, tuple):  # a hand-back: the row ends its stream itself
                    mover, request_id = call
                    mover.remote(request_id)
                else:
                    call.cancel()
            except (RayError, RequestCancelledError, CancelledError):
                pass
            except Exception:  # the row then finishes where it runs; never stop this thread
                log.exception("a Serve call for a stream failed")

    def ping(self, targets: list[tuple], timeout_s: float) -> list[tuple]:
        """Ping (slot, token, generation, pinger) targets at once: for each, the
        ReplicaStats, a reason the replica is gone, or None (no answer in time:
        still loading, or being replaced)."""
        sent = [(t, t[3].remote()) for t in targets]
        deadline = time.monotonic() + timeout_s
        out = []
        for target, response in sent:
            try:
                answer = response.result(timeout_s=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                self.cancel(response)
                answer = None
            except REPLICA_GONE as e:
                answer = f"the replica died ({type(e).__name__})"
            except RayError as e:
                log.debug("ping of worker %d failed: %s", target[0].index, type(e).__name__)
                answer = None
            out.append((target, answer))
        return out

    def write_stats(self, slot: Slot, stats: ReplicaStats) -> None:
        """A ping's answer onto the slot's row: the worker columns the replica
        cannot write itself, and the device columns the Monitor leaves to us."""
        b, i = self.board, slot.index
        b.set(i, Col.HEARTBEAT, time.monotonic())
        b.set(i, Col.PID, stats.pid)
        b.set(i, Col.SPEED, stats.speed)
        b.set(i, Col.BATCH_LIMIT, stats.batch_limit)
        b.set(i, Col.BATCH_ROWS, stats.rows)
        b.set(i, Col.MEM_REUSABLE, stats.mem_reusable_bytes)
        b.set(i, Col.MEM_USED, stats.mem_used_bytes)
        b.set(i, Col.MEM_TOTAL, stats.mem_total_bytes)
        b.set(i, Col.UTIL, stats.util)
        b.set(i, Col.HEALTH, 1)

    # ---- one stream ------------------------------------------------------

    def _run(self, slot: Slot, stream: Stream) -> None:
        rid = stream.request.id
        ended = False
        try:
            response = stream.handle.remote(stream.request)
            stream.response = response
            if stream.stale:
                self.cancel(response)
                return
            for item in response:
                for msg in item:  # one item: the messages one step made, in order
                    if stream.stale:
                        self.cancel(response)
                        return
                    ended = ended or isinstance(msg, m.ROW_ENDS)
                    self._deliver(slot, stream, msg)
            if not ended and not stream.stale:
                msg = "the replica closed the stream without an answer"
                self._deliver(slot, stream, m.Failed(rid, m.ErrorKind.ENGINE_ERROR, msg))
        except RequestCancelledError:
            if not stream.stale:  # a Cancel or a timeout: the dispatcher expects an answer
                self._deliver(slot, stream, m.Failed(rid, m.ErrorKind.CANCELLED, "cancelled"))
        except REPLICA_GONE as e:
            self.lost(slot, stream.generation, f"the replica died ({type(e).__name__})")
        except RayTaskError as e:  # the replica's code raised: a bug; the replica lives on
            msg = f"the replica raised {type(e.cause).__name__}: {e.cause}"
            self._deliver(slot, stream, m.Failed(rid, m.ErrorKind.ENGINE_ERROR, msg))
        except RayError as e:  # the transport broke (object lost, node died)
            self.lost(slot, stream.generation, f"Ray lost the request ({type(e).__name__})")
        except Exception as e:  # nothing else is expected; never leave a request hanging
            if self.stopping.is_set():
                return
            log.exception("stream of request %s on worker %d failed", rid, slot.index)
            msg = f"{type(e).__name__}: {e}"
            self._deliver(slot, stream, m.Failed(rid, m.ErrorKind.ENGINE_ERROR, msg))
        finally:
            if slot.streams.get(rid) is stream:
                del slot.streams[rid]
            if stream.started:
                stream.started = False
                self._row_done(slot, stream)

    def _deliver(self, slot: Slot, stream: Stream, msg) -> None:
        """Write the replica's columns for `msg`, then hand it to the dispatcher."""
        b, i = self.board, slot.index
        with self._board_lock:
            if isinstance(msg, m.Started):
                if not stream.started:
                    stream.started = True
                    slot.busy_rows += 1
                b.set(i, Col.WORKER_STATE, WorkerState.BUSY)
                b.set(i, Col.PROGRESS, time.monotonic())
            elif isinstance(msg, m.Chunk):
                b.set(i, Col.PROGRESS, time.monotonic())
            elif isinstance(msg, m.Done):
                b.add(i, Col.COMPLETED, 1)
                b.add(i, Col.AUDIO_S, msg.audio_s)
                b.add(i, Col.COMPUTE_S, msg.compute_s)
            elif isinstance(msg, m.Failed):
                b.add(i, Col.FAILED, 1)
        if isinstance(msg, m.ROW_ENDS) and stream.started:
            stream.started = False
            self._row_done(slot, stream)
        self.dispatcher.on_message(i, msg)

    def _row_done(self, slot: Slot, stream: Stream) -> None:
        with self._board_lock:
            if stream.generation != slot.generation:
                return  # a stream of a replica that is gone; _attach reset the count
            slot.busy_rows = max(0, slot.busy_rows - 1)
            if slot.busy_rows == 0 and slot.attached:
                self.board.set(slot.index, Col.WORKER_STATE, WorkerState.IDLE)
