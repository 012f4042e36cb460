"""Prometheus metrics at /metrics, and the request activity the page's charts use.

Two sources, both read at scrape time:
  - the StatusBoard through `Pool.status()` and the dispatcher: per-worker state,
    in-flight, queued work, restarts, memory, utilisation, heartbeat age, and
    the admission queue (a custom collector; no multiprocess mode needed);
  - `Activity`, a dispatcher listener kept in the parent: requests by outcome
    per worker, audio seconds produced, busy seconds, the request latency
    histograms (duration; queue wait, time to first audio and speed, by priority),
    and the audio delivered so far (for the page's audio-per-second chart). Refusals (bad input, overloaded, no key, ...) are counted by the
    front ends that answer them, through `Activity.refused`;
  - the job runner's counts, when the server runs jobs (JobsCollector);
  - the --api-keys file's reloads and failed reloads (KeysCollector).

Every series is in this app's own CollectorRegistry, so two apps in one
process (tests) never collide.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vibevoice_pool.pool import events as ev
from vibevoice_pool.pool.handle import RequestHandle
from vibevoice_pool.pool.states import SERVING, SHOWN, shown_state
from workers.wire import messages as m

LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
# a wait is milliseconds on an idle pool and minutes behind a full one
QUEUE_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
# first audio is 0.1-5 s on a GPU (the first step, after the prompt's prefill), more when queued
FIRST_AUDIO_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, float("inf"))
# audio seconds a wall second: below 1 a stream that plays as it comes stalls
SPEED_BUCKETS = (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, float("inf"))
PRIORITIES = tuple(p.value for p in m.Priority)  # interactive, batch (a job's rows)
STATES = SHOWN  # ready, busy, recovering, starting, failed, ...
FOLDERS = ("voices", "data", "tmp")  # where a write may find no room: Activity.no_room
NO_ROOM_LOG_S = 60.0  # a full disk is said at most once a minute a folder, not per request
log = logging.getLogger("vibevoice_pool")


class Activity:
    """What requests did, from the dispatcher's events. Thread-safe.

    Listener calls arrive under the dispatcher's lock: they only touch our own
    lock and never call back into the dispatcher.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (worker or "", outcome)
        self.refusals: Counter[str] = Counter()
        self.no_rooms: Counter[str] = Counter(dict.fromkeys(FOLDERS, 0))
        self._no_room_said: dict[str, tuple[float, int]] = {}  # folder -> (when, count then)
        self.audio_s: defaultdict[int, float] = defaultdict(float)  # per worker, once Done
        # samples of a running request each worker made before it was lost: credited to
        # them when the request is done (the last worker gets only its own share)
        self._made_on: dict[str, Counter[int]] = {}
        self._busy_s: defaultdict[int, float] = defaultdict(float)
        self._busy_since: dict[int, float] = {}
        self._running: defaultdict[int, set[str]] = defaultdict(set)
        self._active: dict[str, RequestHandle] = {}  # request id -> its handle
        self._delivered_done = 0  # samples of finished requests
        self.latency = Histogram(
            "vibevoice_pool_request_duration_seconds",
            "Time from admission to the last event of a request, by outcome",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.queue_wait = Histogram(
            "vibevoice_pool_request_queue_seconds",
            "Time from admission until a worker first began the request (its first "
            "Started; a request sent back to the queue and begun again counts its first "
            "wait only), or until its end when none began it (cancelled, timed out or shut "
            "down while queued); by priority: interactive, or batch (a job's rows)",
            ["priority"],
            buckets=QUEUE_BUCKETS,
            registry=None,
        )
        self.first_audio = Histogram(
            "vibevoice_pool_time_to_first_audio_seconds",
            "Time from admission to the first audio of the request in the server (streamed "
            "or not; a request that made no audio is not counted), by priority",
            ["priority"],
            buckets=FIRST_AUDIO_BUCKETS,
            registry=None,
        )
        self.speed = Histogram(
            "vibevoice_pool_request_speed_ratio",
            "Audio seconds of a completed request over the wall seconds from the first "
            "start of it on a worker to its end (above 1: faster than real time; the "
            "inverse of the real-time factor), by priority",
            ["priority"],
            buckets=SPEED_BUCKETS,
            registry=None,
        )
        self.histograms = (self.latency, self.queue_wait, self.first_audio, self.speed)
        # each priority's series from the start, at 0; kept: a request's observations
        # skip the label lookup (prometheus_client's labels() takes a lock each call)
        self._series = {p: self._of(p) for p in PRIORITIES}
        self._waited: set[str] = set()  # requests whose queue wait is observed

    @classmethod
    def attach(cls, pool) -> Activity:
        activity = cls()
        pool.subscribe(activity.on_event)
        return activity

    # ---- events ----------------------------------------------------------

    def on_event(self, e: ev.PoolEvent) -> None:
        rid = e.request.id
        now = self.clock()
        with self._lock:
            if isinstance(e, ev.Dispatched):
                self._active[rid] = e.handle
            elif isinstance(e, ev.Started):
                self._start(e.slot, rid, now)
                if rid not in self._waited:  # its first start: sent again, it waited before
                    self._waited.add(rid)
                    self._priority(e.request)[0].observe(e.handle.queue_s() or 0.0)
            elif isinstance(e, ev.FirstAudio):
                self._priority(e.request)[1].observe(e.handle.first_audio_s() or 0.0)
            elif isinstance(e, ev.Requeued):
                self._stop(e.slot, rid, now)
                made = self._made_on.setdefault(rid, Counter())
                made[e.slot] += e.handle.samples - sum(made.values())
            elif isinstance(e, ev.Finished):
                self._active.pop(rid, None)
                self._delivered_done += e.handle.samples
                worker = e.handle.worker
                if worker is not None:
                    self._stop(worker, rid, now)
                done = isinstance(e.outcome, m.Done)
                outcome = "completed" if done else e.outcome.error.value
                self.outcomes[("" if worker is None else str(worker), outcome)] += 1
                made = self._made_on.pop(rid, Counter())
                if done and worker is not None:
                    made[worker] += e.handle.samples - sum(made.values())
                    for slot, samples in made.items():
                        self.audio_s[slot] += samples / m.SAMPLE_RATE
                self.latency.labels(outcome).observe(max(0.0, now - e.handle.submitted_at))
                self._ended(e, done)

    def _ended(self, e: ev.Finished, done: bool) -> None:
        """A request's end: the queue wait of one no worker began, and the speed of
        one completed (under _lock)."""
        h, (queue_wait, _, speed) = e.handle, self._priority(e.request)
        if e.request.id in self._waited:
            self._waited.discard(e.request.id)
        else:
            queue_wait.observe(h.queue_s() or 0.0)
        if done and h.started_at is not None and h.finished_at is not None:
            ran = h.finished_at - h.started_at
            if ran > 0 and e.outcome.audio_s > 0:
                speed.observe(e.outcome.audio_s / ran)

    def _of(self, priority: str) -> tuple:
        return tuple(h.labels(priority) for h in self.histograms[1:])

    def _priority(self, request: m.Request) -> tuple:
        """The queue wait, first audio and speed series of the request's priority."""
        series = self._series.get(request.priority)
        if series is None:
            series = self._series[request.priority] = self._of(request.priority)
        return series

    def _start(self, slot: int, rid: str, now: float) -> None:
        if not self._running[slot]:
            self._busy_since[slot] = now
        self._running[slot].add(rid)

    def _stop(self, slot: int, rid: str, now: float) -> None:
        running = self._running[slot]
        if rid not in running:
            return
        running.discard(rid)
        if not running and slot in self._busy_since:
            self._busy_s[slot] += now - self._busy_since.pop(slot)

    def refused(self, reason: str) -> None:
        """A request answered with an error before it was admitted."""
        with self._lock:
            self.refusals[reason] += 1

    def no_room(self, folder: str, path: str = "") -> None:
        """A request refused because the disk under `folder` (one of FOLDERS, at `path`)
        had no room for its write: ENOSPC, a file size limit (507 disk_full, the spool's
        503). The log says so at the first, then at most once a minute with how many."""
        now = self.clock()
        with self._lock:
            self.no_rooms[folder] += 1
            total = self.no_rooms[folder]
            said = self._no_room_said.get(folder)
            if said is not None and now - said[0] < NO_ROOM_LOG_S:
                return
            self._no_room_said[folder] = (now, total)
        since = total - (said[1] if said else 0)
        where = f" ({path})" if path else ""
        log.warning(
            "No room on the disk of the %s folder%s: %d request(s) refused since the last "
            "line (%d in all, vibevoice_pool_disk_full_total)",
            folder,
            where,
            since,
            total,
        )

    # ---- reads -----------------------------------------------------------

    def busy_seconds(self, slot: int) -> float:
        with self._lock:
            since = self._busy_since.get(slot)
            return self._busy_s[slot] + (self.clock() - since if since is not None else 0.0)

    def delivered_seconds(self) -> float:
        """Audio seconds handed to clients so far, counting requests still running."""
        with self._lock:
            live = sum(h.samples for h in self._active.values())
            return (self._delivered_done + live) / m.SAMPLE_RATE

    def snapshot(self) -> tuple[Counter, Counter, dict[int, float]]:
        with self._lock:
            return Counter(self.outcomes), Counter(self.refusals), dict(self.audio_s)


class PoolCollector:
    """Reads the pool at scrape time."""

    def __init__(self, pool, activity: Activity):
        self.pool = pool
        self.activity = activity

    def collect(self):
        status = self.pool.status()
        outcomes, refusals, audio = self.activity.snapshot()
        p = "vibevoice_pool_"
        q = status["queue"]
        g = GaugeMetricFamily(p + "queue_length", "Requests waiting in the admission queue")
        g.add_metric([], q["length"])
        yield g
        g = GaugeMetricFamily(p + "queue_max", "Size of the admission queue")
        g.add_metric([], q["max"])
        yield g

        c = CounterMetricFamily(p + "requests", "Requests by outcome", labels=["outcome"])
        by_outcome: Counter[str] = Counter()
        for (_, outcome), n in outcomes.items():
            by_outcome[outcome] += n
        for outcome, n in sorted(by_outcome.items()):
            c.add_metric([outcome], n)
        yield c
        c = CounterMetricFamily(
            p + "refused", "Requests answered with an error before admission", labels=["reason"]
        )
        for reason, n in sorted(refusals.items()):
            c.add_metric([reason], n)
        yield c
        with self.activity._lock:
            no_rooms = dict(self.activity.no_rooms)
        c = CounterMetricFamily(
            p + "disk_full",
            "Requests refused because a folder's disk had no room for their write",
            labels=["folder"],
        )
        for folder, n in sorted(no_rooms.items()):
            c.add_metric([folder], n)
        yield c
        c = CounterMetricFamily(p + "requeued", "Requests sent back to the queue by a death")
        c.add_metric([], self.pool.requeued())
        yield c
        r = self.pool.resumes()
        c = CounterMetricFamily(
            p + "resumes", "Rows sent again with their history, by outcome", labels=["outcome"]
        )
        c.add_metric(["resumed"], r["resumed"])
        c.add_metric(["replayed"], r["resume_refused"])
        yield c
        c = CounterMetricFamily(
            p + "resume_steps",
            "Decode steps of rows sent again: kept from the history or run again",
            labels=["kind"],
        )
        c.add_metric(["kept"], r["resumed_steps"])
        c.add_metric(["recomputed"], r["recomputed_steps"])
        yield c
        c = CounterMetricFamily(
            p + "preemptions", "Job rows that gave their place to an interactive request"
        )
        c.add_metric([], r["preempted"])
        yield c
        c = CounterMetricFamily(p + "moves", "Rows moved off a removed worker, to resume")
        c.add_metric([], r["moved"])
        yield c
        c = CounterMetricFamily(p + "audio_delivered_seconds", "Audio seconds sent to clients")
        c.add_metric([], self.activity.delivered_seconds())
        yield c

        yield from self._workers(status["workers"], outcomes, audio)

    def _workers(self, workers, outcomes, audio):
        p = "vibevoice_pool_worker_"
        lab = ["worker", "device"]

        def fam(kind, name, doc, extra=()):
            cls = CounterMetricFamily if kind == "c" else GaugeMetricFamily
            return cls(p + name, doc, labels=[*lab, *extra])

        fams = {
            "up": fam("g", "up", "1 when the worker is ready or busy"),
            "state": fam("g", "state", "1 for the worker's current panel state", ["state"]),
            "requests": fam("c", "requests", "Requests finished on the worker", ["outcome"]),
            "inflight": fam("g", "inflight", "Requests the worker holds"),
            "capacity": fam("g", "capacity", "Requests the worker can hold (batch size)"),
            "queued": fam("g", "queued_work_seconds", "Estimated audio seconds still to make"),
            "audio": fam(
                "c", "audio_seconds", "Audio seconds each worker made of finished requests"
            ),
            "busy": fam("c", "busy_seconds", "Seconds the worker spent generating"),
            "restarts": fam("c", "restarts", "Times the worker was respawned"),
            "boots": fam("c", "boot_failures", "Boots that failed, by why (slots.py)", ["reason"]),
            "mem_used": fam("g", "memory_used_bytes", "Device memory used (RSS for CPU workers)"),
            "mem_total": fam("g", "memory_total_bytes", "Device memory in total"),
            "util": fam("g", "utilization_ratio", "Device utilisation, 0-1"),
            "beat": fam("g", "heartbeat_age_seconds", "Seconds since the worker's heartbeat"),
            "speed": fam("g", "speed", "Measured audio seconds per wall second"),
            "completed": fam("g", "completed_since_spawn", "Requests done since the last spawn"),
        }
        boot_failures = self.pool.boot_failures()
        for w in workers:
            ids = [str(w["id"]), str(w["device"])]
            for reason, n in boot_failures.get(w["id"], {}).items():
                fams["boots"].add_metric([*ids, reason], n)
            state = shown_state(w)
            fams["up"].add_metric(ids, 1 if state in SERVING else 0)
            for s in STATES:
                fams["state"].add_metric([*ids, s], 1 if s == state else 0)
            for (worker, outcome), n in sorted(outcomes.items()):
                if worker == ids[0]:
                    fams["requests"].add_metric([*ids, outcome], n)
            fams["inflight"].add_metric(ids, w["inflight"])
            fams["capacity"].add_metric(ids, w["capacity"])
            fams["queued"].add_metric(ids, w["queued_work_s"])
            fams["audio"].add_metric(ids, audio.get(w["id"], 0.0))
            fams["busy"].add_metric(ids, self.activity.busy_seconds(w["id"]))
            fams["restarts"].add_metric(ids, w["restarts"])
            fams["mem_used"].add_metric(ids, w["mem_used_bytes"])
            fams["mem_total"].add_metric(ids, w["mem_total_bytes"])
            fams["util"].add_metric(ids, (w["util"] or 0.0) / 100.0)
            if w.get("heartbeat_age_s") is not None:
                fams["beat"].add_metric(ids, w["heartbeat_age_s"])
            fams["speed"].add_metric(ids, w["speed"])
            fams["completed"].add_metric(ids, w["completed"])
        yield from fams.values()


class JobsCollector:
    """The job runner's counts: jobs made, Idempotency-Key replays, jobs ended by state."""

    ENDS = ("done", "failed", "cancelled")

    def __init__(self, runner):
        self.runner = runner

    def collect(self):
        counts = dict(self.runner.counts)  # its keys are fixed: a copy in one call
        p = "vibevoice_pool_jobs_"
        c = CounterMetricFamily(p + "created", "Jobs written down by POST /v1/jobs or the page")
        c.add_metric([], counts["created"])
        yield c
        c = CounterMetricFamily(
            p + "replayed", "Job submissions answered with the job their Idempotency-Key made"
        )
        c.add_metric([], counts["replayed"])
        yield c
        c = CounterMetricFamily(p + "ended", "Jobs that ended, by their state", labels=["state"])
        for state in self.ENDS:
            c.add_metric([state], counts[state])
        yield c


class KeysCollector:
    """Readings of the --api-keys file after the launch's (live_keys.LiveKeys): those
    that took effect and those that failed (the keys in force stayed). Both 0 without
    a keys file, so an alert on the failures needs no keys file to exist."""

    def __init__(self, keys):
        self.keys = keys

    def collect(self):
        p = "vibevoice_pool_keys_"
        c = CounterMetricFamily(p + "reloads", "Readings of the --api-keys file that took effect")
        c.add_metric([], getattr(self.keys, "reloads", 0))
        yield c
        c = CounterMetricFamily(
            p + "reload_failures",
            "Readings of the --api-keys file that failed (bad, unreadable or gone): "
            "the keys read before stayed in force",
        )
        c.add_metric([], getattr(self.keys, "failures", 0))
        yield c


def registry_for(pool, activity: Activity, jobs=None, keys=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool, activity))
    for histogram in activity.histograms:
        registry.register(histogram)
    registry.register(KeysCollector(keys))
    if jobs is not None:
        registry.register(JobsCollector(jobs))
    return registry


def router(pool, activity: Activity, jobs=None, keys=None) -> APIRouter:
    """GET /metrics; `jobs`: the JobRunner, when the server runs jobs; `keys`: the
    Front's keys (a LiveKeys counts its reloads)."""
    registry = registry_for(pool, activity, jobs, keys)
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
