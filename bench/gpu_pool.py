"""The pool on one GPU: one worker against two, a worker SIGKILLed mid-batch, who holds memory.

Drives the Pool facade from Python (no HTTP, no page) with the VibeVoice engine on a
model folder in the HF layout (on a GPU: VibeVoice-1.5B's architecture with random
weights and a sequence_bias on the audio token, as `bench/gpu_respawn.py
--build-full-size` saves it). For each worker count (`--workers 1,2`, all on GPU 0):

    1. starts the pool (zygote, weights held in memory) and times it to every worker ready;
    2. a warm-up request per worker, then `--requests` requests submitted at once, of
       mixed lengths (2, 4, 6, 8 s of audio in turn, each capped by its max_audio_s);
       reports p50/p99 latency, first audio, and the audio seconds per wall second
       of the whole burst (first submit to last finish);
    3. while they run, asks nvidia-smi which processes hold GPU memory: only the
       workers may (not this parent, not the zygote), and reads the parent's and the
       zygote's memory maps for the CUDA driver;
    4. with `--kill` (first worker count only): a burst of 4 requests, SIGKILL of the
       worker once the first audio came, kill-to-ready (the slot ready with a new pid)
       cut into the supervisor's events, and the requests' outcomes (requeued, done).

    python bench/gpu_pool.py --model DIR --rows 16 --kill --out gpu_pool.json
    python bench/gpu_pool.py --tiny --rows 4 --requests 4 --kill --out tiny.json   # CPU

Self-contained: it imports the project, nothing else from bench/ but gpu_respawn's
nvidia-smi reader.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

LENGTHS_S = (2.0, 4.0, 6.0, 8.0)
SAMPLE_RATE = 24000


def _wait(predicate, timeout: float, what: str, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def _pct(values, q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def script_for(audio_s: float) -> str:
    """Text the estimator sizes at no less than `audio_s` (so the runaway cap, 2x the
    estimate, never cuts a row before its max_audio_s)."""
    from workers.wire.estimate import audio_seconds_for

    words = ["hello", "there", "friends", "welcome", "to", "the", "show", "today"]
    text = ""
    i = 0
    while audio_seconds_for(text, 1e9) < audio_s:
        text += words[i % len(words)] + " "
        i += 1
    return text.strip()


class FirstAudio:
    """Polls handles for their first audio sample (the handle keeps no event times)."""

    def __init__(self):
        self.handles: list = []
        self.first: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for h in list(self.handles):
                if h.id not in self.first and h.samples > 0:
                    self.first[h.id] = now
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def submit_burst(pool, lengths: list[float], seed0: int, watch: FirstAudio) -> list:
    from workers.wire.messages import Turn

    handles = []
    for i, length in enumerate(lengths):
        req = pool.make_request(
            [Turn(0, script_for(length))], seed=seed0 + i, max_audio_s=length, stream=True
        )
        handles.append(pool.submit(req))
        watch.handles.append(handles[-1])
    return handles


def outcomes(handles, timeout: float) -> list[dict]:
    from workers.wire import messages as m

    out = []
    for h in handles:
        try:
            h.result(timeout=max(1.0, timeout))
        except (m.PoolError, TimeoutError):
            pass
        o = h.outcome
        out.append(
            {
                "id": h.id,
                "ok": isinstance(o, m.Done),
                "error": None if isinstance(o, m.Done) or o is None else o.error.value,
                "audio_s": h.samples / SAMPLE_RATE,
                "latency_s": (h.finished_at - h.submitted_at) if h.finished_at else None,
                "worker": h.worker,
            }
        )
    return out


def memory_holders(pool) -> dict:
    """Who holds GPU memory (nvidia-smi), and the CUDA driver in the parent's and the
    zygote's address spaces."""
    from gpu_respawn import gpu_memory_holders

    from workers.zygote.probe import cuda_mappings

    holders = gpu_memory_holders()
    workers = {w["pid"] for w in pool.status()["workers"] if w["pid"]}
    zygote = pool.supervisor.zygote
    zpid = zygote.pid if getattr(zygote, "warm", False) else None
    res: dict = {
        "holders_mib": holders,
        "worker_pids": sorted(workers),
        "parent_pid": os.getpid(),
        "zygote_pid": zpid,
    }
    with open("/proc/self/maps") as f:
        res["parent_cuda_mappings"] = cuda_mappings(f.read())
    if zpid:
        with open(f"/proc/{zpid}/maps") as f:
            res["zygote_cuda_mappings"] = cuda_mappings(f.read())
    if holders is None:
        res["only_workers"] = "unknown: nvidia-smi missing or failed"
    elif not holders:
        res["only_workers"] = "unknown: nvidia-smi lists no process"
    else:
        wrong = [p for p in holders if p in (os.getpid(), zpid)]
        res["wrong_holders"] = wrong
        res["only_workers"] = not wrong and set(holders) <= workers
    return res


def kill_mid_batch(pool, watch: FirstAudio, timeout: float, kill_len: float) -> dict:
    """SIGKILL the worker of slot 0 once a burst has made its first audio; time it back."""
    slot = 0
    handles = submit_burst(pool, [kill_len] * 4, 500, watch)
    _wait(lambda: any(h.samples > 0 for h in handles), timeout, "the first audio")
    old = int(pool.status()["workers"][slot]["pid"])
    made = sum(h.samples for h in handles) / SAMPLE_RATE
    t_kill = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def back():
        w = pool.status()["workers"][slot]
        return w["state"] in ("ready", "busy") and w["pid"] not in (None, 0, old)

    _wait(back, timeout, "the worker back after SIGKILL", interval=0.002)
    ready = time.monotonic()
    events: dict[str, float] = {}
    for when, s, what in list(pool.supervisor.events):
        if s == slot and when >= t_kill and what not in events:
            events[what] = round(when - t_kill, 4)
    res = {
        "audio_s_before_kill": made,
        "kill_to_ready_s": ready - t_kill,
        "events_after_kill_s": events,
        "engine_load_s": pool.supervisor.slots[slot].boot_s,
        "requeued": pool.requeued(),
    }
    res["requests"] = outcomes(handles, timeout)
    res["all_done"] = all(r["ok"] for r in res["requests"])
    return res


def run_pool(args, model: str, workers: int, tmp: str, kill: bool) -> dict:
    import logging

    from vibevoice_pool.config import build
    from vibevoice_pool.pool.facade import Pool

    logging.getLogger("vibevoice_pool").setLevel(logging.WARNING)
    settings = {
        "engine": "vibevoice",
        "model_path": model,
        "gpus": f"cpu:{workers}" if args.tiny else "0",
        "workers_per_gpu": 1 if args.tiny else workers,
        "max_batch_size": args.rows,
        "mem_budget_mb": args.mem_budget_mb,
        "dtype": "auto" if args.tiny else "bfloat16",
        "attn_implementation": "sdpa",
        "inference_steps": 10,
        "head_compile": args.head_compile,
        "engine_mode": args.engine_mode,
        "cache_dir": tmp,
        "log_level": "WARNING",
        "max_queue": 1000,
    }
    t0 = time.monotonic()
    pool = Pool.start(build(settings), model_path=model)
    res: dict = {"workers": workers, "rows_per_worker": args.rows}
    watch = FirstAudio()
    try:
        _wait(lambda: pool.ready_workers() == workers, args.timeout, "every worker ready", 0.01)
        res["start_to_ready_s"] = time.monotonic() - t0
        res["engine_load_s"] = [s.boot_s for s in pool.supervisor.slots]
        z = pool.supervisor.zygote
        res["zygote_warm_s"] = getattr(z, "warm_up_s", None)
        warm = submit_burst(pool, [1.0] * workers, 900, watch)
        outcomes(warm, args.timeout)
        cycle = [float(x) for x in args.lengths.split(",")]
        lengths = [cycle[i % len(cycle)] for i in range(args.requests)]
        t_burst = time.monotonic()
        handles = submit_burst(pool, lengths, 1, watch)
        _wait(lambda: any(h.samples > 0 for h in handles), args.timeout, "the first audio")
        res["memory"] = memory_holders(pool)
        reqs = outcomes(handles, args.timeout)
        end = max((h.finished_at or time.monotonic()) for h in handles)
        lat = [r["latency_s"] for r in reqs if r["ok"]]
        first = [watch.first[h.id] - h.submitted_at for h in handles if h.id in watch.first]
        audio = sum(r["audio_s"] for r in reqs)
        res["burst"] = {
            "requests": len(reqs),
            "ok": sum(r["ok"] for r in reqs),
            "lengths_s": lengths,
            "audio_s": audio,
            "wall_s": end - t_burst,
            "audio_s_per_s": audio / (end - t_burst),
            "latency_p50_s": _pct(lat, 50),
            "latency_p99_s": _pct(lat, 99),
            "first_audio_p50_s": _pct(first, 50),
            "first_audio_p99_s": _pct(first, 99),
            "per_worker": {
                str(w): sum(1 for r in reqs if r["worker"] == w) for w in range(workers)
            },
            "requests_detail": reqs,
        }
        if kill:
            res["kill"] = kill_mid_batch(pool, watch, args.timeout, max(cycle))
    finally:
        watch.stop()
        pool.shutdown(grace_s=0)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a VibeVoice folder in the HF layout")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU workers")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare, in turn")
    ap.add_argument("--rows", type=int, default=16, help="rows per worker (max_batch_size)")
    ap.add_argument("--mem-budget-mb", type=float, default=0.0, help="each worker's KV budget")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument(
        "--lengths",
        default=",".join(f"{x:g}" for x in LENGTHS_S),
        help="audio seconds of the requests, in turn",
    )
    ap.add_argument("--head-compile", default="", help="the engine's head_compile setting")
    ap.add_argument(
        "--engine-mode", default="auto", help="the engine's engine_mode (auto: graphs on a GPU)"
    )
    ap.add_argument("--kill", action="store_true", help="SIGKILL test with the first count")
    ap.add_argument("--timeout", type=float, default=180.0, help="longest wait for any one step")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result: dict = {"runs": [], "settings": vars(args).copy()}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="vvp-gpu-pool-") as tmp:
        model = args.model
        if args.tiny and not model:
            from workers.checkpoints.tiny import ensure_tiny_model

            model = ensure_tiny_model(os.path.join(tmp, "tiny"))
        if not model:
            ap.error("give --model DIR (or --tiny)")
        for k, w in enumerate(int(x) for x in args.workers.split(",")):
            try:
                run = run_pool(args, model, w, tmp, kill=args.kill and k == 0)
            except Exception as e:  # record it, go on with the next count
                run = {"workers": w, "error": f"{type(e).__name__}: {e}"}
            result["runs"].append(run)
            save()
            b = run.get("burst", {})
            print(
                f"{w} worker(s) x {args.rows} rows: "
                + (
                    f"{b.get('ok')}/{b.get('requests')} ok, {b.get('audio_s_per_s', 0):.2f} "
                    f"audio s/s, p50 {b.get('latency_p50_s') or 0:.2f} s, p99 "
                    f"{b.get('latency_p99_s') or 0:.2f} s, first audio p50 "
                    f"{b.get('first_audio_p50_s') or 0:.3f} s; only workers hold GPU memory: "
                    f"{run.get('memory', {}).get('only_workers')}"
                    if b
                    else run.get("error", "?")
                ),
                flush=True,
            )
            if "kill" in run:
                kr = run["kill"]
                print(
                    f"  SIGKILL mid-batch: ready again in {kr['kill_to_ready_s']:.2f} s "
                    f"(engine load {kr['engine_load_s']:.2f} s), all requests done: "
                    f"{kr['all_done']}, events {kr['events_after_kill_s']}",
                    flush=True,
                )
    save()
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
