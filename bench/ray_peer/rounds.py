"""The pool on Ray's zero workload alone, in rounds: for comparing two checkouts.

A full peer run (bench/ray_peer/run.py) measures each system for 3-4 s, and on
a shared machine its CPU per request moves by a third from run to run. This
starts one Ray, deploys the pool on Ray once, warms it, then measures rounds of
the zero workload (8 clients in a closed loop, as run.py) and prints one JSON
line per run: for each round requests/s, p50 and p99 (ms), CPU per request (ms,
every process, bench/ray_peer/cost.py) and the load average. Run it in each
checkout in turn (before, after, before, ...) and compare the medians; docs/
PERFORMANCE.md section 5 has such a comparison. Ray runs inside a private network
namespace (it re-runs itself under `unshare --net`, as run.py does).

    python -m bench.ray_peer.rounds [--rounds 3] [--n 800]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(rounds: int, n: int) -> tuple[list[dict], list]:
    from bench.ray_peer import cost
    from bench.ray_peer.run import PoolSystem, closed_loop
    from vibevoice_pool.config import build
    from vibevoice_pool.ray.cluster import RayCluster

    logging.getLogger("vibevoice_pool").setLevel(logging.WARNING)
    cluster = RayCluster(build({"log_level": "WARNING"}))
    cluster.start(cpus_needed=2)
    out, survivors = [], []
    try:
        system = PoolSystem("ray", 0.0)
        try:
            asyncio.run(closed_loop(system, 40, 2, 0.5))  # warm-up
            for _ in range(rounds):
                load = os.getloadavg()[0]
                before = cost.cpu_seconds()
                r = asyncio.run(closed_loop(system, n, 8, 0.5))
                cpu = cost.by_role(before, cost.cpu_seconds(), r["n"])
                out.append(
                    {
                        "rps": round(r["rps"], 1),
                        "p50_ms": round(r["p50_s"] * 1e3, 1),
                        "p99_ms": round(r["p99_s"] * 1e3, 1),
                        "cpu_ms": round(sum(cpu.values()), 2),
                        "load": round(load, 1),
                    }
                )
        finally:
            system.close()
    finally:
        survivors = cluster.stop()
    return out, survivors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=800, help="requests a round")
    args = ap.parse_args(argv)
    from bench.ray_peer.run import _revision
    from vibevoice_pool.ray.cluster import netns_command, only_loopback

    if not only_loopback():  # Ray listens on every interface: keep it private
        again = [sys.executable, "-m", "bench.ray_peer.rounds"]
        again += ["--rounds", str(args.rounds), "--n", str(args.n)]
        return subprocess.run(netns_command(again), cwd=ROOT).returncode
    rounds, survivors = measure(args.rounds, args.n)
    print(
        json.dumps(
            {"revision": _revision(), "rounds": rounds, "ray_survivors": survivors}, default=str
        )
    )
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
