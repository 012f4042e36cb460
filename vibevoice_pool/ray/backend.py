"""RaySupervisor: the pool's slots as Ray Serve replicas, for `--backend ray`.

It offers Pool and the front ends the local Supervisor's interface (start,
wait_ready, restart, add_slot, remove_slot, shutdown, slots, events) and keeps
the same StatusBoard columns; only where a slot runs changes.

    Dispatcher --send(Synthesize)--> stream thread: handle.synthesize.remote(req,
        ^                            stream=True); each item -> on_message(slot)
        |                            replica death (RayActorError) -> worker_lost
        +----- attach(slot, send) -- prober thread: ping every slot; a replica
                                     that answers (a new one after a death) is
                                     attached; its stats go onto the board
    loop thread: request timeouts, boot timeouts, failed-slot retries, removals

Routing stays ours: each slot is its own Serve application with exactly one
replica, so Serve's router has one choice and decides nothing; our Dispatcher
(late binding, least_work and the other policies, quarantine) picks the slot.
Serve's pluggable RequestRouter (alpha in 2.60) would rank the N replicas of
one deployment from queue lengths and periodically published stats, and own
queueing and retries, blind to our board, work estimates and requeueing; see
docs/RAY.md, and bench/ray_peer.py for Serve's own router measured.

Death: a stream that raises RayActorError (or Serve's ReplicaUnavailableError)
means the replica is gone. Its slot shows backoff, the dispatcher requeues what
it held (a request that took down max_attempts replicas is quarantined), Serve
starts a new replica by itself, and the first ping it answers attaches it
again. A hang is Serve's health check's to find: check_health raises on a
stalled engine and a replica that stops answering is replaced.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from ray.exceptions import RayError

from vibevoice_pool.config import PoolConfig
from vibevoice_pool.pool.devices import Placement, engine_specs
from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.slots import next_slot_index, wait_first_ready
from vibevoice_pool.pool.supervisor import (
    BACKOFF_S,
    BOOT_FAILURES_TO_FAIL,
    RESTART_REQUESTED,
)
from vibevoice_pool.ray.cluster import DeployError, RayCluster, replica_resources
from vibevoice_pool.ray.streams import Slot, Streams
from workers import messages as m
from workers.board import Col, SlotState, StatusBoard, WorkerState
from workers.engine import EngineSpec
from workers.ray_replica import ReplicaStats

log = logging.getLogger("vibevoice_pool")

TICK_S = 0.1
PING_EVERY_S = 0.5
PING_TIMEOUT_S = 2.0
TRACK_EVERY_S = 2.0
FAILED_APPS_EVERY_S = 1.0


class RaySupervisor:
    def __init__(
        self,
        cfg: PoolConfig,
        placements: list[Placement],
        engines: list[EngineSpec],
        board: StatusBoard,
        dispatcher: Dispatcher,
    ):
        self.cfg = cfg
        self.board = board
        self.dispatcher = dispatcher
        self.cluster = RayCluster(cfg)
        self.tag = uuid.uuid4().hex[:6]  # our applications' names, apart from other pools'
        self.slots = [
            Slot(i, p, e) for i, (p, e) in enumerate(zip(placements, engines, strict=True))
        ]
        self._ctl = threading.RLock()  # slot state, and the attach / worker_lost calls
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.streams = Streams(board, dispatcher, self._lost, self._stop)
        self.first_boot_error = ""
        self.events: list[tuple[float, int, str]] = []

    # ---- public --------------------------------------------------------

    def start(self) -> None:
        try:
            self.cluster.start(sum(self._resources(s)[0] for s in self.slots))
            self._plan_cluster_gpus()
        except (OSError, RayError, RuntimeError) as e:  # ConnectionError: no cluster there
            self.cluster.stop()
            where = (
                f"join the Ray cluster at {self.cfg.address}" if self.cfg.address else "start Ray"
            )
            raise m.PoolError(m.ErrorKind.UNAVAILABLE, f"could not {where}: {e}") from e
        except BaseException:
            self.cluster.stop()
            raise
        with self._ctl:
            for slot in self.slots:
                self._deploy(slot)
        for name, target in (("ray-supervisor", self._loop), ("ray-prober", self._probe)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def wait_ready(self, timeout: float) -> None:
        """Return once a replica is ready; BootError if every slot failed to boot."""
        hint = ", and check that the Ray cluster has the CPUs/GPUs asked for"
        wait_first_ready(
            self._ctl,
            self.slots,
            lambda s: s.attached,
            lambda: self.first_boot_error,
            timeout,
            "replica",
            hint,
        )

    def pids(self) -> list[int]:
        """The replicas' pids (on their own nodes)."""
        return [s.pid for s in self.slots if s.pid]

    def ray_pids(self) -> list[int]:
        """Every process our local Ray started (empty when joined to a cluster)."""
        return self.cluster.pids()

    def monitor_targets(self) -> list[tuple[int, int | None, int | None]]:
        """None: a replica may run on another node, so its device columns come
        from its own pings (see _seen), not from this machine's NVML."""
        return []

    def add_slot(self, placement: Placement, engine: EngineSpec) -> int:
        with self._ctl:
            index = next_slot_index(self._stop.is_set(), self.slots, self.board.rows)
            slot = Slot(index, placement, engine)
            self.slots.append(slot)
            self._deploy(slot)
        log.info("➕ added %s as worker %d", slot.label, index)
        return index

    def remove_slot(self, index: int) -> None:
        with self._ctl:
            slot = self.slots[index]
            if slot.removed:
                return
            slot.removed = True
            self.dispatcher.drain(index)
            self.board.set(index, Col.SLOT_STATE, SlotState.DRAINING)
            log.info("➖ draining %s (worker %d) for removal", slot.label, index)

    def restart(self, index: int) -> None:
        """Replace a slot's replica now (on demand), or retry a failed slot."""
        with self._ctl:
            slot = self.slots[index]
            if slot.removed:
                return
            if slot.attached:
                self._detach(slot, RESTART_REQUESTED, blame=False)
            slot.boot_failures = 0
            self._deploy(slot)

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let accepted requests finish within grace_s, then stop."""
        self.dispatcher.wind_down(grace_s)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=PING_TIMEOUT_S + 3)
        with self._ctl:
            for slot in self.slots:
                slot.attached = False
                self.streams.drop(slot)
        self.streams.close()
        survivors = self.cluster.stop()
        for slot in self.slots:
            self.board.set(slot.index, Col.SLOT_STATE, SlotState.STOPPED)
        if survivors:
            log.error("Ray processes still alive after shutdown: %s", survivors)

    # ---- deploying -----------------------------------------------------

    def _resources(self, slot: Slot) -> tuple[float, float]:
        return replica_resources(slot.placement, slot.engine, self.cfg.workers_per_gpu)

    def _plan_cluster_gpus(self) -> None:
        """`--gpus all` means every GPU of the cluster, not of this machine."""
        placements = self.cluster.gpu_placements(self.cfg, self.board.rows)
        if placements:
            model = self.slots[0].engine.model_path if self.slots else self.cfg.model_path
            specs = engine_specs(self.cfg, placements, model)
            pairs = zip(placements, specs, strict=True)
            self.slots = [Slot(i, p, e) for i, (p, e) in enumerate(pairs)]

    def _deploy(self, slot: Slot) -> None:
        """Start (or replace) the slot's Serve application in a thread."""
        old = slot.app
        slot.deploys += 1
        slot.app = f"vibevoice-pool-{self.tag}-w{slot.index}-{slot.deploys}"
        slot.handle, slot.deploying, slot.deployed_at = None, True, time.monotonic()
        slot.synth = slot.pinger = None
        slot.info, slot.pid = None, None
        b, i = self.board, slot.index
        for col in (Col.WORKER_STATE, Col.PID, Col.HEARTBEAT, Col.PROGRESS, Col.SPEED):
            b.set(i, col, 0)
        b.set(i, Col.SLOT_STATE, SlotState.STARTING)
        b.set(i, Col.DEVICE, -1 if slot.placement.cuda_index is None else slot.placement.cuda_index)
        b.set(i, Col.CAPACITY, slot.engine.max_batch_size)
        self._note(i, "spawned")
        token, app = slot.deploys, slot.app
        cpus, gpus = self._resources(slot)
        log.info("Initialising %s (worker %d) as Serve application %s", slot.label, i, app)

        def run():
            if old:
                self.cluster.delete(old)
            try:
                handle = self.cluster.deploy(
                    app,
                    slot.engine,
                    num_cpus=cpus,
                    num_gpus=gpus,
                    max_ongoing=2 * max(1, slot.engine.max_batch_size) + 2,
                    stall_timeout_s=self.cfg.stall_timeout_s,
                    hang_timeout_s=self.cfg.hang_timeout_s,
                    ready=lambda: slot.deploys == token and not self._stop.is_set(),
                )
            except Exception as e:  # DeployError, or a surprise from Serve: never hang DEPLOYING
                if not isinstance(e, DeployError):
                    log.exception("deploying %s failed unexpectedly", app)
                with self._ctl:
                    if slot.deploys == token and not self._stop.is_set():
                        slot.deploying = False
                        self._boot_failed(slot, f"Ray Serve could not start the replica: {e}")
                return
            with self._ctl:
                if slot.deploys != token or self._stop.is_set() or slot.removed:
                    return  # replaced, removed or shut down meanwhile; loop/stop deletes it
                slot.deploying = False
                slot.handle = handle
                slot.synth = handle.options(method_name="synthesize", stream=True)
                slot.pinger = handle.options(method_name="ping")

        threading.Thread(target=run, name=f"deploy-{i}", daemon=True).start()

    def _undeploy(self, slot: Slot) -> None:
        app, slot.app, slot.handle, slot.deploying = slot.app, "", None, False
        slot.synth = slot.pinger = None
        slot.deploys += 1
        if app:
            threading.Thread(target=self.cluster.delete, args=(app,), daemon=True).start()

    def _boot_failed(self, slot: Slot, message: str) -> None:
        """A replica that could not load its engine: back off, then fail."""
        b, i, now = self.board, slot.index, time.monotonic()
        slot.boot_failures += 1
        slot.boot_error = message
        self.first_boot_error = self.first_boot_error or message
        self._note(i, "dead")
        self._undeploy(slot)
        if slot.boot_failures >= BOOT_FAILURES_TO_FAIL:
            slot.due_at = now + self.cfg.failed_retry_s
            b.set(i, Col.SLOT_STATE, SlotState.FAILED)
            every = f"retrying every {self.cfg.failed_retry_s:.0f} s"
            log.error(
                "❌ %s failed to boot %d times; %s: %s",
                slot.label,
                slot.boot_failures,
                every,
                message,
            )
            return
        # A replica that failed to boot waits 1, 2, 4 ... s (BACKOFF_S[0], the
        # immediate respawn, is for a worker's first crash, not a failed boot).
        slot.due_at = now + BACKOFF_S[min(slot.boot_failures, len(BACKOFF_S) - 1)]
        b.set(i, Col.SLOT_STATE, SlotState.BACKOFF)
        b.set(i, Col.BACKOFF_UNTIL, slot.due_at)
        log.error("❌ %s failed to initialise: %s", slot.label, message)

    # ---- attach / detach -------------------------------------------------

    def _seen(self, slot: Slot, token: int, stats: ReplicaStats) -> None:
        """A ping answered: write the board, attach a replica that is new."""
        with self._ctl:
            if slot.deploys != token or slot.removed or self._stop.is_set():
                return
            if slot.attached and stats.boot_id != slot.boot_id:
                # Ray replaced the replica before any stream noticed the old one die
                self._detach(slot, "the replica was replaced by Ray", blame=True)
            if stats.boot_error is not None:
                self._boot_failed(slot, f"{stats.boot_error.value}: {stats.boot_message}")
                return
            self.streams.write_stats(slot, stats)
            if not slot.attached:
                self._attach(slot, stats)

    def _attach(self, slot: Slot, stats: ReplicaStats) -> None:
        b, i = self.board, slot.index
        replaced = bool(slot.boot_id) and stats.boot_id != slot.boot_id
        if replaced:
            slot.restarts += 1
            b.set(i, Col.RESTARTS, slot.restarts)
            for col in (Col.AUDIO_S, Col.COMPUTE_S, Col.COMPLETED, Col.FAILED):
                b.set(i, col, 0.0)  # totals are per replica, as per local spawn
        slot.generation += 1
        slot.attached, slot.boot_id, slot.info = True, stats.boot_id, stats.info
        slot.pid, slot.node = stats.pid, stats.node
        slot.boot_failures, slot.boot_error, slot.busy_rows = 0, "", 0
        capacity = max(1, stats.info.max_batch_size if stats.info else 1)
        b.set(i, Col.CAPACITY, capacity)
        b.set(i, Col.READY_SINCE, time.monotonic())
        b.set(i, Col.GENERATION, slot.generation)
        b.set(i, Col.WORKER_STATE, WorkerState.IDLE)
        b.set(i, Col.SLOT_STATE, SlotState.RUNNING)
        self._note(i, "ready")
        how = f"in {stats.boot_s:.1f} s" if not replaced else f"again (restart {slot.restarts})"
        where = f"worker {i}, pid {stats.pid} on {stats.node}"
        name = stats.info.name if stats.info else "?"
        log.info("✅ %s initialised: %s %s (%s)", slot.label, name, how, where)
        self.dispatcher.attach(i, self.streams.sender(slot, slot.generation))

    def _lost(self, slot: Slot, generation: int, why: str) -> None:
        """A stream or a ping saw the replica of `generation` die."""
        with self._ctl:
            if slot.generation == generation and slot.attached and not self._stop.is_set():
                self._detach(slot, why, blame=True)

    def _detach(self, slot: Slot, why: str, blame: bool) -> None:
        b, i = self.board, slot.index
        slot.attached, slot.lost_at = False, time.monotonic()
        self.streams.drop(slot)
        b.set(i, Col.WORKER_STATE, WorkerState.NONE)
        b.set(i, Col.SLOT_STATE, SlotState.STOPPED if slot.removed else SlotState.BACKOFF)
        self._note(i, "dead")
        # A replica's stream may not have delivered the Started of the request that
        # killed it, so every request it held counts toward quarantine.
        moved = self.dispatcher.worker_lost(i, why, blame=blame, blame_unstarted=True)
        if why != RESTART_REQUESTED:
            what = f"{slot.label} (worker {i}, pid {slot.pid}) died: {why}"
            log.warning(
                "💥 %s; %d request(s) sent back to the queue; waiting for Ray Serve to replace it",
                what,
                len(moved),
            )

    # ---- threads ---------------------------------------------------------

    def _probe(self) -> None:
        """Ping every deployed slot; attach new replicas; copy their stats."""
        while not self._stop.wait(PING_EVERY_S):
            with self._ctl:
                targets = [
                    (s, s.deploys, s.generation, s.pinger)
                    for s in self.slots
                    if s.pinger is not None and not s.removed
                ]
            for (slot, token, generation, _), answer in self.streams.ping(targets, PING_TIMEOUT_S):
                if isinstance(answer, ReplicaStats):
                    self._seen(slot, token, answer)
                elif answer:  # why the replica is gone
                    self._lost(slot, generation, answer)

    def _loop(self) -> None:
        tracked = asked = 0.0
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            self.dispatcher.expire(self.cfg.request_timeout_s)
            failed = {}
            if now - asked >= FAILED_APPS_EVERY_S and any(self._booting()):
                asked, failed = now, self.cluster.failed_apps()
            with self._ctl:
                for slot in self.slots:
                    self._check(slot, now, failed)
            if now - tracked >= TRACK_EVERY_S:
                tracked = now
                self.cluster.track()

    def _booting(self):
        return (s for s in self.slots if not s.attached and s.app and not s.removed)

    def _check(self, slot: Slot, now: float, failed: dict[str, str]) -> None:
        b, i = self.board, slot.index
        if slot.stopped:
            return
        if slot.removed:
            if not slot.attached or self.dispatcher.held_by(i) == 0:
                if slot.attached:
                    slot.attached = False
                    self.dispatcher.worker_lost(i, "removed", blame=False)
                self._undeploy(slot)
                slot.stopped = True
                b.set(i, Col.SLOT_STATE, SlotState.STOPPED)
                log.info("➖ %s (worker %d) removed", slot.label, i)
            return
        if slot.attached:
            return
        if slot.app in failed:
            self._boot_failed(slot, f"Ray Serve could not start the replica: {failed[slot.app]}")
        elif slot.app and now - max(slot.deployed_at, slot.lost_at) > self.cfg.boot_timeout_s:
            msg = f"not ready after boot_timeout_s={self.cfg.boot_timeout_s:g}"
            self._boot_failed(slot, msg)
        elif not slot.app and now >= slot.due_at:
            if int(b.get(i, Col.SLOT_STATE)) == SlotState.FAILED:
                log.info("🔄 retrying %s", slot.label)
            self._deploy(slot)

    # ---- helpers ---------------------------------------------------------

    def _note(self, slot: int, what: str) -> None:
        self.events.append((time.monotonic(), slot, what))
        del self.events[:-1000]
