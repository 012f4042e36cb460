"""The record of the Ray Serve peer section: its table, as the run printed it, and
where a zero-work request's time goes (bench/ray_peer/cost.py), with its reading."""

from __future__ import annotations

from bench import common
from bench.ray_peer.cost import DRIVER, HOPS, cores_used
from bench.ray_peer.run import SYSTEMS, TITLES


def section(sec, img_dir=None, rel="") -> list[str]:
    out = ["## 5. A peer, side by side: Ray Serve", ""]
    if sec is None:
        return out + ["`python -m bench.ray_peer.run` was not run in this run.", ""]
    if "data" not in sec:
        return out + common.failed("ray", sec)
    data = sec["data"]
    if "skipped" in data:
        return out + [f"Not measured: {data['skipped']}.", ""]
    out += [run_line(data)] if "date" in data else []
    out += [
        "`python -m bench.ray_peer.run` (its own table, as it prints it; see its docstring for "
        "the set-up):",
        "",
        data.get("table", "").rstrip(),
        "",
    ]
    zero = data.get("results", {}).get("zero", {})
    if all("cpu_ms" in zero.get(s, {}) for s in SYSTEMS):
        out += where_the_time_goes(zero, data["machine"]["cores"])
    return out


def run_line(data: dict) -> str:
    mc, load = data["machine"], data.get("load") or []
    loads = ", ".join(f"{x:g}" for x in load) or "n/a"
    return (
        f"Run {data['date']} on {mc['cpu']}, {mc['cores']} cores, commit {data['revision']}, "
        f"load average {loads} at the start: `{data['command']}`.\n"
    )


def where_the_time_goes(zero: dict, cores: int) -> list[str]:
    roles = []  # in the order of the first system's largest; none that is all zeros
    for s in SYSTEMS:
        roles += [r for r, v in zero[s]["cpu_ms"].items() if r not in roles and v >= 0.005]
    rows = [[role, *(f"{zero[s]['cpu_ms'].get(role, 0.0):.2f}" for s in SYSTEMS)] for role in roles]
    total = {s: sum(zero[s]["cpu_ms"].values()) for s in SYSTEMS}
    busy = {s: cores_used(zero[s]["cpu_ms"], zero[s]["rps"]) for s in SYSTEMS}
    rows.append(["**total**", *(f"**{total[s]:.2f}**" for s in SYSTEMS)])
    rows.append([f"cores busy (of {cores})", *(f"{busy[s]:.2f}" for s in SYSTEMS)])
    out = [
        "### Where a zero-work request's time goes",
        "",
        "CPU per request (ms, user + system, this process and every process it started) "
        "over the measured zero workload:",
        "",
        common.table(["process", *(TITLES[s] for s in SYSTEMS)], rows),
        "",
    ]
    pools = [s for s in ("pool", "pool_ray") if zero[s].get("hops")]
    if pools:
        hop_rows = [[h, *(_ms(zero[s]["hops"].get(h)) for s in pools)] for h in HOPS]
        out += [
            "One request's round trip in the pool (medians, ms; the worker's start of the "
            "row read on its own clock, the same monotonic clock on one machine; the parent "
            "notes a send just after making it, so a worker that starts at once can read "
            "a little earlier):",
            "",
            common.table(["step", *(TITLES[s] for s in pools)], hop_rows),
            "",
        ]
    return out + reading(zero, total, busy, cores)


def reading(zero: dict, total: dict, busy: dict, cores: int) -> list[str]:
    ray, local = zero["pool_ray"], zero["pool"]
    serve = min(("serve", "serve_default"), key=lambda s: total[s])
    little = 8 / ray["rps"] * 1e3 if ray["rps"] > 0 else float("nan")
    out = [
        "### Reading the figures",
        "",
        f"- A zero-work request costs the pool on Ray {total['pool_ray']:.1f} ms of CPU, "
        f"against {total['pool']:.1f} ms on the local pool, and {total[serve]:.1f} ms "
        f"through Serve's own router ({TITLES[serve]}) with the same replica class. Of "
        f"the pool on Ray's, {ray['cpu_ms'].get(DRIVER, 0.0):.1f} ms are in this process "
        f"(the Serve handle and its router, Ray's core worker, our stream threads and "
        f"dispatcher) and {ray['cpu_ms'].get('replicas', 0.0):.1f} ms in the replicas "
        "(Serve's request wrapper, the actor call, one Ray object per streamed item). "
        "That is the price of a Serve call, not a wait of ours.",
        f"- The round trip is CPU work, not waiting: this run's processes kept "
        f"{busy['pool_ray']:.2f} of {cores} cores busy (the machine's other work, in the "
        "load average, took its share of the rest), so it stretches with the machine's "
        "load. With 8 clients in a closed loop the p50 is the queue that this cost makes: "
        f"8 / {ray['rps']:.0f} requests/s = {little:.0f} ms (Little's law), measured "
        f"{ray['p50_s'] * 1e3:.0f} ms.",
    ]
    hops = ray.get("hops") or {}
    if hops:
        out.append(
            f"- Each replica runs one zero-work request at a time (max_batch_size 1): a "
            f"round trip of {hops.get(HOPS[3], float('nan')):.1f} ms (median) against "
            f"{(local.get('hops') or {}).get(HOPS[3], float('nan')):.1f} ms locally, and "
            f"the dispatcher sends the next request "
            f"{hops.get(HOPS[4], float('nan')):+.2f} ms after a Done (it sends it while "
            "handling the Done): no poll interval, blocking get or extra round trip of "
            "ours lies between two requests."
        )
    rest = f" ({hops[HOPS[2]]:.1f} ms of the {hops[HOPS[3]]:.1f} ms here)" if hops else ""
    out += [
        "- Streamed items: the replica yields what each step made for a request as one "
        "item, one Ray object (Started once the row is scheduled, then each step's "
        "Chunks and Done; what is already queued goes together), so a zero-work request "
        "(Started, two Chunks, Done, its chunks made in two steps) crosses as one to "
        f"three items where it took four; the Started -> Done step{rest} is what is left "
        "of the later ones. The rest is Serve's per-call machinery, the same through "
        "Serve's own router. With the real model a request is seconds of GPU work and "
        "the same cost is a percent or less.",
        "",
    ]
    return out


def _ms(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"
