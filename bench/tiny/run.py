"""VibeVoiceEngine on CPU with the tiny random model, one torch thread.

Measures (each the median of --runs):
- spawn to ready: a fresh Python process that imports torch and transformers and loads
  the tiny model through VibeVoiceEngine.load(), timed from the parent's spawn to the
  child's "ready" line (with the child's own import/load breakdown);
- the step engine on mixed lengths (lognormal, CV about 1, 1-30 s), all at once and with
  Poisson arrivals at --load of batch-1 capacity, in one run: continuous batching at 4
  and 8 rows, the old static batches (rows join only an empty engine) and batch 1.
  Audio seconds per wall second, p50/p99 latency, time to first audio, and how many
  decode steps a request that arrives during others waits for its first audio.
Prints Markdown tables; --out writes JSON.

    python -m bench.tiny.run --out tiny_cpu.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.tiny.record import render

ROOT = common.ROOT

CHILD = """
import json, sys, time
t_spawn = float(sys.argv[2])
t0 = time.time()
import torch
t1 = time.time()
import transformers
t2 = time.time()
from transformers import VibeVoiceForConditionalGeneration, VibeVoiceProcessor
t25 = time.time()
from workers.engines.contract import EngineSpec
from workers.engines.vibevoice.engine import VibeVoiceEngine
spec = EngineSpec(engine="vibevoice", model_path=sys.argv[1], torch_threads=1)
VibeVoiceEngine(spec).load()
t3 = time.time()
print(json.dumps({"ready": True, "interpreter_s": t0 - t_spawn, "torch_s": t1 - t0,
                  "transformers_s": t2 - t1, "model_classes_s": t25 - t2,
                  "load_s": t3 - t25}), flush=True)
"""


def spawn_to_ready(model_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, model_dir, repr(time.time())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    line = proc.stdout.readline()
    ready_s = time.perf_counter() - t0
    proc.wait(timeout=60)
    report = json.loads(line)
    return {"ready_s": ready_s, **{k: v for k, v in report.items() if k != "ready"}}


MODES = (  # name, live row limit, rows join only an empty engine (the old static batches)
    ("batch 1", 1, False),
    ("static 4", 4, True),
    ("CB 4", 4, False),
    ("CB 8", 8, False),
)


def workload(n: int, seed: int, mean_s: float = 6.0, shape_cv: float = 1.2) -> list[float]:
    """Request lengths in audio seconds: the n quantiles of a lognormal (mean mean_s,
    CV shape_cv), kept in 1-30 s (which brings the CV to about 1), in a seeded order.
    Quantiles rather than draws, so a small workload has the shape it claims."""
    import random

    sigma = math.sqrt(math.log(1 + shape_cv * shape_cv))
    mu = math.log(mean_s) - sigma * sigma / 2
    normal = statistics.NormalDist()
    out = [
        min(30.0, max(1.0, math.exp(mu + sigma * normal.inv_cdf((i + 0.5) / n)))) for i in range(n)
    ]
    random.Random(seed).shuffle(out)
    return out


class Clock:
    """The worker's time: this process's CPU time, plus the idle gaps skipped while it
    waits for the next arrival. The engine runs on one thread, so on a quiet machine
    this is the wall clock; on this shared one, time the other tenants take from the
    process does not count, and every mode is measured as if it ran alone."""

    def __init__(self):
        self.t0 = time.process_time()
        self.skipped = 0.0

    def now(self) -> float:
        return time.process_time() - self.t0 + self.skipped

    def wait_until(self, t: float) -> None:
        self.skipped += max(0.0, t - self.now())


class Times:
    """The step sink: when each request arrived, made its first audio, and ended."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.arrived: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.first_step: dict[str, int] = {}  # the index of the step that made it
        self.step_index = 0
        self.done: dict[str, float] = {}
        self.samples: dict[str, int] = {}
        self.failed: list[str] = []

    def started(self, rid, at, from_samples=0):
        pass

    def chunk(self, rid, pcm, history=None):
        self.first.setdefault(rid, self.clock.now())
        self.first_step.setdefault(rid, self.step_index)
        self.samples[rid] = self.samples.get(rid, 0) + len(pcm)

    def finish(self, rid, stop_reason="eos"):
        self.done[rid] = self.clock.now()

    def fail(self, rid, error):
        self.failed.append(f"{rid}: {error.message}")

    def step(self):
        self.step_index += 1


def drive(engine, rows: int, idle_only: bool, requests: list, offsets: list[float]) -> dict:
    """Run the requests through one StepHost as a worker does, each submitted at its
    offset (seconds from the start, on the Clock); they join at the next step boundary."""
    from workers.host.step_host import StepHost
    from workers.wire.messages import SAMPLE_RATE

    if rows > engine.max_rows:
        raise ValueError(f"{rows} rows: the engine was built for {engine.max_rows}")
    clock = Clock()
    sink = Times(clock)
    host = StepHost(engine, sink, clock=clock.now)
    host.max_rows = rows
    held: list = []  # static batches: arrivals wait here until the engine is empty
    t0 = 0.0
    i, n = 0, len(requests)
    step_walls: list[float] = []
    step_ends: list[float] = []
    joinable: set[str] = set()  # arrived while rows ran, with room beside them and no queue
    occupancy: list[int] = []
    while i < n or not host.idle or held:
        if host.idle and not held and offsets[i] > clock.now():
            clock.wait_until(offsets[i])
        now = clock.now()
        while i < n and offsets[i] <= now:
            req = requests[i]
            sink.arrived[req.id] = offsets[i]
            if host.live and host.live + len(host.pending) < rows and not idle_only:
                joinable.add(req.id)
            if idle_only:
                held.append(req)
            else:
                host.submit(req)
            i += 1
        if host.idle:  # static batches: rows join an empty engine only
            for _ in range(min(rows, len(held))):
                host.submit(held.pop(0))
        if not host.idle:
            s = clock.now()
            ran = host.run_step().rows
            if ran:
                occupancy.append(ran)
                step_ends.append(clock.now())
                step_walls.append(step_ends[-1] - s)
    if sink.failed:
        raise SystemExit(f"requests failed: {sink.failed}")
    ids = [r.id for r in requests]
    latency = [sink.done[r] - sink.arrived[r] for r in ids]
    ttfa = [sink.first[r] - sink.arrived[r] for r in ids]
    audio = sum(sink.samples.values()) / SAMPLE_RATE
    span = max(sink.done.values()) - t0
    step = statistics.median(step_walls)
    # decode steps from arrival to first audio: the step in progress when it arrived
    # (it joins at the boundary after it), through the step that made its first audio
    waits = [
        sink.first_step[r] - bisect.bisect_right(step_ends, sink.arrived[r]) + 1
        for r in ids
        if r in joinable
    ]
    return {
        "audio_s": round(audio, 2),
        "wall_s": round(span, 2),
        "audio_s_per_s": round(audio / span, 3),
        "latency_p50_s": round(_pct(latency, 50), 2),
        "latency_p99_s": round(_pct(latency, 99), 2),
        "ttfa_p50_s": round(_pct(ttfa, 50), 3),
        "ttfa_p99_s": round(_pct(ttfa, 99), 3),
        "step_ms_median": round(1000 * step, 1),
        "rows_mean": round(statistics.mean(occupancy), 2),
        "step_ms_by_rows": {
            str(k): round(
                1000
                * statistics.median(
                    w for w, o in zip(step_walls, occupancy, strict=True) if o == k
                ),
                1,
            )
            for k in sorted(set(occupancy))
        },
        "joined_busy": len(waits),
        "join_wait_steps_max": max(waits) if waits else None,
    }


def _pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    k = min(len(ys) - 1, max(0, math.ceil(q / 100 * len(ys)) - 1))
    return ys[k]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The step engine with the tiny model on CPU")
    p.add_argument("--runs", type=int, default=3, help="spawn-to-ready runs")
    p.add_argument("--requests", type=int, default=16, help="requests per scenario")
    p.add_argument("--steps", type=int, default=10, help="diffusion steps")
    p.add_argument("--load", type=float, default=0.8, help="Poisson load, of batch-1 capacity")
    p.add_argument("--seed", type=int, default=7, help="the workload's seed")
    p.add_argument("--cache-dir", default=None, help="where the tiny model is built")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from workers.checkpoints.tiny import ensure_tiny_model

    cache = args.cache_dir or str(Path(tempfile.gettempdir()) / "vv-bench")
    model_dir = ensure_tiny_model(cache)
    spawns = [spawn_to_ready(model_dir) for _ in range(args.runs)]

    import numpy as np
    import torch
    import transformers

    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice.engine import VibeVoiceEngine
    from workers.wire.messages import Request, Turn

    engine = VibeVoiceEngine(
        EngineSpec(engine="vibevoice", model_path=model_dir, max_batch_size=8, torch_threads=1)
    )
    engine.load()
    lengths = workload(args.requests, args.seed)
    texts = [
        "Hello everyone, and welcome to the show.",
        "Today we talk about the weather and the news.",
        "What do you think about this idea?",
        "I think we should try it again tomorrow.",
    ]

    def make(tag: str) -> list:
        return [
            Request(
                id=f"{tag}{i}",
                turns=(Turn(0, texts[i % 4]),),
                inference_steps=args.steps,
                seed=100 + i,
                est_audio_s=length,
                stream=True,
            )
            for i, length in enumerate(lengths)
        ]

    drive(engine, 4, False, make("warm")[:4], [0.0] * 4)  # warm-up
    burst = {
        name: drive(engine, rows, idle, make(name), [0.0] * len(lengths))
        for name, rows, idle in MODES
    }
    capacity = burst["batch 1"]["audio_s_per_s"]  # audio s per wall s at batch 1
    rate = args.load * capacity / statistics.mean(lengths)  # requests per second
    gaps = np.random.default_rng(args.seed + 1).exponential(1 / rate, len(lengths))
    offsets = [float(x) for x in np.cumsum(gaps) - gaps[0]]
    poisson = {name: drive(engine, rows, idle, make(name), offsets) for name, rows, idle in MODES}

    mid = sorted(spawns, key=lambda x: x["ready_s"])[len(spawns) // 2]
    result = {
        "model": "tiny random VibeVoice",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": 1,
        "requests": len(lengths),
        "lengths_s": {
            "mean": round(statistics.mean(lengths), 2),
            "cv": round(statistics.pstdev(lengths) / statistics.mean(lengths), 2),
            "min": round(min(lengths), 2),
            "max": round(max(lengths), 2),
        },
        "diffusion_steps": args.steps,
        "poisson_load": args.load,
        "poisson_rate_per_s": round(rate, 3),
        "spawn_to_ready_s": round(mid["ready_s"], 3),
        "spawn_breakdown_s": {  # of the median run: the parts of one spawn add up
            k: round(mid[k], 3)
            for k in ("interpreter_s", "torch_s", "transformers_s", "model_classes_s", "load_s")
        },
        "spawn_runs_s": [round(s["ready_s"], 3) for s in spawns],
        "burst": burst,
        "poisson": poisson,
        "cb4_over_batch1": round(burst["CB 4"]["audio_s_per_s"] / capacity, 2),
        "cb8_over_batch1": round(burst["CB 8"]["audio_s_per_s"] / capacity, 2),
        "static4_over_batch1": round(burst["static 4"]["audio_s_per_s"] / capacity, 2),
    }
    print(render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
