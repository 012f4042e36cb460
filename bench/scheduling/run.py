"""Scheduling quality: the pool's policies against a central-queue bound.

Four SimEngine workers in real processes (speeds 1, 1, 0.5, 0.5), open-loop
Poisson arrivals, lognormal sizes (CV 1 and 2), loads 0.85 and 0.9. Every
policy runs on the same arrivals and sizes (same seeds), on one pool that is
warmed up first, so every worker's speed column is measured before a figure
is taken:

    calibration  before each CV/load pair: rounds of one request per worker at
                 once, 3 sizes; each worker's compute time = a * steps + b
    workload     arrival rate = load * the capacity that calibration gives
    bound        a discrete-event simulation of one FCFS queue served by the
                 fastest idle worker, on the same arrivals and sizes
    runs         each policy, late-bound or bound at arrival; each run also gets
                 its own bound, simulated with the compute times fitted to that
                 run's requests (the machine is shared: speeds drift), and its
                 hand-off gap (how long a worker sat idle while work waited)

The dispatcher sees each request's size as the script-length estimate, which
for the real model is only roughly the audio it makes: here each estimate is
off by a lognormal factor (mean 1, CV ESTIMATE_CV); the engine still makes the
scripted length. The bound knows the true sizes.

`seed_stale` is registered here for the benchmark only: the old demo's score
(queue*10 + mem%*0.5 + util%*0.3) with mem% and util% from a poll every 5 s
of scaled time, as the old demo polled nvidia-smi; the queue is live, as the
old demo counted its own requests.

    python -m bench.scheduling.run --out sched.json [--quick]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import sys
import threading
import time
from collections import deque

from bench import common
from bench.scheduling.record import BOUND, _cv

SPEEDS = (1.0, 1.0, 0.5, 0.5)
SIM_RTF = 0.06  # bench wall seconds per audio second on a speed-1 worker
SIM_CHUNK_S = 0.5  # audio seconds per generation step (the engine's default)
REAL_RTF = 0.5  # assumed: a speed-1 GPU makes 1 s of VibeVoice audio in 0.5 s
TIME_SCALE = SIM_RTF / REAL_RTF  # bench seconds per real second
POLL_S = 5.0 * TIME_SCALE  # the old demo's 5 s nvidia-smi poll, scaled
MEAN_S = 4.0  # mean request size, audio seconds (60 characters of script)
N_REQUESTS = 450
ESTIMATE_CV = 0.25  # the dispatcher's size estimate is off by this much (lognormal, mean 1)
CVS = (1.0, 2.0)
LOADS = (0.85, 0.9)
SEED = 20240607

# (label, policy, bound at arrival)
RUNS = (
    ("least_work", "least_work", False),
    ("least_work, bound", "least_work", True),
    ("seed (stale), bound", "seed_stale", True),
    ("least_queue, bound", "least_queue", True),
    ("round_robin, bound", "round_robin", True),
    ("power_of_two, bound", "power_of_two", True),
)


# ---- the old demo's score with stale statistics ----------------------------


class StalePoll:
    """A thread that samples each worker every `period` s, as nvidia-smi was
    polled: util% is 100 when the worker is busy at the poll, else 0. mem% is
    the same on every worker (one model on each), so it adds nothing."""

    MEM_PCT = 40.0

    def __init__(self, board, slots: list[int], period: float):
        self.board, self.slots, self.period = board, slots, period
        self.util: dict[int, float] = dict.fromkeys(slots, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stale-poll", daemon=True)

    def start(self) -> StalePoll:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        from workers.wire.board import Col, WorkerState

        while not self._stop.is_set():
            for s in self.slots:
                busy = int(self.board.get(s, Col.WORKER_STATE)) == WorkerState.BUSY
                self.util[s] = 100.0 if busy else 0.0
            self._stop.wait(self.period)

    def policy(self, views, work_s, ctx) -> list[float]:
        return [
            v.inflight * 10 + self.MEM_PCT * 0.5 + self.util.get(v.slot, 0.0) * 0.3 for v in views
        ]


# ---- service-time model and the bound --------------------------------------


def steps(size_s: float) -> int:
    return common.steps(size_s, SIM_CHUNK_S)


def fit_model(points) -> dict:
    return common.fit_model(points, SPEEDS, SIM_RTF, SIM_CHUNK_S)


def calibrate(pool, rec: common.Recorder):
    return common.calibrate(pool, rec, SPEEDS, SIM_RTF, SIM_CHUNK_S, sizes=(1.0, 6.0), rounds=2)


def service_time(model: dict, slot, size_s: float) -> float:
    return common.service_time(model, slot, size_s, SIM_CHUNK_S)


def capacity(model: dict, sizes: list[float]) -> float:
    return common.capacity(model, sizes, SIM_CHUNK_S)


def bound(
    model: dict, arrivals: list[float], sizes: list[float], transit: float, gap: float = 0.0
) -> list[float]:
    """Latencies of one FCFS queue served by the fastest idle worker. Each answer
    takes `transit` s back to the parent; a worker that frees while work waits
    starts the next request `gap` s later (0: the ideal, free hand-off)."""
    by_speed = sorted(model, key=lambda s: (model[s]["a"], s))
    rank = {s: i for i, s in enumerate(by_speed)}
    idle = set(model)
    busy: list[tuple[float, int]] = []
    waiting: deque[int] = deque()
    lat = [0.0] * len(sizes)

    def start(j: int, slot: int, t: float) -> None:
        end = t + service_time(model, slot, sizes[j])
        lat[j] = end - arrivals[j] + transit
        idle.discard(slot)
        heapq.heappush(busy, (end, slot))

    for j, at in enumerate(arrivals):
        while busy and busy[0][0] <= at:
            t, slot = heapq.heappop(busy)
            idle.add(slot)
            if waiting:
                start(waiting.popleft(), slot, t + gap)
        waiting.append(j)
        if idle:
            start(waiting.popleft(), min(idle, key=rank.__getitem__), at)
    while waiting:
        t, slot = heapq.heappop(busy)
        start(waiting.popleft(), slot, t + gap)
    return lat


# ---- one run ---------------------------------------------------------------


def run_policy(
    pool,
    rec,
    workload: common.Workload,
    policy: str,
    bind: bool,
    seed: int,
    rate: float,
    start_at: float | None = None,
) -> dict:
    """One policy on the workload; its latencies, and its own bound: the DES
    with the compute times the workers delivered in this very run."""
    d = pool.dispatcher
    d.policy = policy
    common.bind_at_arrival(d, bind)
    ctx = getattr(d, "_ctx", None)  # the policy's random generator: same draws per run
    if ctx is not None:
        ctx.rng.seed(seed)
    rec.clear()
    arrival_of: dict[str, tuple[int, float]] = {}
    load_before = common.load_average()
    t0, lags = common.drive(
        pool,
        workload,
        on_submit=lambda i, req, target: arrival_of.__setitem__(req.id, (i, target)),
        start_at=start_at,
    )
    common.drain(pool)
    d.policy = "least_work"
    common.bind_at_arrival(d, False)
    per = rec.by_request()
    lat, transit, per_slot = [], [], [0] * len(SPEEDS)
    points: dict[int, list[tuple[float, float]]] = {s: [] for s in range(len(SPEEDS))}
    on_slot: dict[int, list[tuple[float, float, float]]] = {}
    last, ok, compute = t0, 0, 0.0
    for rid, (i, target) in arrival_of.items():
        t_end, slot = per[rid]["finished"][-1]
        outcome = rec.outcomes[rid]
        lat.append(t_end - target)
        per_slot[slot] += 1
        last = max(last, t_end)
        if type(outcome).__name__ != "Done":
            continue
        ok += 1
        start = per[rid]["started_at"]
        compute += outcome.compute_s
        transit.append(t_end - start - outcome.compute_s)
        points[slot].append((steps(workload.sizes[i]), outcome.compute_s))
        on_slot.setdefault(slot, []).append((start, start + outcome.compute_s, target))
    gaps = []
    for runs in on_slot.values():
        runs.sort()
        for (_, end, _), (nxt, _, arrived) in itertools.pairwise(runs):
            if arrived < end:  # work was waiting when this worker finished
                gaps.append(nxt - end)
    model = fit_model({s: p for s, p in points.items() if p})
    t_median = common.stats(transit)["p50"]
    gap = common.stats(gaps)
    own = bound(model, workload.arrivals, workload.sizes, t_median)
    out = {
        "latencies": lat,
        "stats": common.stats(lat),
        "bound": common.stats(own),
        "bound_latencies": own,
        "model": model,
        "realised_load": rate / capacity(model, workload.sizes),
        "throughput_rps": len(lat) / (last - t0),
        "completed": ok,
        "per_worker": per_slot,
        "gap": gap,
        "gap_share": sum(gaps) / compute if compute else 0.0,
        "answer_transit": t_median,
        "submit_lag_p99": common.stats(lags)["p99"],
        "load_average": [load_before, common.load_average()],
    }
    if not bind:  # what the hand-off gap alone costs a perfect central queue
        with_gap = bound(model, workload.arrivals, workload.sizes, t_median, gap["mean"])
        out["bound_with_gap"] = common.stats(with_gap)
    return out


def configs_of(args) -> list[tuple[float, float]]:
    cvs = tuple(args.cv or ((1.0,) if args.quick else CVS))
    loads = tuple(args.load or ((0.9,) if args.quick else LOADS))
    return [(cv, load) for cv in cvs for load in loads]


def child(args) -> int:
    """One policy in its own pool: calibrate, post it, wait for the start, run."""
    from vibevoice_pool.pool import policies
    from workers.wire.board import Col

    label = args.child
    policy, bind = next((p, b) for lb, p, b in RUNS if lb == label)
    meet = common.Rendezvous(args.dir)
    pool = common.start_pool(
        gpus=f"cpu:{len(SPEEDS)}",
        sim_speeds=",".join(str(s) for s in SPEEDS),
        sim_rtf=SIM_RTF,
        sim_chunk_s=SIM_CHUNK_S,
    )
    rec = common.Recorder()
    pool.subscribe(rec)
    poll = StalePoll(pool.board, list(range(len(SPEEDS))), POLL_S).start()
    policies.POLICIES["seed_stale"] = poll.policy
    results = []
    try:
        calibrate(pool, rec)  # warm-up: every worker measures its speed
        speeds = [round(pool.board.get(s, Col.SPEED), 3) for s in range(len(SPEEDS))]
        meet.post(f"ready-{RUNS.index((label, policy, bind))}", True)
        meet.wait("all-ready")  # calibrate only once every pool has booted
        for k, (cv, _load) in enumerate(configs_of(args)):
            model, transit = calibrate(pool, rec)
            meet.post(f"calib-{k}-{RUNS.index((label, policy, bind))}", [model, transit])
            go = meet.wait(f"go-{k}")
            sizes = common.lognormal_sizes(args.n, MEAN_S, cv, SEED)
            wl = common.Workload(
                go["arrivals"],
                sizes,
                [SEED + i for i in range(args.n)],
                common.misestimates(args.n, ESTIMATE_CV, SEED + 2),
            )
            results.append(
                run_policy(pool, rec, wl, policy, bind, SEED, go["rate"], go["start_at"])
            )
    finally:
        poll.stop()
        pool.shutdown(grace_s=2)
    meet.post(f"result-{RUNS.index((label, policy, bind))}", {"runs": results, "speeds": speeds})
    return 0


def conductor(args) -> int:
    """Start one child per policy, give them one schedule per CV/load pair, and
    gather their runs; the reference bound uses the children's mean calibration."""
    import subprocess
    import tempfile

    n = args.n or (150 if args.quick else N_REQUESTS)
    runs = [r for r in RUNS if not args.policy or r[0] in args.policy]
    t_start = time.monotonic()
    configs = []
    with tempfile.TemporaryDirectory(prefix="vvp-sched-") as tmp:
        meet = common.Rendezvous(tmp)
        pairs = configs_of(args)  # the children rebuild the same pairs in the same order
        extra = [f"--n={n}", *(["--quick"] if args.quick else [])]
        extra += [f"--cv={cv:g}" for cv in dict.fromkeys(c for c, _ in pairs)]
        extra += [f"--load={load:g}" for load in dict.fromkeys(ld for _, ld in pairs)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.scheduling.run",
                    "--out",
                    "-",
                    "--child",
                    label,
                    "--dir",
                    tmp,
                    *extra,
                ],
                cwd=common.ROOT,
            )
            for label, _, _ in runs
        ]

        def alive() -> bool:
            return all(p.poll() in (None, 0) for p in procs)

        ok = False
        try:
            for r in runs:
                meet.wait(f"ready-{RUNS.index(r)}", timeout=600, alive=alive)
            meet.post("all-ready", True)
            for k, (cv, load) in enumerate(configs_of(args)):
                posted = [
                    meet.wait(f"calib-{k}-{RUNS.index(r)}", timeout=600, alive=alive) for r in runs
                ]
                model = common.mean_model([m for m, _ in posted])
                transit = sorted(t for _, t in posted)[len(posted) // 2]
                sizes = common.lognormal_sizes(n, MEAN_S, cv, SEED)
                rate = load * capacity(model, sizes)
                arrivals = common.poisson_arrivals(n, rate, SEED + 1)
                meet.post(
                    f"go-{k}",
                    {"start_at": time.monotonic() + 1.0, "rate": rate, "arrivals": arrivals},
                )
                blat = bound(model, arrivals, sizes, transit)
                configs.append(
                    {
                        "cv": cv,
                        "load": load,
                        "n": n,
                        "rate": rate,
                        "model": model,
                        "answer_transit": transit,
                        "cv_realised": _cv(sizes),
                        "mean_s": sum(sizes) / n,
                        "max_s": max(sizes),
                        "mean_service_speed1": sum(service_time(model, 0, x) for x in sizes) / n,
                        "runs": {BOUND: {"latencies": blat, "stats": common.stats(blat)}},
                    }
                )
            done = {
                r[0]: meet.wait(f"result-{RUNS.index(r)}", timeout=900, alive=alive) for r in runs
            }
            ok = True
        finally:
            common.stop_children(procs, ok)
    for label, got in done.items():
        for c, run in zip(configs, got["runs"], strict=True):
            c["runs"][label] = run
    for c in configs:
        for label, r in c["runs"].items():
            if label == BOUND:
                continue
            print(
                f"cv {c['cv']:g} load {c['load']:g} {label:20s} p50 {r['stats']['p50'] * 1e3:6.1f} "
                f"p99 {r['stats']['p99'] * 1e3:7.1f} ms, own bound p99 "
                f"{r['bound']['p99'] * 1e3:6.1f}, realised load {r['realised_load']:.2f}, "
                f"gap {r['gap']['mean'] * 1e3:.2f} ms",
                flush=True,
            )
    common.save_json(
        args.out,
        {
            "speeds": SPEEDS,
            "sim_rtf": SIM_RTF,
            "sim_chunk_s": SIM_CHUNK_S,
            "mean_s": MEAN_S,
            "estimate_cv": ESTIMATE_CV,
            "time_scale": TIME_SCALE,
            "real_rtf": REAL_RTF,
            "poll_s": POLL_S,
            "speed_column": next(iter(done.values()))["speeds"],
            "configs": configs,
            "seconds": time.monotonic() - t_start,
        },
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="short runs (development)")
    ap.add_argument("--n", type=int, help=f"requests per run (default {N_REQUESTS})")
    ap.add_argument("--cv", type=float, action="append", help="size CV (repeatable)")
    ap.add_argument("--load", type=float, action="append", help="load (repeatable)")
    ap.add_argument("--policy", action="append", help="only this run label (repeatable)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return child(args) if args.child else conductor(args)


if __name__ == "__main__":
    sys.exit(main())
