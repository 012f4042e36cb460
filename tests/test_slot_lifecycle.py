"""One recovery policy object drives both backends: the local Supervisor (real
spawned sim workers) and the RaySupervisor (its Serve calls answered by real
SlotReplica objects in this process, in place of a Ray cluster). For each, a
failed boot is retried and then halts where the policy says, and a death is
backed off as the policy says."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import wait_until

from vibevoice_pool.config import build
from vibevoice_pool.pool.devices import engine_specs, plan
from vibevoice_pool.pool.dispatcher import Dispatcher
from vibevoice_pool.pool.recovery import RecoveryPolicy
from vibevoice_pool.pool.slots import BootError
from workers.wire.board import Col, SlotState, StatusBoard

pytestmark = pytest.mark.slow


class Spy:
    """A RecoveryPolicy that writes down which of its rules were asked."""

    def __init__(self, policy: RecoveryPolicy):
        self.policy = policy
        self.asked: list[str] = []

    def __getattr__(self, name):
        rule = getattr(self.policy, name)
        if not callable(rule):
            return rule

        def asked(*args, **kwargs):
            self.asked.append(name)
            return rule(*args, **kwargs)

        return asked


class FakeCall:
    def __init__(self, answer):
        self.answer = answer
        self.cancelled = False

    def result(self, timeout_s=None):
        return self.answer()

    def cancel(self):  # what the backend does to a ping that got no answer
        self.cancelled = True


def hung():
    raise TimeoutError  # what a Serve call that gets no answer in time raises


class FakeHandle:
    """A Serve handle whose ping reaches a SlotReplica in this process."""

    def __init__(self, cluster, app):
        self.cluster, self.app = cluster, app

    def options(self, method_name, stream=False):
        return self

    def remote(self, *args):
        replica = self.cluster.replicas[self.app]
        return FakeCall(hung if replica in self.cluster.hung else replica.stats)


class FakeCluster:
    """What RaySupervisor asks of Ray, answered in process: each deploy builds a
    real SlotReplica (which loads the sim engine, or fails to)."""

    def __init__(self, cfg, tag):
        from workers.host.ray_replica import SlotReplica

        self.prefix = f"vibevoice-pool-01000000-{tag}-"  # as a real cluster names ours
        self.make = SlotReplica
        self.replicas: dict = {}
        self.hung: list = []  # replicas that no longer answer

    def start(self, cpus_needed):
        pass

    def gpu_placements(self, cfg, room):
        return []

    def deploy(self, app, spec, **kwargs):
        self.replicas[app] = self.make(spec)
        return FakeHandle(self, app)

    def replace(self, app, spec):
        """What Serve does after a replica dies: a new one, with a new boot id."""
        self.replicas[app] = self.make(spec)

    def delete(self, app):
        pass

    def failed_apps(self):
        return {}

    def track(self):
        pass

    def lost(self):
        return ""

    def pids(self):
        return []

    def stop(self):
        return []


def backend(kind: str, policy, **settings):
    values = {"engine": "sim", "gpus": "cpu:1", "sim_rtf": 0.05, "backend": kind}
    cfg = build(values | settings)
    placements = plan(cfg.gpus, 1, [])
    board = StatusBoard.create(len(placements) + 2)
    dispatcher = Dispatcher(board, policy=cfg.policy, max_queue=cfg.max_queue)
    specs = engine_specs(cfg, placements, "")
    if kind == "local":
        from vibevoice_pool.pool.supervisor import Supervisor

        sup = Supervisor(cfg, placements, specs, board, dispatcher, policy)
    else:
        from vibevoice_pool.ray.backend import RaySupervisor  # its RayCluster: a FakeCluster

        sup = RaySupervisor(cfg, placements, specs, board, dispatcher, policy)
    return sup, board


@pytest.fixture
def backends(monkeypatch):
    started = []

    def make(kind, policy, **settings):
        if kind == "ray":
            from vibevoice_pool.ray import backend as ray_backend

            monkeypatch.setattr(ray_backend, "RayCluster", FakeCluster)
        sup, board = backend(kind, policy, **settings)
        started.append((sup, board))
        sup.start()
        return sup, board

    yield make
    for sup, board in started:
        sup.shutdown(grace_s=0)
        board.close()


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_failed_boot_is_retried_then_halts_as_the_policy_says(backends, kind):
    policy = Spy(RecoveryPolicy(boot_failures_to_fail=2, failed_retry_s=120.0))
    sup, board = backends(kind, policy, sim_boot_error="no weights here")
    with pytest.raises(BootError, match="no weights here"):
        sup.wait_ready(30)
    wait_until(lambda: int(board.get(0, Col.SLOT_STATE)) == SlotState.FAILED, 30, what="failed")
    slot = sup.slots[0]
    assert policy.asked.count("on_boot_failure") == 2  # the first retried at once, then halt
    assert slot.record.boot_failures == 2
    assert slot.boot_failed == {"load": 2, "start": 0, "file_handles": 0}  # what /metrics reads
    assert slot.due_at - time.monotonic() > 100  # retried after failed_retry_s, not before
    time.sleep(0.5)
    assert int(board.get(0, Col.SLOT_STATE)) == SlotState.FAILED


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_death_backs_off_as_the_policy_says(backends, kind):
    policy = Spy(RecoveryPolicy(healthy_reset_s=60.0, backoff_cap_s=30.0))
    sup, board = backends(kind, policy)
    sup.wait_ready(30)
    slot = sup.slots[0]

    def die():
        if kind == "local":
            os.kill(slot.process.pid, signal.SIGKILL)
        else:
            sup.cluster.replace(slot.app, slot.engine)

    def ready_again(restarts):
        wait_until(
            lambda: slot.ready and int(board.get(0, Col.RESTARTS)) == restarts,
            30,
            what=f"restart {restarts}",
        )

    die()  # the first death: at once
    ready_again(1)
    assert policy.asked.count("on_death") == 1 and slot.record.deaths == 1
    died_at = time.monotonic()
    die()  # again, before it was healthy long: 1 s, as policy.backoff(1) says
    wait_until(lambda: policy.asked.count("on_death") == 2, 30, what="the second death")
    dead = [t for t, i, what in sup.events if i == 0 and what == "dead"]
    assert len(dead) == 2 and dead[-1] >= died_at
    # the policy's answer: respawn 1 s after the death. The local backend waits it
    # out; on Ray, Serve starts the replacement itself and the record counts it.
    assert board.get(0, Col.BACKOFF_UNTIL) - dead[-1] == pytest.approx(1.0, abs=0.05)
    ready_again(2)
    if kind == "local":
        starts = [t for t, i, what in sup.events if i == 0 and what == "starting"]
        assert starts[-1] - dead[-1] >= 1.0
    assert slot.record.deaths == 2


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_a_worker_that_stops_answering_is_replaced_by_the_hang_rule(backends, kind):
    policy = Spy(RecoveryPolicy(hang_timeout_s=1.5, backoff_cap_s=30.0))
    sup, board = backends(kind, policy)
    sup.wait_ready(30)
    slot = sup.slots[0]
    if kind == "local":
        victim = slot.process.pid
        os.kill(victim, signal.SIGSTOP)  # no more heartbeats; SIGKILL still ends it
    else:
        victim = slot.app
        sup.cluster.hung.append(sup.cluster.replicas[victim])  # no more ping answers
    t0 = time.monotonic()
    wait_until(lambda: policy.asked.count("on_death") == 1, 20, what="the hang to be found")
    assert 1.5 <= time.monotonic() - t0 < 6
    wait_until(
        lambda: slot.ready and int(board.get(0, Col.RESTARTS)) == 1, 30, what="its replacement"
    )
    assert (slot.process.pid if kind == "local" else slot.app) != victim
    kills = [what for _, i, what in sup.events if i == 0 and what in ("kill", "dead")]
    assert "dead" in kills


def test_a_replica_stuck_in_the_step_its_first_row_joins_is_found_stalled(backends, caplog):
    """A replica counts a row only once the step it joins returns: a step that never
    returns (a stuck kernel) on an idle replica showed no rows in the pings, so the
    policy's stall rule never saw it (only Serve's health check, which kills the
    replica with no reason in our log). It is found stalled, as a local worker is."""
    import asyncio
    import threading

    from workers.wire import messages as m

    policy = Spy(RecoveryPolicy(stall_timeout_s=1.5, hang_timeout_s=30.0))
    sup, board = backends("ray", policy)
    sup.wait_ready(30)
    slot = sup.slots[0]
    replica = sup.cluster.replicas[slot.app]
    req = m.Request(id="stuck", turns=(m.Turn(0, "[[hang]] a stuck step"),), seed=1)

    async def run():
        async for _ in replica.synthesize(req):
            pass

    threading.Thread(target=asyncio.run, args=(run(),), daemon=True).start()
    wait_until(lambda: policy.asked.count("on_death") == 1, 20, what="the stall to be found")
    assert "stalled: no generation step" in caplog.text
    assert replica.stats().rows == 0  # what the pings said all along
