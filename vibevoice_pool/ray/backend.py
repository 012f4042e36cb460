"""RaySupervisor: the pool's slots as Ray Serve replicas, for `--backend ray`.

A SlotBackend (pool/slots.py) like the local Supervisor: the slot bookkeeping
(add, remove, wait for the first ready slot, the board row reset on every
start) and every recovery decision (pool/recovery.py: the backoff after a
failed boot, the halt after too many, the boot timeout, the hang rule) are
shared with it;
only how a slot is started (a Serve application), stopped and watched (pings
and streams) is here.

    Dispatcher --send(Synthesize)--> stream thread: handle.synthesize.remote(req,
        ^                            stream=True); each item (a step's messages)
        |                            -> on_message(slot), one message at a time
        |                            replica death (RayActorError) -> worker_lost
        +----- attach(slot, send) -- prober thread: ping every slot; a replica
                                     that answers (a new one after a death) is
                                     attached; its stats go onto the board
    loop thread: request timeouts, the policy's hang rule and boot timeout,
                 failed-slot retries, removals

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
again. A hang: a replica whose pings go unanswered for hang_timeout_s (or
whose engine made no step for stall_timeout_s) is detached by the policy's
hang rule and replaced with a new application after the policy's backoff;
Serve's health check (check_health raises on a stalled engine) looks as well.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import uuid

from ray.exceptions import RayError

from vibevoice_pool.pool.devices import Placement, engine_specs
from vibevoice_pool.pool.recovery import Cause, Verdict, Vitals
from vibevoice_pool.pool.slots import SlotLifecycle
from vibevoice_pool.ray.cluster import DeployError, RayCluster, replica_resources
from vibevoice_pool.ray.streams import Slot, Streams
from workers.engines.contract import EngineSpec
from workers.host.ray_replica import ReplicaStats
from workers.wire import messages as m
from workers.wire.board import Col, SlotState, WorkerState

log = logging.getLogger("vibevoice_pool")

TICK_S = 0.1
EXIT_RAY_LOST = 4  # the server's exit code when its local Ray died under it
PING_EVERY_S = 0.5
PING_TIMEOUT_S = 2.0
TRACK_EVERY_S = 2.0
FAILED_APPS_EVERY_S = 1.0


class RaySupervisor(SlotLifecycle):
    noun = "replica"
    boot_hint = ", and check that the Ray cluster has the CPUs/GPUs asked for"

    def _setup(self) -> None:
        # the tag keeps our applications' names apart from other pools' of this driver
        self.cluster = RayCluster(self.cfg, uuid.uuid4().hex[:6])
        self._threads: list[threading.Thread] = []
        self.streams = Streams(self.board, self.dispatcher, self._lost, self._stop)

    def _new_slot(self, index: int, placement: Placement, engine: EngineSpec) -> Slot:
        slot = Slot(index, placement, engine)
        taken = getattr(self, "slots", [])  # none yet while __init__ makes the first ones
        if index < len(taken):
            # a removed slot's, taken by an added replica: its deploy count goes on, so no
            # application name comes twice (the old one may still be being deleted)
            slot.deploys = taken[index].deploys
        return slot

    def _worker_gone(self, slot: Slot) -> bool:
        """Detached, and its application on its way out (_check undeployed it). The
        board can read stopped a tick earlier (a replica that died while draining)."""
        return slot.stopped

    def _label(self, slot: Slot) -> str:
        return slot.label

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
        with self._lock:
            for slot in self.slots:
                self._start(slot)
        for name, target in (("ray-supervisor", self._loop), ("ray-prober", self._probe)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

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

    def restart(self, index: int) -> None:
        """Replace a slot's replica now (on demand), or retry a failed slot."""
        with self._lock:
            slot = self.slots[index]
            if slot.removed:
                return
            if slot.attached:
                self._detach(slot, Cause.RESTART.value)
            self._retry_now(slot)
            self._start(slot)

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let accepted requests finish within grace_s, then stop."""
        self.dispatcher.wind_down(grace_s)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=PING_TIMEOUT_S + 3)
        with self._lock:
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
            self.slots = [Slot(i, p, e) for i, (p, e) in enumerate(pairs)]  # not started yet

    def _start(self, slot: Slot) -> None:
        """Start (or replace) the slot's Serve application in a thread."""
        old = slot.app
        slot.deploys += 1
        slot.app = f"{self.cluster.prefix}w{slot.index}-{slot.deploys}"  # see ray/warden.py
        slot.handle, slot.deploying = None, True
        slot.synth = slot.pinger = slot.mover = None
        slot.pid, i = None, slot.index
        self._starting(slot)
        self._note(i, "spawned")
        token, app = slot.deploys, slot.app
        cpus, gpus = self._resources(slot)
        slot.log.info("Initialising %s (worker %d) as Serve application %s", slot.label, i, app)

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
                with self._lock:
                    if slot.deploys == token and not self._stop.is_set():
                        slot.deploying = False
                        self._boot_failed(slot, f"Ray Serve could not start the replica: {e}")
                return
            with self._lock:
                if slot.deploys != token or self._stop.is_set() or slot.removed:
                    return  # replaced, removed or shut down meanwhile; loop/stop deletes it
                slot.deploying = False
                slot.handle = handle
                slot.synth = handle.options(method_name="synthesize", stream=True)
                slot.pinger = handle.options(method_name="ping")
                slot.mover = handle.options(method_name="hand_back")

        threading.Thread(target=run, name=f"deploy-{i}", daemon=True).start()

    def _undeploy(self, slot: Slot) -> None:
        app, slot.app, slot.handle, slot.deploying = slot.app, "", None, False
        slot.synth = slot.pinger = slot.mover = None
        slot.deploys += 1
        if app:
            threading.Thread(target=self.cluster.delete, args=(app,), daemon=True).start()

    def _boot_failed(self, slot: Slot, message: str) -> None:
        """A replica that could not load its engine: the policy says when to deploy
        it again, or that the slot has failed."""
        self._note(slot.index, "dead")
        self._undeploy(slot)
        if self._after_boot_failure(slot, message).verdict is Verdict.RESPAWN:
            slot.log.error("❌ %s failed to initialise: %s", slot.label, message)

    # ---- attach / detach -------------------------------------------------

    def _seen(self, slot: Slot, token: int, stats: ReplicaStats) -> None:
        """A ping answered: write the board, attach a replica that is new."""
        with self._lock:
            if slot.deploys != token or slot.removed or self._stop.is_set():
                return
            if slot.attached and stats.boot_id != slot.boot_id:
                # Ray replaced the replica before any stream noticed the old one die
                self._detach(slot, "the replica was replaced by Ray")
            if stats.boot_error is not None:
                self._boot_failed(slot, f"{stats.boot_error.value}: {stats.boot_message}")
                return
            self.streams.write_stats(slot, stats)
            # busy: rows in the batch, or a step running (the step a first row
            # joins counts no row until it returns, and a stuck one never does)
            busy = stats.rows or stats.progress_age_s > 0
            slot.progress_age = stats.progress_age_s if busy else None
            if not slot.attached:
                self._attach(slot, stats)

    def _attach(self, slot: Slot, stats: ReplicaStats) -> None:
        b, i = self.board, slot.index
        replaced = bool(slot.boot_id) and stats.boot_id != slot.boot_id
        if replaced:
            self._counted_restart(slot)
            for col in (Col.AUDIO_S, Col.COMPUTE_S, Col.COMPLETED, Col.FAILED):
                b.set(i, col, 0.0)  # totals are per replica, as per local spawn
        slot.generation += 1
        slot.attached, slot.boot_id, slot.boot_s = True, stats.boot_id, stats.boot_s
        slot.pid, slot.node, slot.busy_rows = stats.pid, stats.node, 0
        b.set(i, Col.GENERATION, slot.generation)
        b.set(i, Col.WORKER_STATE, WorkerState.IDLE)
        how = f"in {stats.boot_s:.1f} s" if not replaced else f"again (restart {slot.restarts})"
        where = f"worker {i}, pid {stats.pid} on {stats.node}"
        name = stats.info.name if stats.info else "?"
        slot.log.info("✅ %s initialised: %s %s (%s)", slot.label, name, how, where)
        self._became_ready(slot, stats.info, self.streams.sender(slot, slot.generation))

    def _lost(self, slot: Slot, generation: int, why: str) -> None:
        """A stream or a ping saw the replica of `generation` die."""
        with self._lock:
            if slot.generation == generation and slot.attached and not self._stop.is_set():
                self._detach(slot, why)

    def _detach(self, slot: Slot, why: str, by_serve: bool = True) -> None:
        """The slot's replica is gone (or is being replaced on purpose). `by_serve`:
        Serve starts its successor; otherwise we deploy it when the policy says."""
        i = slot.index
        slot.attached = False
        self.streams.drop(slot)
        self.board.set(i, Col.WORKER_STATE, WorkerState.NONE)
        self._note(i, "dead")
        if slot.removed:
            cause = Cause.REMOVED
        else:
            cause = Cause.RESTART if why == Cause.RESTART.value else Cause.CRASH
        # A replica's stream may not have delivered the Started of the request that
        # killed it, so every request it held counts toward quarantine.
        blame = cause is Cause.CRASH
        moved = self.dispatcher.worker_lost(i, why, blame=blame, blame_unstarted=blame)
        action = self._after_death(slot, cause, why)
        if cause is not Cause.CRASH:
            return
        if by_serve:
            # Serve starts the new replica by itself, now: its boot is timed from here
            slot.record = self.policy.on_start(slot.record, self.clock())
            then = "waiting for Ray Serve to replace it"
        else:
            self._undeploy(slot)  # _check deploys a new one at action.at
            delay = action.at - self.clock()
            then = f"replacing it in {delay:.0f} s" if delay > 0 else "replacing it now"
        slot.log.warning(
            "💥 %s (worker %d, pid %s) died: %s; %d request(s) sent back to the queue; %s",
            slot.label,
            i,
            slot.pid,
            why,
            len(moved),
            then,
        )

    # ---- threads ---------------------------------------------------------

    def _probe(self) -> None:
        """Ping every deployed slot; attach new replicas; copy their stats."""
        while not self._stop.wait(PING_EVERY_S):
            with self._lock:
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
            now = self.clock()
            self.dispatcher.expire(self.cfg.request_timeout_s)
            failed = {}
            if now - asked >= FAILED_APPS_EVERY_S and any(self._booting()):
                asked, failed = now, self.cluster.failed_apps()
            with self._lock:
                for slot in self.slots:
                    self._check(slot, now, failed)
            if now - tracked >= TRACK_EVERY_S:
                tracked = now
                self.cluster.track()
                self._check_ray()

    def _check_ray(self) -> None:
        """A local Ray whose raylet or GCS died cannot deploy a replica again: the
        server would stay up, healthy and serving nothing. Stop it (exit
        EXIT_RAY_LOST) so that whatever runs it starts it again."""
        gone = self.cluster.lost() if not self.fatal else ""
        if not gone:
            return
        self.fatal, self.fatal_exit = f"the local Ray's {gone} died", EXIT_RAY_LOST
        log.error(
            "❌ %s: Ray cannot recover from that in this process, so the server stops "
            "(exit code %d); start it again",
            self.fatal,
            EXIT_RAY_LOST,
        )
        os.kill(os.getpid(), signal.SIGTERM)  # the server's own stop: jobs wait for the next start

    def _vitals(self, slot: Slot, now: float) -> Vitals:
        """What the pings show of an attached replica, for the policy's hang rule."""
        beat = self.board.get(slot.index, Col.HEARTBEAT)  # the last ping answered
        return Vitals(
            heartbeat_age=now - beat if beat > 0 else None,
            progress_age=slot.progress_age,
        )

    def _booting(self):
        return (s for s in self.slots if not s.attached and s.app and not s.removed)

    def _check(self, slot: Slot, now: float, failed: dict[str, str]) -> None:
        i = slot.index
        if slot.stopped:
            return
        if slot.removed:
            if not slot.attached or self.dispatcher.held_by(i) == 0:
                if slot.attached:
                    self._detach(slot, "removed")
                else:
                    self._after_death(slot, Cause.REMOVED)
                self._undeploy(slot)
                slot.stopped = True
            return
        if slot.attached:
            # The policy's hang rule over the pings (each answer is a heartbeat) and
            # the engine's last step; Serve's health check (check_health) looks too.
            kill = self.policy.on_tick(slot.record, now, self._vitals(slot, now))
            if kill is not None:
                slot.log.warning("⚠️ %s (worker %d): %s", slot.label, i, kill.reason)
                self._detach(slot, kill.reason, by_serve=False)
            return
        if slot.app in failed:
            self._boot_failed(slot, f"Ray Serve could not start the replica: {failed[slot.app]}")
        elif slot.app:  # booting: the policy's boot timeout, as for a local worker
            kill = self.policy.on_tick(slot.record, now, Vitals())
            if kill is not None:
                self._boot_failed(slot, kill.reason)
        elif now >= slot.due_at:
            if int(self.board.get(i, Col.SLOT_STATE)) == SlotState.FAILED:
                slot.log.info("🔄 retrying %s", slot.label)
            self._start(slot)
