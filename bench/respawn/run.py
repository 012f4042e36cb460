"""Respawn: SIGKILL a tiny-model worker and time it until it serves again.

A pool of the tiny VibeVoice model on 2 CPU workers, as a new user starts it.
Each kill hits an idle worker, the two in turn, once it has been ready for the
supervisor's healthy reset (10 s), so every respawn is a first death (no
backoff; the table shows the wait, which must be 0). From the supervisor's own events and
the worker's Ready message, each kill is cut into:

    detect      SIGKILL -> the supervisor sees the death (its `dead` event)
    fork        the new worker's process start (`starting` -> `forked`/`spawned`)
    child       the new process up to its engine load (unpickling, board, threads)
    load        the engine's load(): weights mapped, model built (the Ready's boot_s)
    imports     in a spawned worker: inside `child` + `load`; with the zygote: paid
                once, at launch, by the zygote (reported apart)
    kill->ready SIGKILL -> the slot ready with a new pid (what /v1/pool shows)

then a first request on the new worker against a second one (first step).
The same pool started with `worker_start = spawn` gives today's figures.

    python -m bench.respawn.run --out respawn.json [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

from bench import common

KILLS = 7  # the median of at least 5
SPAWN_KILLS = 3
GAP_S = 1.0  # at least this between kills (and each worker ready HEALTHY_RESET_S first)
TEXT = "Speaker 1: a first request on a new worker"


def _events_since(pool, slot: int, t: float) -> dict:
    out: dict[str, float] = {}
    for when, s, what in list(pool.supervisor.events):
        if s == slot and when >= t and what not in out:
            out[what] = when
    return out


def _submit_to(pool, slot: int, seed: int):
    from vibevoice_pool.script import parse_script

    others = [i for i in pool.live_slots() if i != slot]
    for i in others:
        pool.dispatcher.drain(i)
    try:
        return pool.submit(pool.make_request(parse_script(TEXT), seed=seed))
    finally:
        for i in others:
            pool.dispatcher.undrain(i)


def _timed(pool, slot: int, seed: int) -> float:
    t = time.monotonic()
    pool_handle = _submit_to(pool, slot, seed)
    pool_handle.result(timeout=120)
    return time.monotonic() - t


def run_pool(model_dir: str, cache: str, mode: str, kills: int) -> dict:
    from vibevoice_pool.config import build
    from vibevoice_pool.pool.facade import Pool
    from vibevoice_pool.pool.recovery import HEALTHY_RESET_S
    from workers.wire.board import Col

    t0 = time.monotonic()
    cfg = build(
        {
            "engine": "vibevoice",
            "model_path": model_dir,
            "gpus": "cpu:2",
            "cache_dir": cache,
            "worker_start": mode,
            "log_level": "WARNING",
        }
    )
    pool = Pool.start(cfg, model_path=model_dir)
    common.wait_for(lambda: pool.ready_workers() == 2, 180, "both workers")
    launch_s = time.monotonic() - t0
    rows = []
    try:
        for _ in range(2):  # both workers have run a request before the kills
            for slot in (0, 1):
                _timed(pool, slot, 1)
        time.sleep(GAP_S)
        for k in range(kills):
            slot = k % 2
            # a worker killed before it was healthy that long would wait its backoff
            since = pool.board.get(slot, Col.READY_SINCE)
            time.sleep(max(0.0, since + HEALTHY_RESET_S + 0.2 - time.monotonic()))
            old = int(pool.status()["workers"][slot]["pid"])
            t_kill = time.monotonic()
            os.kill(old, signal.SIGKILL)

            def back(slot=slot, old=old):
                w = pool.status()["workers"][slot]
                return w["state"] == "ready" and w["pid"] not in (0, old)

            common.wait_for(back, 120, f"worker {slot} back", interval=0.002)
            ready = time.monotonic()
            ev = _events_since(pool, slot, t_kill)
            started = ev.get("forked", ev.get("spawned"))
            boot_s = pool.supervisor.slots[slot].boot_s
            first = _timed(pool, slot, 100 + k)
            second = _timed(pool, slot, 100 + k)
            rows.append(
                {
                    "slot": slot,
                    "forked": "forked" in ev,
                    "kill_to_ready": ready - t_kill,
                    "detect": ev["dead"] - t_kill,
                    "wait": ev["starting"] - ev["dead"],
                    "fork": started - ev["starting"],
                    "child": (ev["ready"] - started) - boot_s,
                    "load": boot_s,
                    "first_request": first,
                    "second_request": second,
                }
            )
            print(
                f"{mode} kill {k + 1}: ready in {rows[-1]['kill_to_ready']:.3f} s "
                f"(load {boot_s:.3f} s, first request {first:.3f} s, second {second:.3f} s)",
                flush=True,
            )
            time.sleep(GAP_S)
        zygote = pool.supervisor.zygote
        out = {
            "mode": mode,
            "launch_s": launch_s,
            "zygote_warm_up_s": zygote.warm_up_s if zygote.enabled else None,
            "kills": rows,
        }
        out["import_s"] = _zygote_imports(zygote) if zygote.enabled else None
        out["map_s"] = _map_time(zygote, pool.supervisor.slots[0].engine.model_path)
        return out
    finally:
        pool.shutdown(grace_s=0)


def _zygote_imports(zygote) -> float | None:
    """What the zygote's preload imports cost it (read in a child forked from it)."""
    from workers.zygote.probe import probe

    ctx, forked = zygote.context()
    if not forked:
        return None
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=probe, args=(writer,))
    child.start()
    writer.close()
    report = reader.recv() if reader.poll(30) else {}
    child.join(10)
    return report.get("import_s")


def map_weights(folder: str, results) -> None:
    """In a forked (or spawned) child: map every weight file of `folder` as the
    engine's load does (safetensors), and report how long that took."""
    from pathlib import Path

    from safetensors.torch import load_file

    t0 = time.monotonic()
    tensors = sum(len(load_file(str(f))) for f in sorted(Path(folder).glob("*.safetensors")))
    results.send({"map_s": time.monotonic() - t0, "tensors": tensors})
    results.close()


def _map_time(zygote, folder: str) -> float | None:
    """How long a new worker takes to map the weights its engine loads (the
    held memory files with warm_weights), measured in a child started as the
    pool starts its workers."""
    ctx, _ = zygote.context()
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=map_weights, args=(folder, writer))
    child.start()
    writer.close()
    report = reader.recv() if reader.poll(60) else {}
    child.join(10)
    return report.get("map_s")


def summarise(res: dict) -> dict:
    def median(rows, key):
        return common.stats([r[key] for r in rows])["p50"]

    out = {}
    for mode in ("zygote", "spawn"):
        rows = res[mode]["kills"]
        keys = ("kill_to_ready", "detect", "wait", "fork", "child", "load")
        out[mode] = {k: median(rows, k) for k in keys}
        out[mode]["max_kill_to_ready"] = max(r["kill_to_ready"] for r in rows)
        out[mode]["first_step"] = median(rows, "first_request") - median(rows, "second_request")
        out[mode]["n"] = len(rows)
        out[mode]["forked"] = sum(r["forked"] for r in rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer kills (development)")
    args = ap.parse_args(argv)
    from workers.checkpoints.tiny import ensure_tiny_model

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vvp-respawn-") as tmp:
        model = ensure_tiny_model(os.path.join(tmp, "tiny-model"))
        kills = 5 if args.quick else KILLS
        res = {
            "zygote": run_pool(model, tmp, "zygote", kills),
            "spawn": run_pool(model, tmp, "spawn", 2 if args.quick else SPAWN_KILLS),
        }
    res["summary"] = summarise(res)
    res["seconds"] = time.monotonic() - t_start
    res["load_average"] = common.load_average()
    s = res["summary"]
    print(
        f"kill to ready, median of {s['zygote']['n']}: zygote {s['zygote']['kill_to_ready']:.3f} s,"
        f" spawn {s['spawn']['kill_to_ready']:.3f} s (median of {s['spawn']['n']})",
        flush=True,
    )
    common.save_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
