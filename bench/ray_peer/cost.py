"""Where a zero-work request's time goes, for the Ray Serve peer section.

Two readings taken around the measured part of the zero workload (no profiler,
nothing patched):

    cpu_seconds()        CPU seconds (user + system) so far of this process and
                         of every process it started (Ray's: the replicas,
                         Serve's controller, gcs_server, raylet, agents; the
                         local pool's workers), by pid
    by_role(a, b, n)     the difference, per request and by role, in ms
    hops(recorder)       the pool's own events (bench.common.Recorder, on either
                         backend): for each request the dispatcher's send, the
                         replica's start of the row (its own monotonic clock,
                         the same clock on one machine), the parent's receipt
                         of Started and of Done; the medians of the steps
                         between them, and the gap from a Done to the next send
                         on the same worker
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import psutil

ROLES = (  # (role, what its command line holds), first match wins
    ("replicas", "ServeReplica"),
    ("Serve controller", "ServeController"),
    # before Ray's: a worker's command line carries sys.path, which Ray extends
    ("local pool workers", "multiprocessing"),
    ("Ray core (gcs_server, raylet, agents)", "/ray/"),
    ("Ray core (gcs_server, raylet, agents)", "ray::"),
)
DRIVER = "this process (driver, dispatcher, Serve's router)"
OTHER = "other"


def _role(cmd: str) -> str:
    for role, mark in ROLES:
        if mark in cmd:
            return role
    return OTHER


def cpu_seconds() -> dict[int, tuple[str, float]]:
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            role = DRIVER if p.pid == me.pid else _role(" ".join(p.cmdline()))
        except psutil.Error:
            continue
        out[p.pid] = (role, t.user + t.system)
    return out


def by_role(before: dict, after: dict, n: int) -> dict[str, float]:
    """ms of CPU per request by role, between two cpu_seconds() readings (a process
    that ended in between is not counted; one that started counts from zero)."""
    ms: dict[str, float] = defaultdict(float)
    for pid, (role, seconds) in after.items():
        ms[role] += (seconds - before.get(pid, (role, 0.0))[1]) / max(1, n) * 1e3
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))


HOPS = (
    "send -> the replica starts the row",
    "the replica starts -> Started in the parent",
    "Started -> Done in the parent",
    "send -> Done (one round trip)",
    "Done -> the next send on the same worker",
)


def hops(recorder) -> dict[str, float]:
    """Median ms of each step of a request's round trip (HOPS), from a Recorder;
    requests sent more than once (requeued) are left out."""
    received = {rid: t for what, rid, t, _ in recorder.events if what == "started"}
    steps: dict[str, list[float]] = {k: [] for k in HOPS}
    by_slot: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for rid, r in recorder.by_request().items():
        if len(r["dispatched"]) != 1 or not r["finished"]:
            continue
        (sent, slot), done = r["dispatched"][0], r["finished"][0][0]
        by_slot[slot].append((sent, done))
        at, rx = r["started_at"], received.get(rid)
        if at is None or rx is None:
            continue
        steps[HOPS[0]].append(at - sent)
        steps[HOPS[1]].append(rx - at)
        steps[HOPS[2]].append(done - rx)
        steps[HOPS[3]].append(done - sent)
    for pairs in by_slot.values():
        pairs.sort()
        steps[HOPS[4]] += [b[0] - a[1] for a, b in zip(pairs, pairs[1:], strict=False)]
    return {k: statistics.median(v) * 1e3 for k, v in steps.items() if v}


def cores_used(cpu_ms: dict[str, float], rps: float) -> float:
    """Cores kept busy: CPU per request times requests per second."""
    return sum(cpu_ms.values()) * rps / 1e3 if rps == rps else float("nan")
