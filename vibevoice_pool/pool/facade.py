"""Pool: the parent's core, assembled. Board + Dispatcher + Supervisor + Monitor.

The front ends (api/, ui/, jobs/, the CLI) talk to a Pool and nothing below it:

    pool = Pool.start(cfg)          spawn workers, wait for the first ready one
    pool.make_request(turns, ...)   a Request with its estimate (api/speech.py builds it)
    handle = pool.submit(request)   accept (or refuse at once) a request
    pool.subscribe(listener)        the dispatcher's typed events (events.py)
    pool.status()                   the /v1/pool view of the board (words: states.py)
    pool.ready_workers(), queue_length(), work_ratio(), requeued(), where(slot)
    pool.add_worker / remove_worker / restart_worker
    pool.shutdown()                 drain within grace_s, stop the workers

The dispatcher and the slot backend stay behind it: a front end never reaches them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from vibevoice_pool.config import PoolConfig
from vibevoice_pool.pool import events as ev
from vibevoice_pool.pool.devices import (
    Gpu,
    Placement,
    engine_specs,
    find_gpus,
    order_warning,
    plan,
    visible,
)
from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.fair_queue import owner_cap
from vibevoice_pool.pool.handle import RequestHandle
from vibevoice_pool.pool.monitor import Monitor, Nvml, RealNvml
from vibevoice_pool.pool.recovery import RecoveryPolicy
from vibevoice_pool.pool.slots import SlotBackend
from vibevoice_pool.pool.states import SERVING, public_state
from vibevoice_pool.pool.supervisor import Supervisor
from workers.wire import messages as m
from workers.wire.board import Col, SlotState, StatusBoard
from workers.wire.estimate import audio_seconds_for

log = logging.getLogger("vibevoice_pool")

SPARE_ROWS = 16  # board rows kept free for workers added while serving


def supervisor_class(cfg: PoolConfig) -> type[SlotBackend]:
    """The local Supervisor, or the Ray one (same interface) for --backend ray."""
    if cfg.backend == "ray":
        try:
            from vibevoice_pool.ray.backend import RaySupervisor
        except ImportError as e:
            raise m.PoolError(
                m.ErrorKind.BAD_INPUT,
                f"--backend ray needs Ray Serve ({e.name} is missing): "
                "pip install 'vibevoice-pool[ray]'",
            ) from None
        return RaySupervisor
    return Supervisor


@dataclass
class Pool:
    cfg: PoolConfig
    board: StatusBoard
    dispatcher: Dispatcher
    supervisor: SlotBackend  # the local Supervisor or the RaySupervisor
    monitor: Monitor
    model_path: str
    gpus: list[Gpu]

    @property
    def placements(self) -> list[Placement]:
        """Where each slot runs, by slot index (a removed one until an add takes it)."""
        return [s.placement for s in self.supervisor.slots]

    def live_slots(self) -> list[int]:
        """Slot indexes shown on /v1/pool: every slot but the removed and stopped ones."""
        return [
            s.index
            for s in self.supervisor.slots
            if not (s.removed and int(self.board.get(s.index, Col.SLOT_STATE)) == SlotState.STOPPED)
        ]

    @classmethod
    def start(
        cls,
        cfg: PoolConfig,
        *,
        model_path: str = "",
        gpus: list[Gpu] | None = None,
        nvml: Nvml | None = None,
    ) -> Pool:
        """Spawn the workers and wait for the first ready one. `gpus` and `nvml`
        replace the machine's own (tests use fakes)."""
        backend = supervisor_class(cfg)  # Ray missing: said before anything is made
        found = find_gpus() if gpus is None else gpus
        if found:
            log.info(
                "Found %d GPU(s): %s", len(found), ", ".join(f"{g.index} {g.name}" for g in found)
            )
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")  # what torch would have kept to
        usable, note = visible(found, hidden)
        if doubt := order_warning(found, hidden, os.environ.get("CUDA_DEVICE_ORDER")):
            log.warning("%s", doubt)
        if found and note:
            log.info(
                "CUDA_VISIBLE_DEVICES=%s: the pool uses GPUs %s of %s",
                hidden,
                ", ".join(str(g.index) for g in usable) or "none",
                ", ".join(str(g.index) for g in found),
            )
        placements = plan(cfg.gpus, cfg.workers_per_gpu, usable, note)
        gpu_ids = sorted({p.cuda_index for p in placements if p.is_gpu})
        if gpu_ids:
            log.info("Using GPUs: %s (%d worker(s) each)", gpu_ids, cfg.workers_per_gpu)
        else:
            log.info("Using %d CPU worker(s)", len(placements))
        try:
            board = StatusBoard.create(len(placements) + SPARE_ROWS)
        except OSError as e:  # /dev/shm full or too small: before any worker starts
            raise m.PoolError(m.ErrorKind.UNAVAILABLE, e.strerror or str(e)) from None
        recovery = RecoveryPolicy.from_config(cfg)  # one policy: quarantine and every slot
        dispatcher = Dispatcher(
            board,
            policy=cfg.policy,
            max_queue=cfg.max_queue,
            owner_max_queued=owner_cap(cfg.owner_queue_share, cfg.max_queue),
            max_attempts=cfg.max_attempts,
            quarantined=recovery.quarantined,
            mem_reserve_bytes=cfg.mem_reserve_mb * 2**20,
            mem_per_audio_s_bytes=cfg.mem_per_audio_s_mb * 2**20,
            stale_s=max(1.0, 4 * cfg.heartbeat_s),
        )
        specs = engine_specs(cfg, placements, model_path or cfg.model_path)
        supervisor = backend(cfg, placements, specs, board, dispatcher, recovery)
        if nvml is None and gpu_ids:
            nvml = RealNvml.open()
        monitor = Monitor(board, supervisor.monitor_targets, nvml, cfg.monitor_interval_s)
        pool = cls(cfg, board, dispatcher, supervisor, monitor, model_path, found)
        pool.subscribe(pool._log_event)
        log.addFilter(pool._device_field)  # survival.py's lines name a worker, not its device
        try:
            supervisor.start()
            monitor.start()
            supervisor.wait_ready(cfg.boot_timeout_s)
        except BaseException:
            pool.shutdown(grace_s=0)
            raise
        return pool

    # ---- requests ------------------------------------------------------

    def make_request(
        self,
        turns,
        voices=(),
        *,
        cfg_scale=1.3,
        inference_steps=None,
        seed=None,
        stream=False,
        max_audio_s=None,
    ) -> m.Request:
        import random

        cap = min(self.cfg.max_audio_s, max_audio_s or self.cfg.max_audio_s)
        text = "\n".join(t.text for t in turns)
        return m.Request(
            id=self.dispatcher.new_id(),
            turns=tuple(turns),
            voices=tuple(voices),
            cfg_scale=float(cfg_scale),
            inference_steps=int(inference_steps or self.cfg.inference_steps),
            seed=int(seed) if seed is not None else random.randrange(2**31),
            max_audio_s=cap,
            stream=stream,
            est_audio_s=audio_seconds_for(text, cap),
        )

    def submit(self, request: m.Request, owner: str = "") -> RequestHandle:
        """Accept a request, or refuse it at once: OVERLOADED when the queue is
        full, UNAVAILABLE when no worker is up or on its way up. `owner`: the tenant
        (a named key) it waits its turn as; "" for none (fair_queue.py)."""
        alive = (SlotState.RUNNING, SlotState.STARTING, SlotState.BACKOFF)
        if not self.dispatcher.has_workers() and not any(
            int(self.board.get(i, Col.SLOT_STATE)) in alive for i in self.live_slots()
        ):
            raise m.PoolError(
                m.ErrorKind.UNAVAILABLE, "no worker is ready or starting; see /v1/pool", True
            )
        return self.dispatcher.submit(request, owner)

    def ready_workers(self) -> int:
        """Workers that take requests and whose heartbeat is fresh: a frozen worker
        (SIGSTOP, a deadlock) stops counting after `silent_after_s`, long before the
        supervisor replaces it at hang_timeout_s, so /ready leaves a load balancer's
        rotation when every worker is silent."""
        fresh = self.silent_after_s()
        return sum(
            1
            for w in self.status()["workers"]
            if w["state"] in SERVING and (w["heartbeat_age_s"] or 0.0) <= fresh
        )

    def silent_after_s(self) -> float:
        """The heartbeat age past which a serving worker is not counted ready."""
        return max(5.0, 20 * self.cfg.heartbeat_s)

    def queue_length(self) -> int:
        """Requests waiting for a worker."""
        return self.dispatcher.queue_length()

    def work_ratio(self) -> float:
        """Measured audio over estimated audio (a moving average): scales estimates."""
        return self.dispatcher.work_ratio

    def boot_failures(self) -> dict[int, dict[str, int]]:
        """Each live slot's failed boots so far, by reason (slots.BOOT_FAILURES)."""
        return {i: dict(self.supervisor.slots[i].boot_failed) for i in self.live_slots()}

    def requeued(self) -> int:
        """Requests sent back to the queue because their worker was lost, so far."""
        return self.dispatcher.counters.get("requeued", 0)

    def resumes(self) -> dict[str, int]:
        """Rows sent again with their history: resumed, or replayed from their start
        because the worker could not resume them; the decode steps each kept or ran
        again; the batch rows preempted for interactive requests; the rows moved off
        removed workers."""
        c = self.dispatcher.counters
        keys = ("resumed", "resume_refused", "resumed_steps", "recomputed_steps")
        keys += ("preempted", "moved")
        return {k: c.get(k, 0) for k in keys}

    def subscribe(self, listener: ev.Listener) -> None:
        """Call `listener(event)` for each dispatcher event (pool/events.py)."""
        self.dispatcher.subscribe(listener)

    def unsubscribe(self, listener: ev.Listener) -> None:
        self.dispatcher.unsubscribe(listener)

    def where(self, slot: int | None) -> str:
        """A slot as people name it: "GPU 1"; "GPU 1 (worker 3)" where the GPU has several
        workers (workers_per_gpu); "worker 2 (cpu:2)"; "?" if unknown."""
        slots = self.supervisor.slots
        if slot is None or not 0 <= slot < len(slots):
            return "?"
        p = slots[slot].placement
        if not p.is_gpu:
            return f"worker {slot} ({p.device})"
        shared = sum(s.placement.cuda_index == p.cuda_index for s in slots) > 1
        return f"GPU {p.cuda_index} (worker {slot})" if shared else f"GPU {p.cuda_index}"

    def _device_field(self, record: logging.LogRecord) -> bool:
        """A log filter: a line that names its worker gets the worker's device too."""
        if getattr(record, "worker", None) is not None and not hasattr(record, "device"):
            device = self._fields(record.worker).get("device")
            if device is not None:
                record.device = device
        return True

    def _fields(self, slot: int | None) -> dict:
        """A request line's fields about its worker (JSON lines: worker, device)."""
        slots = self.supervisor.slots
        if slot is None or not 0 <= slot < len(slots):
            return {"worker": slot}
        return {"worker": slot, "device": slots[slot].placement.device}

    # ---- status --------------------------------------------------------

    def status(self) -> dict:
        t = self.board.snapshot()
        now = time.monotonic()
        workers = []
        for i in self.live_slots():
            p = self.supervisor.slots[i].placement
            row = t[i]
            info = self.supervisor.slots[i].info
            beat = row[Col.HEARTBEAT]
            workers.append(
                {
                    "id": i,
                    "device": p.device,
                    "name": info.name if info else "",
                    "state": public_state(
                        int(row[Col.SLOT_STATE]), int(row[Col.WORKER_STATE]), row[Col.HEALTH]
                    ).value,
                    "pid": int(row[Col.PID]) or None,
                    "generation": int(row[Col.GENERATION]),
                    "restarts": int(row[Col.RESTARTS]),
                    "inflight": int(row[Col.INFLIGHT]),
                    "capacity": int(row[Col.CAPACITY]),
                    "queued_work_s": round(float(row[Col.QUEUED_WORK_S]), 3),
                    "completed": int(row[Col.COMPLETED]),
                    "failed": int(row[Col.FAILED]),
                    "audio_s": round(float(row[Col.AUDIO_S]), 3),
                    "busy_s": round(float(row[Col.COMPUTE_S]), 3),
                    "speed": round(float(row[Col.SPEED]), 4),
                    "current_request": self.dispatcher.current(i),
                    "batch_rows": int(row[Col.BATCH_ROWS]),
                    "mem_used_bytes": int(row[Col.MEM_USED]),
                    "mem_total_bytes": int(row[Col.MEM_TOTAL]),
                    "util": round(float(row[Col.UTIL]), 1),
                    "temp_c": round(float(row[Col.TEMP]), 1),
                    "power_w": round(float(row[Col.POWER]), 1),
                    "heartbeat_age_s": round(now - beat, 3) if beat > 0 else None,
                    "note": info.note if info else "",
                    "error": self.supervisor.slots[i].boot_error,
                }
            )
        return {
            "queue": {"length": self.dispatcher.queue_length(), "max": self.cfg.max_queue},
            "policy": self.cfg.policy,
            "engine": self.cfg.engine,
            "workers": workers,
            "rows": self.resumes(),  # resumes, preemptions, moves; steps kept and recomputed
        }

    # ---- scaling -------------------------------------------------------

    def add_worker(self, device: str) -> int:
        """Start one more worker on `device` ("cpu", "cuda:N" or "N"); its slot index."""
        from dataclasses import replace as dc_replace

        from vibevoice_pool.config import ConfigError

        dev = str(device).strip().lower()
        gpu = dev.removeprefix("cuda:")
        if dev != "cpu" and not gpu.isdigit():  # one device: not "", "all", "0,1", "cpu:5"
            raise m.PoolError(
                m.ErrorKind.BAD_INPUT,
                f'device {device!r}: name one device, "cpu", "cuda:N" or "N"',
            )
        index = self.supervisor.next_index()  # a removed worker's, or a new one
        try:
            if dev == "cpu":
                placement = Placement(f"cpu:{index}", None)
            else:
                placement = plan(gpu, 1, self.gpus)[0]
        except ConfigError as e:  # a GPU this host does not have: the GPUs it has
            raise m.PoolError(m.ErrorKind.BAD_INPUT, f"device {device!r}: {e}") from None
        spec = engine_specs(self.cfg, [placement], self.model_path or self.cfg.model_path)[0]
        speeds = self.cfg.sim_speeds
        if speeds:
            spec = dc_replace(spec, sim_speed=speeds[index % len(speeds)])
        if placement.is_gpu:  # its share of the GPU's free memory: one of all on it now
            on_it = [i for i in self.live_slots() if self.placements[i].device == placement.device]
            if len(on_it) + 1 > spec.gpu_share:
                spec = dc_replace(spec, gpu_share=len(on_it) + 1)
                log.info(
                    "Worker added on GPU %s, which runs %d already: it counts 1/%d of its free "
                    "memory (workers started before keep their share; set mem_budget_mb to "
                    "split it exactly)",
                    placement.cuda_index,
                    len(on_it),
                    spec.gpu_share,
                )
        return self.supervisor.add_slot(placement, spec)

    def restart_worker(self, index: int) -> None:
        """Stop a worker and start it again (its requests go back to the queue)."""
        if index not in self.live_slots():
            raise m.PoolError(m.ErrorKind.BAD_INPUT, f"no worker {index}; see /v1/pool")
        self.supervisor.restart(index)

    def remove_worker(self, index: int) -> None:
        if index not in self.live_slots():
            raise m.PoolError(m.ErrorKind.BAD_INPUT, f"no worker {index}; see /v1/pool")
        self.supervisor.remove_slot(index)

    # ---- life ----------------------------------------------------------

    def shutdown(self, grace_s: float | None = None) -> None:
        grace = self.cfg.grace_s if grace_s is None else grace_s
        self.monitor.stop()
        log.removeFilter(self._device_field)
        self.supervisor.shutdown(grace)
        self.board.close()

    def _log_event(self, e: ev.PoolEvent) -> None:
        rid = e.request.id
        if isinstance(e, ev.Dispatched):
            log.info(
                "🎯 Chose %s for request %s (queue: %d, score %.3f, %s, attempt %d)",
                self.where(e.slot),
                rid,
                e.inflight,
                e.score,
                self.cfg.policy,
                e.request.attempt,
                extra={"request_id": rid, **self._fields(e.slot)},
            )
        elif isinstance(e, ev.Requeued) and e.lost:  # survival.py logs a preemption
            log.warning(
                "request %s sent back to the queue (attempt %d) after %s was lost",
                rid,
                e.request.attempt,
                self.where(e.slot),
                extra={"request_id": rid, **self._fields(e.slot)},
            )
        elif isinstance(e, ev.Finished) and log.isEnabledFor(logging.INFO):
            said, times = _times(e.handle)
            if isinstance(e.outcome, m.Done):
                log.info(
                    "request %s done on %s: %.1f s of audio in %.1f s (%s)",
                    rid,
                    self.where(e.handle.worker),
                    e.outcome.audio_s,
                    e.outcome.compute_s,
                    said,
                    extra={
                        "request_id": rid,
                        **self._fields(e.handle.worker),
                        **times,
                        "audio_s": round(e.outcome.audio_s, 3),
                    },
                )
            else:
                worker = e.handle.worker  # None: it failed before any worker took it
                log.info(
                    "request %s failed%s: %s: %s (%s)",
                    rid,
                    "" if worker is None else f" on {self.where(worker)}",
                    e.outcome.error.value,
                    e.outcome.message,
                    said,
                    extra={
                        "request_id": rid,
                        **({} if worker is None else self._fields(worker)),
                        **times,
                    },
                )


def _times(h: RequestHandle) -> tuple[str, dict]:
    """A request's end line's times: its words, and its JSON fields (logs.TIMES):
    queue_s (admission to a worker's first start; to its end when none began it),
    first_audio_s (to its first audio; absent without audio), total_s (to its end)."""
    queue_s, first_s = h.queue_s(), h.first_audio_s()
    total_s = max(0.0, (h.finished_at or h.submitted_at) - h.submitted_at)
    times = {"queue_s": round(queue_s or 0.0, 3), "total_s": round(total_s, 3)}
    first = "no audio"
    if first_s is not None:
        times["first_audio_s"] = round(first_s, 3)
        first = f"first audio after {first_s:.2f} s"
    waited = "waited" if h.started_at is not None else "waited in the queue"
    return f"{waited} {queue_s or 0.0:.2f} s, {first}, {total_s:.1f} s in all", times
