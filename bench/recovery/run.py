"""Recovery under fire: SIGKILL workers at 80% load and count what comes back.

Two pools side by side, each of eight SimEngine workers (speeds 1, 1, 0.5,
0.5, twice), each in its own process, on one schedule: lognormal sizes with
CV 1, open-loop Poisson arrivals at 80% of the calibrated capacity, started at
the same instant, so that the machine's other load hits both alike:

    baseline    no kill
    kills       every KILL_EVERY_S a random running worker that is in the middle
                of a request gets SIGKILL: one of those killed least so far, and
                never one holding a request that was already replayed (a request
                that takes down two workers is answered worker_lost, by design)

From the outside only: the pool's events (dispatched, requeued,
finished), the supervisor's events (dead, ready) and every handle's audio:

    lost        accepted requests not answered with their audio (must be 0)
    duplicated  answers more than one per request, or audio of the wrong length,
                or a replayed request whose audio is not bit-identical to a
                clean run of its seed (must be 0)
    detection   kill -> the supervisor's "dead" event
    re-dispatch kill -> the requeued request's next "dispatched" event

The supervisor's respawn rule is not scaled with the benchmark: a first death
respawns at once, deaths in a row back off 1, 2, 4 ... s, and the count starts
over once a worker has been ready 10 s. Each worker dies two or three times
here, mostly far enough apart to come back at once; the time a slot is down is
part of the p99 during the kills.

    python -m bench.recovery.run --out recovery.json [--quick]
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import signal
import sys
import threading
import time

from bench import common

SPEEDS = (1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5)
SIM_RTF = 0.05  # the engine's default: 1 s of audio in 50 ms on a speed-1 worker
SIM_CHUNK_S = 0.5
MEAN_S = 4.0
CV = 1.0
LOAD = 0.8
RUN_S = 95.0  # both runs at once: one with kills, one without
KILL_EVERY_S = 4.0
SEED = 4242


class Tracker:
    """Listener: which requests each slot holds now, and the handles to check."""

    def __init__(self, check: queue.Queue):
        self.lock = threading.Lock()
        self.held: dict[int, dict[str, int]] = {}  # slot -> {request id: attempt}
        self.check = check

    def __call__(self, e) -> None:
        rid = e.request.id
        with self.lock:
            if e.kind == "dispatched":
                self.held.setdefault(e.slot, {})[rid] = e.request.attempt
            elif e.kind == "requeued":
                self.held.get(e.slot, {}).pop(rid, None)
            elif e.kind == "finished":
                for reqs in self.held.values():
                    reqs.pop(rid, None)
        if e.kind == "finished":
            self.check.put(e)  # its request and handle

    def holding(self, slot: int) -> dict[str, int]:
        with self.lock:
            return dict(self.held.get(slot, {}))


class Verifier(threading.Thread):
    """Checks each answered request's audio as it finishes, then lets it go."""

    def __init__(self, check: queue.Queue):
        super().__init__(name="verifier", daemon=True)
        self.check = check
        self.ok = 0
        self.bad: list[str] = []
        self.replays_checked = 0

    def run(self) -> None:
        from workers.engines.sim import tone
        from workers.wire.estimate import audio_seconds_for
        from workers.wire.messages import SAMPLE_RATE, Done

        while True:
            job = self.check.get()
            if job is None:
                return
            req, handle = job.request, job.handle
            if not isinstance(handle.outcome, Done):
                self.bad.append(f"{req.id}: {handle.outcome}")
                continue
            pcm = handle.audio()
            total = int(round(audio_seconds_for(req.text, req.max_audio_s) * SAMPLE_RATE))
            if len(pcm) != total:
                self.bad.append(f"{req.id}: {len(pcm)} samples, expected {total}")
                continue
            if req.attempt > 1:
                self.replays_checked += 1
                if not (pcm == tone(req.seed, 0, total)).all():
                    self.bad.append(f"{req.id}: replayed audio differs from a clean run")
                    continue
            self.ok += 1


def run_phase(pool, rec, tracker, verifier_q, workload, kills: bool, rng, start_at) -> dict:
    """Drive one workload from `start_at`; with kills, SIGKILL a worker every KILL_EVERY_S."""
    from workers.wire.board import Col, SlotState

    rec.clear()
    verifier = Verifier(verifier_q)
    verifier.start()
    kill_log: list[dict] = []
    stop = threading.Event()
    killed_once: set[str] = set()  # requests already replayed once
    kills_of: dict[int, int] = {}  # slot -> kills so far

    def killer():
        t_next = start_at + 5.0
        end = start_at + workload.arrivals[-1] - 5.0
        while not stop.is_set() and t_next < end:
            stop.wait(max(0.0, t_next - time.monotonic()))
            if stop.is_set():
                return
            candidates = []
            for slot in range(len(SPEEDS)):
                if int(pool.board.get(slot, Col.SLOT_STATE)) != SlotState.RUNNING:
                    continue
                held = tracker.holding(slot)
                if held and not (set(held) & killed_once) and all(a == 1 for a in held.values()):
                    candidates.append((slot, held))
            if not candidates:
                t_next = time.monotonic() + 0.05
                continue
            # Spread the kills: among the candidates, one of those killed least so far.
            fewest = min(kills_of.get(c[0], 0) for c in candidates)
            slot, held = rng.choice([c for c in candidates if kills_of.get(c[0], 0) == fewest])
            kills_of[slot] = kills_of.get(slot, 0) + 1
            pid = int(pool.board.get(slot, Col.PID))
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            killed_once.update(held)
            kill_log.append({"t": t_kill, "slot": slot, "pid": pid, "held": sorted(held)})
            t_next += KILL_EVERY_S

    submitted: dict[str, float] = {}
    thread = threading.Thread(target=killer, name="killer", daemon=True) if kills else None
    if thread:
        thread.start()
    t0, lags = common.drive(
        pool,
        workload,
        on_submit=lambda i, req, target: submitted.__setitem__(req.id, target),
        start_at=start_at,
    )
    stop.set()
    if thread:
        thread.join()
    common.drain(pool, timeout=300)
    verifier_q.put(None)
    verifier.join(timeout=120)
    return analyse(pool, rec, submitted, kill_log, verifier, t0, lags)


def analyse(pool, rec, submitted, kill_log, verifier, t0, lags) -> dict:
    per = rec.by_request()
    finished_counts = [len(per.get(rid, {}).get("finished", [])) for rid in submitted]
    lost = sum(1 for c in finished_counts if c == 0)
    duplicated = sum(1 for c in finished_counts if c > 1)
    answered = [(t, per[rid]["finished"][0][0] - t) for rid, t in submitted.items() if per.get(rid)]
    lat = [x for _, x in answered]
    replayed = [rid for rid in submitted if per.get(rid, {}).get("requeued")]
    lat_replayed = [per[rid]["finished"][0][0] - submitted[rid] for rid in replayed]
    events = list(pool.supervisor.events)
    detect, requeue, redispatch, respawn = [], [], [], []
    for k in kill_log:
        dead = next(
            (t for t, s, w in events if s == k["slot"] and w == "dead" and t >= k["t"]), None
        )
        ready = next(
            (t for t, s, w in events if s == k["slot"] and w == "ready" and t >= k["t"]), None
        )
        k["detect"] = None if dead is None else dead - k["t"]
        k["respawn"] = None if ready is None else ready - k["t"]
        if dead is not None:
            detect.append(dead - k["t"])
        if ready is not None:
            respawn.append(ready - k["t"])
        k["redispatch"] = []
        for rid in k["held"]:
            r = per.get(rid, {})
            rq = [t for t, s in r.get("requeued", []) if t >= k["t"]]
            if not rq:
                continue
            again = [t for t, s in r.get("dispatched", []) if t >= rq[0]]
            requeue.append(rq[0] - k["t"])
            if again:
                redispatch.append(again[0] - k["t"])
                k["redispatch"].append(again[0] - k["t"])
    accepted = len(submitted)
    span = max((t for r in per.values() for t, _ in r["finished"]), default=t0) - t0
    down = sum(x for x in respawn)
    return {
        "span_s": span,
        "down_share": down / (span * len(SPEEDS)) if span > 0 else 0.0,
        "submitted": accepted,
        "answered_ok": verifier.ok,
        "lost": lost,
        "duplicated": duplicated,
        "bad_audio": verifier.bad[:20],
        "bad_audio_count": len(verifier.bad),
        "replayed": len(replayed),
        "replays_checked_bit_exact": verifier.replays_checked,
        "latency": common.stats(lat),
        "latencies": lat,
        "arrivals": [t - t0 for t, _ in answered],
        "latency_replayed": common.stats(lat_replayed),
        "kills": kill_log,
        "detect": common.stats(detect),
        "requeue": common.stats(requeue),
        "redispatch": common.stats(redispatch),
        "respawn": common.stats(respawn),
        "counters": dict(pool.dispatcher.counters),
        "t0": t0,
        "submit_lag_p99": common.stats(lags)["p99"],
        "load_average": common.load_average(),
    }


PHASES = ("baseline", "kills")


def child(args) -> int:
    """One pool: calibrate, post it, wait for the schedule, run it (with kills or not)."""
    meet = common.Rendezvous(args.dir)
    kills = args.child == "kills"
    pool = common.start_pool(
        gpus=f"cpu:{len(SPEEDS)}",
        sim_speeds=",".join(str(s) for s in SPEEDS),
        sim_rtf=SIM_RTF,
        sim_chunk_s=SIM_CHUNK_S,
    )
    rec = common.Recorder()
    check: queue.Queue = queue.Queue()
    tracker = Tracker(check)
    pool.subscribe(rec)
    pool.subscribe(tracker)
    try:
        meet.post(f"ready-{args.child}", True)
        meet.wait("all-ready")  # calibrate only once both pools have booted
        model, _ = common.calibrate(
            pool, rec, SPEEDS, SIM_RTF, SIM_CHUNK_S, sizes=(1.0, 6.0), rounds=2
        )
        while not check.empty():  # the calibration's requests are not checked
            check.get_nowait()
        meet.post(f"calib-{args.child}", model)
        go = meet.wait("go")
        n = len(go["arrivals"])
        wl = common.Workload(
            go["arrivals"],
            common.lognormal_sizes(n, MEAN_S, CV, SEED),
            [SEED + i for i in range(n)],
        )
        result = run_phase(
            pool, rec, tracker, check, wl, kills, random.Random(SEED), go["start_at"]
        )
    finally:
        pool.shutdown(grace_s=5)
    meet.post(f"result-{args.child}", result)
    return 0


def conductor(args) -> int:
    """Both phases at once, in two pools, on one schedule: the machine's other
    load hits the run with kills and the run without alike."""
    import subprocess
    import tempfile

    seconds = 30.0 if args.quick else RUN_S
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vvp-recovery-") as tmp:
        meet = common.Rendezvous(tmp)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.recovery.run",
                    "--out",
                    "-",
                    "--child",
                    name,
                    "--dir",
                    tmp,
                ],
                cwd=common.ROOT,
            )
            for name in PHASES
        ]

        def alive() -> bool:
            return all(p.poll() in (None, 0) for p in procs)

        ok = False
        try:
            for name in PHASES:
                meet.wait(f"ready-{name}", timeout=300, alive=alive)
            meet.post("all-ready", True)
            model = common.mean_model(
                [meet.wait(f"calib-{name}", timeout=300, alive=alive) for name in PHASES]
            )
            sizes = common.lognormal_sizes(4000, MEAN_S, CV, SEED)
            rate = LOAD * common.capacity(model, sizes, SIM_CHUNK_S)
            n = int(rate * seconds)
            meet.post(
                "go",
                {
                    "start_at": time.monotonic() + 1.0,
                    "arrivals": common.poisson_arrivals(n, rate, SEED + 1),
                },
            )
            phases = {
                name: meet.wait(f"result-{name}", timeout=seconds + 300, alive=alive)
                for name in PHASES
            }
            ok = True
        finally:
            common.stop_children(procs, ok)
    for name, p in phases.items():
        print(
            f"{name}: {p['submitted']} requests, lost {p['lost']}, duplicated "
            f"{p['duplicated']}, bad audio {p['bad_audio_count']}, p99 "
            f"{p['latency']['p99'] * 1e3:.0f} ms, kills {len(p['kills'])}, detect p50 "
            f"{p['detect']['p50'] * 1e3:.1f} ms, re-dispatch p50 "
            f"{p['redispatch']['p50'] * 1e3:.1f} ms",
            flush=True,
        )
    common.save_json(
        args.out,
        {
            "speeds": SPEEDS,
            "sim_rtf": SIM_RTF,
            "sim_chunk_s": SIM_CHUNK_S,
            "mean_s": MEAN_S,
            "cv": CV,
            "load": LOAD,
            "rate": rate,
            "run_s": seconds,
            "kill_every_s": KILL_EVERY_S,
            "model": model,
            "phases": phases,
            "seconds": time.monotonic() - t_start,
        },
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="a short run (development)")
    ap.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return child(args) if args.child else conductor(args)


if __name__ == "__main__":
    sys.exit(main())
