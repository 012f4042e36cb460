"""A peer, side by side: Ray Serve against the pool, same workloads, same run.

Three systems, each with two workers running the same SimEngine through the
same replica code (workers.host.ray_replica.SlotReplica for both Ray ones):

    pool          our local pool: two worker processes, our dispatcher
    pool on Ray   the same pool with --backend ray: two Serve applications of
                  one replica each, our dispatcher choosing (least_work)
    Ray Serve     one Serve deployment of two replicas, Serve's own router (power
                  of two choices) choosing, with max_ongoing_requests 1 (a replica
                  takes what it can run: late binding, as ours) and with Serve's
                  default 5 (requests queue inside the replicas)

Two workloads, driven the same way through each system's in-process client
(Pool.submit + RequestHandle.stream; DeploymentHandle.remote, stream=True):

    zero   zero-work requests (sim_rtf 0: 0.5 s of tone, no sleep), 8 clients in
           a closed loop: requests/s and latency
    sim    open loop, Poisson arrivals at 80% of the two workers' capacity,
           lognormal sizes (mean 2 s of audio, cv 1), sim_rtf 0.05

Latency is submit to the last message (Done). Around the measured zero
workload the run also reads where the time goes (bench/ray_peer/cost.py): CPU
per request by process, and for the two pools the steps of a request's round
trip from the dispatcher's events. Ray runs inside a private
network namespace with only loopback (the script re-runs itself under
`unshare --net` when it is not in one). Prints a Markdown table; --out writes
JSON. bench/run_all.py runs it like the other sections. To compare two
checkouts of the Ray path, bench/ray_peer/rounds.py measures the pool on Ray's
zero workload alone, in longer rounds.

    python -m bench.ray_peer.run --out ray_peer.json [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.ray_peer import cost

ROOT = common.ROOT

CLIENTS = 8
LOAD = 0.8
MEAN_S, CV = 2.0, 1.0
SIM_RTF = 0.05
SYSTEMS = ("pool", "pool_ray", "serve", "serve_default")
SERVES = ("serve", "serve_default")
TITLES = {
    "pool": "pool",
    "pool_ray": "pool on Ray",
    "serve": "Ray Serve (max_ongoing 1)",
    "serve_default": "Ray Serve (max_ongoing 5)",
}
MAX_ONGOING = {"serve": 1, "serve_default": 5}


def sizes_for(n: int) -> dict:
    rate = LOAD * 2 / (MEAN_S * SIM_RTF)  # two workers, speed 1
    return {
        "zero": {"n": n, "clients": CLIENTS, "audio_s": 0.5, "sim_rtf": 0.0},
        "sim": {
            "n": n // 2,
            "rate": rate,
            "arrivals": common.poisson_arrivals(n // 2, rate, seed=11),
            "sizes": common.lognormal_sizes(n // 2, MEAN_S, CV, seed=12),
            "sim_rtf": SIM_RTF,
        },
    }


# ---- the systems ---------------------------------------------------------------


class PoolSystem:
    """The pool (local or on Ray), driven through submit + handle.stream()."""

    def __init__(self, backend: str, sim_rtf: float):
        settings = {"gpus": "cpu:2", "sim_rtf": sim_rtf, "backend": backend}
        self.pool = common.start_pool(**settings)

    def request(self, audio_s: float, seed: int):
        return common.make_request(self.pool, audio_s, seed)

    async def call(self, req) -> bool:
        from workers.wire import messages as m

        handle = self.pool.submit(req)
        try:
            async for _ in handle.stream():
                pass
        except m.PoolError:
            return False
        return True

    def record(self) -> common.Recorder:
        recorder = common.Recorder()
        self.pool.subscribe(recorder)
        return recorder

    def close(self) -> None:
        self.pool.shutdown(grace_s=0)


class ServeSystem:
    """One Serve deployment of two replicas; Serve's router picks one."""

    def __init__(self, sim_rtf: float, app: str, max_ongoing: int):
        from ray import serve

        from workers.engines.contract import EngineSpec
        from workers.host.ray_replica import SlotReplica

        spec = EngineSpec(engine="sim", sim_rtf=sim_rtf)
        deployment = serve.deployment(SlotReplica).options(
            name="peer",
            num_replicas=2,
            max_ongoing_requests=max_ongoing,
            ray_actor_options={"num_cpus": 0},
            logging_config={"enable_access_log": False, "log_level": "WARNING"},
        )
        self.app = app
        handle = serve.run(deployment.bind(spec), name=app, route_prefix=None)
        self.handle = handle.options(method_name="synthesize", stream=True)
        self.n = 0

    def request(self, audio_s: float, seed: int):
        from workers.wire import messages as m

        self.n += 1
        text = common.script_for(audio_s)
        return m.Request(id=f"peer-{self.n}", turns=(m.Turn(0, text),), seed=seed)

    async def call(self, req) -> bool:
        from workers.wire import messages as m

        last = None
        async for item in self.handle.remote(req):  # a list: what one step made
            last = item[-1]
        return isinstance(last, m.Done)

    def close(self) -> None:
        from ray import serve

        serve.delete(self.app)


# ---- the workloads -------------------------------------------------------------


async def closed_loop(system, n: int, clients: int, audio_s: float) -> dict:
    reqs = iter([system.request(audio_s, i) for i in range(n)])
    latencies, failed = [], 0

    async def client():
        nonlocal failed
        for req in reqs:
            t = time.perf_counter()
            ok = await system.call(req)
            latencies.append(time.perf_counter() - t)
            failed += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    return summary(latencies, failed, elapsed)


async def open_loop(system, arrivals: list[float], sizes: list[float]) -> dict:
    reqs = [system.request(s, i) for i, s in enumerate(sizes)]
    latencies, failed, ends = [], 0, []

    async def one(req):
        nonlocal failed
        t = time.perf_counter()
        ok = await system.call(req)
        ends.append(time.perf_counter())
        latencies.append(ends[-1] - t)
        failed += not ok

    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    start = time.perf_counter() + 0.05
    tasks = []
    for req, at in zip(reqs, arrivals, strict=True):
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    await asyncio.gather(*tasks)
    return summary(latencies, failed, max(ends) - start)


def summary(latencies: list[float], failed: int, elapsed: float) -> dict:
    s = common.stats(latencies)
    return {
        "n": s["n"],
        "failed": failed,
        "seconds": elapsed,
        "rps": s["n"] / elapsed if elapsed > 0 else float("nan"),
        "p50_s": s["p50"],
        "p99_s": s["p99"],
        "mean_s": s["mean"],
    }


def run_workload(name: str, w: dict) -> dict:
    """Each system in turn: start it, warm it, measure, stop it."""
    out = {}
    for system_name in SYSTEMS:
        if system_name in SERVES:
            app = f"peer-{name}-{system_name}"
            system = ServeSystem(w["sim_rtf"], app, MAX_ONGOING[system_name])
        else:
            system = PoolSystem("local" if system_name == "pool" else "ray", w["sim_rtf"])
        try:
            asyncio.run(closed_loop(system, 20, 2, 0.5))  # warm-up
            if name == "zero":
                coro = closed_loop(system, w["n"], w["clients"], w["audio_s"])
            else:
                coro = open_loop(system, w["arrivals"], w["sizes"])
            recorder = system.record() if name == "zero" and hasattr(system, "record") else None
            before = cost.cpu_seconds()
            r = out[system_name] = asyncio.run(coro)
            if name == "zero":  # where the time goes
                r["cpu_ms"] = cost.by_role(before, cost.cpu_seconds(), r["n"])
                if recorder is not None:
                    r["hops"] = cost.hops(recorder)
        finally:
            system.close()
        r = out[system_name]
        print(
            f"   {name:4s} {TITLES[system_name]:26s} {r['rps']:8.1f} req/s  "
            f"p50 {common.ms(r['p50_s'])} ms  p99 {common.ms(r['p99_s'])} ms  "
            f"failed {r['failed']}",
            flush=True,
        )
    return out


def ratios(results: dict) -> dict:
    """The pool (local, and on Ray) against the better of the two Ray Serve
    configurations, metric by metric: > 1 means the pool is ahead."""
    out = {}
    for name, r in results.items():
        best_rps = max(r[s]["rps"] for s in SERVES)
        best = {k: min(r[s][k] for s in SERVES) for k in ("p50_s", "p99_s")}
        out[name] = {
            f"{key}{suffix}": value
            for suffix, pool in (("", r["pool"]), ("_pool_on_ray", r["pool_ray"]))
            for key, value in (
                ("rps", pool["rps"] / best_rps),
                ("p50", best["p50_s"] / pool["p50_s"]),
                ("p99", best["p99_s"] / pool["p99_s"]),
            )
        }
    return out


def markdown(results: dict, ratio: dict) -> str:
    rows = []
    for name, r in results.items():
        for metric, key, fmt in (
            ("requests/s", "rps", lambda v: f"{v:.1f}"),
            ("p50 ms", "p50_s", common.ms),
            ("p99 ms", "p99_s", common.ms),
        ):
            cells = [fmt(r[s][key]) for s in SYSTEMS]
            rk = {"rps": "rps", "p50_s": "p50", "p99_s": "p99"}[key]
            rows.append(
                [
                    name,
                    metric,
                    *cells,
                    f"{ratio[name][rk]:.2f}x",
                    f"{ratio[name][rk + '_pool_on_ray']:.2f}x",
                ]
            )
    header = ["workload", "metric", *(TITLES[s] for s in SYSTEMS)]
    header += ["pool vs best Serve", "pool on Ray vs best Serve"]
    return common.table(header, rows)


def measure(quick: bool) -> dict:
    from vibevoice_pool.config import build
    from vibevoice_pool.ray.cluster import RayCluster, only_loopback

    logging.getLogger("vibevoice_pool").setLevel(logging.WARNING)
    n = 160 if quick else 400
    workloads = sizes_for(n)
    cluster = RayCluster(build({"log_level": "WARNING"}))  # one Ray for the run
    t0 = time.monotonic()
    cluster.start(cpus_needed=2)
    started_s = time.monotonic() - t0
    results = {}
    try:
        for name, w in workloads.items():
            results[name] = run_workload(name, w)
    finally:
        survivors = cluster.stop()
    ratio = ratios(results)
    described = {
        k: {x: y for x, y in v.items() if x not in ("arrivals", "sizes")}
        for k, v in workloads.items()
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "revision": _revision(),
        "command": "python -m bench.ray_peer.run" + (" --quick" if quick else ""),
        "machine": common.machine(),
        "load": common.load_average(),
        "only_loopback": only_loopback(),
        "ray_start_s": started_s,
        "ray_survivors": survivors,
        "workloads": described,
        "results": results,
        "ratios": ratio,
        "table": markdown(results, ratio),
    }


def _revision() -> str:
    from bench.run_all import git_revision

    return git_revision()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    try:
        from vibevoice_pool.ray.cluster import netns_command, only_loopback
    except ImportError as e:  # no ray extra: say so, and leave a record that says so
        note = f"skipped: Ray Serve is not installed ({e.name}); pip install 'vibevoice-pool[ray]'"
        print(note)
        if args.out:
            Path(args.out).write_text(json.dumps({"skipped": note}))
        return 0
    if not only_loopback():  # Ray listens on every interface: keep it private
        again = [sys.executable, "-m", "bench.ray_peer.run"]
        again += ["--out", os.path.abspath(args.out)] if args.out else []
        again += ["--quick"] if args.quick else []
        cmd = netns_command(again)
        return subprocess.run(cmd, cwd=ROOT).returncode
    data = measure(args.quick)
    print(data["table"])
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1, default=float))
    return 0 if not data["ray_survivors"] else 1


if __name__ == "__main__":
    sys.exit(main())
