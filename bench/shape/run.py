"""The step engine's shape on CPU (issue 22), in one run, one torch thread:

- the host's work per decode step: aten operators dispatched and host syncs seen, at
  1, 4 and 16 rows, eager, on VibeVoice-1.5B's depths at tiny widths
  (bench/step_dispatches.py counts them); the launches a GPU would make per step in
  each engine_mode (eager, graphs, graphs-lm: a graph's replay one launch, the
  operators in it none); and the LM forward's host time there,
  transformers' forward against decode_lm's on the same steps (bench/lm_host.py);
- the tiny model's audio seconds per second on a mixed-length burst (every request
  at once, bench/tiny/run.py's workload and StepHost driver): the step engine with
  continuous batching at 1, 4, 8 and 16 rows, and transformers' `generate` at batch
  1 (adjusted to microsoft's loop as the tests' reference is) on the same requests,
  one after another, as the reference; and CB 1 and CB 4 again with the conv stacks
  on the conv kernels a GPU runs (conv_stacks.CPU_KERNELS off), so what the CPU's
  own operators buy is read within the same repeats.

Each burst is run --repeats times, the modes in turn within each repeat, so drift
on the shared machine hits every mode alike; the record gives medians, and ratios
taken within each repeat (their median). Times are the process's CPU time (one
thread), as in bench/tiny.

    python -m bench.shape.run --out shape.json     # about 3-5 minutes on one core
    python -m bench.shape.record shape.json        # rewrite its part of docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.shape.record import render

TEXTS = (
    "Hello everyone, and welcome to the show.",
    "Today we talk about the weather and the news.",
    "What do you think about this idea?",
    "I think we should try it again tomorrow.",
)


GRAPH_MODES = ("graphs", "graphs-lm")


def host_shape(rows: list[int], steps: int, lm_steps: int) -> tuple[list, list, list]:
    """Dispatches per step, eager (bench/step_dispatches.py); the launches a GPU would
    make per step in each engine mode (a graph's replay one launch); and the LM
    forward's host time, transformers' against decode_lm (bench/lm_host.py), at each
    row count."""
    import torch

    from bench.lm_host import lm_host_ms
    from bench.step_dispatches import build, count_steps

    model = build(torch)
    counts = [count_steps(model, r, steps, torch, "eager") for r in rows]
    launches = [
        {"rows": c["rows"], "engine_mode": "eager", "launches_per_step": c["launches_per_step"]}
        for c in counts
    ]
    for mode in GRAPH_MODES:
        for r in rows:
            c = count_steps(model, r, steps, torch, mode)
            launches.append({k: c[k] for k in ("rows", "engine_mode", "launches_per_step")})
    return counts, launches, [lm_host_ms(model, r, lm_steps, torch) for r in rows]


def arrival_order_rows(lengths: list[float], limit: int) -> float:
    """The mean rows in flight that serving `lengths` in arrival order permits with
    `limit` places: a row takes the first place that frees and holds it for its length
    (decode steps are proportional to audio seconds). Total length over the makespan."""
    import heapq

    free = [0.0] * limit
    end = 0.0
    for length in lengths:
        start = heapq.heappop(free)
        heapq.heappush(free, start + length)
        end = max(end, start + length)
    return sum(lengths) / end


def requests(lengths: list[float], tag: str, diffusion_steps: int) -> list:
    from workers.wire.messages import Request, Turn

    return [
        Request(
            id=f"{tag}{i}",
            turns=(Turn(0, TEXTS[i % len(TEXTS)]),),
            inference_steps=diffusion_steps,
            seed=100 + i,
            est_audio_s=length,
            stream=True,
        )
        for i, length in enumerate(lengths)
    ]


class Generate:
    """transformers' `generate` at batch 1 on the tiny model: the reference loop, with
    the text-level CFG pass microsoft's loop does not run taken out (the tests'
    reference, tests/vibevoice_reference.py). The tiny model always speaks, so a row
    makes exactly the audio tokens it is given, as the engine's scripted end does."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import VibeVoiceForConditionalGeneration, VibeVoiceProcessor

        from tests.vibevoice_reference import drop_text_cfg

        self.processor = VibeVoiceProcessor.from_pretrained(model_dir)
        self.model = VibeVoiceForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation={"text_config": "sdpa"}
        ).eval()
        drop_text_cfg(self.model)

    def burst(self, reqs: list) -> dict:
        """Every request at once, served one after another: audio s per CPU s."""
        import torch

        from workers.engines.vibevoice.engine import audio_tokens_for
        from workers.engines.vibevoice.prompt import build_inputs
        from workers.wire.messages import SAMPLE_RATE

        samples, t0 = 0, time.process_time()
        for r in reqs:
            prompt = build_inputs(self.processor, [r], dtype=self.model.dtype)
            torch.manual_seed(r.seed)
            with torch.no_grad():
                out = self.model.generate(
                    **prompt.inputs,
                    max_new_tokens=audio_tokens_for(r.est_audio_s),
                    num_diffusion_steps=r.inference_steps,
                    guidance_scale=r.cfg_scale,
                )
            samples += out[0].numel()
        span = time.process_time() - t0
        audio = samples / SAMPLE_RATE
        return {"audio_s": round(audio, 2), "wall_s": round(span, 2), "audio_s_per_s": audio / span}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dispatch-rows", default="1,4,16")
    p.add_argument("--dispatch-steps", type=int, default=3, help="decode steps counted")
    p.add_argument("--lm-steps", type=int, default=20, help="decode steps the LM is timed on")
    p.add_argument("--rows", default="1,4,8,16", help="continuous batching row limits")
    p.add_argument("--requests", type=int, default=16, help="requests in the burst")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="diffusion steps")
    p.add_argument("--seed", type=int, default=7, help="the workload's seed")
    p.add_argument("--quick", action="store_true", help="8 requests, 2 repeats")
    p.add_argument("--cache-dir", default=None, help="where the tiny model is built")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.repeats = 8, 2

    import torch
    import transformers

    torch.set_num_threads(1)
    t_start, cpu_start = time.monotonic(), time.process_time()
    dispatch_rows = [int(r) for r in args.dispatch_rows.split(",")]
    counts, launches, lm_host = host_shape(dispatch_rows, args.dispatch_steps, args.lm_steps)

    from bench.tiny.run import drive, workload
    from workers.checkpoints.tiny import ensure_tiny_model
    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice import conv_stacks
    from workers.engines.vibevoice.engine import VibeVoiceEngine

    cache = args.cache_dir or str(Path(tempfile.gettempdir()) / "vv-bench")
    model_dir = ensure_tiny_model(cache)
    cb_rows = [int(r) for r in args.rows.split(",")]
    engine = VibeVoiceEngine(
        EngineSpec(
            engine="vibevoice", model_path=model_dir, max_batch_size=max(cb_rows), torch_threads=1
        )
    )
    engine.load()
    reference = Generate(model_dir)
    lengths = workload(args.requests, args.seed)
    modes = ["generate 1"] + [f"CB {r}" for r in cb_rows]

    def once(mode: str, reqs: list, cpu_kernels: bool = True) -> dict:
        if mode == "generate 1":
            return reference.burst(reqs)
        conv_stacks.CPU_KERNELS = cpu_kernels
        try:
            return drive(engine, int(mode.split()[1]), False, reqs, [0.0] * len(reqs))
        finally:
            conv_stacks.CPU_KERNELS = True

    # the conv stacks' CPU operators against the conv kernels a GPU runs, same repeats
    both = [m for m in ("CB 1", "CB 4") if m in modes]
    warm = requests(lengths[:2], "warm", args.steps)
    for mode in modes:  # first calls (allocations, lazy imports) out of the figures
        once(mode, [r for r in warm])
    for mode in both:
        once(mode, [r for r in warm], cpu_kernels=False)
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    gpu_kernels: dict[str, list[dict]] = {mode: [] for mode in both}
    for k in range(args.repeats):
        for mode in modes:
            tag = f"{mode.replace(' ', '')}-{k}-"
            runs[mode].append(once(mode, requests(lengths, tag, args.steps)))
        for mode in both:
            tag = f"{mode.replace(' ', '')}-conv-{k}-"
            reqs = requests(lengths, tag, args.steps)
            gpu_kernels[mode].append(once(mode, reqs, cpu_kernels=False))

    def rates(mode: str) -> list[float]:
        return [r["audio_s_per_s"] for r in runs[mode]]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates(a), rates(b), strict=True))

    result = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": 1,
        "dispatch_steps": args.dispatch_steps,
        "dispatches": counts,
        "launches": launches,
        "lm_host": lm_host,
        "requests": len(lengths),
        "lengths_s": {
            "mean": round(statistics.mean(lengths), 2),
            "cv": round(statistics.pstdev(lengths) / statistics.mean(lengths), 2),
            "min": round(min(lengths), 2),
            "max": round(max(lengths), 2),
        },
        "diffusion_steps": args.steps,
        "repeats": args.repeats,
        "modes": modes,
        "audio_s_per_s": {m: [round(x, 3) for x in rates(m)] for m in modes},
        "median_audio_s_per_s": {m: round(statistics.median(rates(m)), 3) for m in modes},
        "step_ms_median": {
            m: round(statistics.median(r["step_ms_median"] for r in runs[m]), 1)
            for m in modes
            if m != "generate 1"
        },
        "rows_mean": {
            m: round(statistics.median(r["rows_mean"] for r in runs[m]), 2)
            for m in modes
            if m != "generate 1"
        },
        "arrival_order_rows": {
            f"CB {r}": round(arrival_order_rows(lengths, r), 2) for r in cb_rows
        },
        "step_ms_by_rows": {
            m: {
                k: round(statistics.median(r["step_ms_by_rows"][k] for r in runs[m]), 1)
                for k in runs[m][0]["step_ms_by_rows"]
                if all(k in r["step_ms_by_rows"] for r in runs[m])
            }
            for m in modes
            if m != "generate 1"
        },
        "longest_position": max(range(len(lengths)), key=lambda i: lengths[i]) + 1,
        "conv_kernels_audio_s_per_s": {
            m: [round(r["audio_s_per_s"], 3) for r in gpu_kernels[m]] for m in both
        },
        "ratios": {
            **{f"CB {r} / generate 1": round(ratio(f"CB {r}", "generate 1"), 2) for r in cb_rows},
            **{f"CB {r} / CB 1": round(ratio(f"CB {r}", "CB 1"), 2) for r in cb_rows if r != 1},
        },
        "seconds": round(time.monotonic() - t_start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }
    print(render(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
