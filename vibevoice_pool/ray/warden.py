"""The warden: what deletes a dead pool's Serve applications on a cluster it joined.

A pool joined to a Ray cluster it did not start (`--address`) has no watchdog
(nothing of that cluster is its to kill), and Serve applications outlive the
driver that deployed them: a SIGKILLed server's replicas would run, and hold
their GPUs, for ever. So every application name carries its owner, the Ray job
id of the driver that deployed it:

    vibevoice-pool-<job id>-<pool tag>-w<slot>-<deploy>

and each joined pool starts one Warden, a detached actor (no CPU) that outlives
its driver. Every POLL_S it reads the cluster's job table and deletes each
`vibevoice-pool-<job>-...` application whose job is dead (its driver exited or
was killed): its own pool's after a SIGKILL, and those of any pool whose warden
died with it. An application whose job is alive is never touched. Once its own
driver is dead and none of its pool's applications is left, the warden ends.
A pool that stops cleanly deletes its applications and then kills its warden.

Ray 2.60 keeps whether a driver is dead in the GCS job table (`is_dead`, set
by the raylet when the driver's connection drops); `ray.util.state.list_jobs`
reads it through the dashboard, which a cluster may run without, so the table
is read directly (`ray._private.state.jobs()`).
"""

from __future__ import annotations

import logging
import re
import threading
import time

import ray
from ray import serve

log = logging.getLogger("vibevoice_pool")

PREFIX = "vibevoice-pool-"
NAMESPACE = "vibevoice-pool"  # the wardens' (detached actors need a named one)
POLL_S = 1.0
# the owner's job id (4 bytes in hex), the tag, the slot and the deploy count
OWNED = re.compile(rf"^{PREFIX}([0-9a-f]{{8}})-[^-]+-w[0-9]+-[0-9]+$")


def app_prefix(job_id: str, tag: str) -> str:
    """The start of every application name of one pool (see the module doc)."""
    return f"{PREFIX}{job_id}-{tag}-"


def owner(app: str) -> str | None:
    """The job id (hex) that an application name says deployed it."""
    found = OWNED.match(app)
    return found.group(1) if found else None


def dead_jobs() -> set[str]:
    """The hex ids of the cluster's jobs whose driver is gone."""
    from ray._private import state  # the GCS job table; see the module doc

    return {job["JobID"] for job in state.jobs() if job.get("IsDead")}


def orphans(apps, dead: set[str]) -> list[str]:
    """Of these application names, ours (by name) whose owning job is dead."""
    return sorted(app for app in apps if owner(app) in dead)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Warden:
    def __init__(self, job_id: str, prefix: str):
        self.job_id, self.prefix = job_id, prefix
        threading.Thread(target=self._run, name="warden", daemon=True).start()

    def ping(self) -> str:
        return self.job_id

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            try:
                if self._sweep():
                    break
            except Exception as e:  # a GCS hiccup: look again next time
                log.warning("the warden of %s could not sweep: %s", self.prefix, e)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _sweep(self) -> bool:
        """Delete the dead pools' applications; True once ours is dead (its
        applications, among them, are gone: serve.delete waits for that)."""
        dead = dead_jobs()
        for app in orphans(serve.status().applications, dead):
            log.warning("deleting Serve application %s: the pool that made it is gone", app)
            serve.delete(app)
        return self.job_id in dead
