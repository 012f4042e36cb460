"""The host time of the LM's decode forward, side by side: transformers' forward
against decode_lm's (workers/engines/vibevoice/decode_lm.py), on VibeVoice-1.5B's
depths at tiny widths, where a forward's compute is negligible and its time is the
host's: what a GPU step waits on before its kernels run.

Each decode step of the step engine runs its LM forward both ways on the same seqs and
inputs (the same KV column written twice, the same values: tests/test_decode_lm.py),
the order alternating from step to step, so drift on a shared machine hits both alike.
Reported: the median milliseconds of each per step, and their ratio.

    python -m bench.lm_host              # under a minute on one CPU core
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def lm_host_ms(model, rows: int, steps: int, torch, device: str = "cpu", prompts=None) -> dict:
    """On CUDA each forward is timed between two synchronizes: its whole time, which a
    launch-bound forward spends on the host."""
    from bench.bench_gpu_1p5b import SyntheticPrompts, _Sink
    from workers.engines.vibevoice.step import StepEngine
    from workers.wire.messages import Request, Turn

    prompts = prompts or SyntheticPrompts(model, prompt_tokens=64, voice_s=0.8)
    engine = StepEngine(model, device, rows, prompts)
    cuda = str(device).startswith("cuda")
    if engine.decode_lm is None:
        raise SystemExit("this LM has no lean decode (decode_lm.DecodeLM.build gave None)")
    tokens = steps + 4
    for i in range(rows):
        req = Request(id=f"r{i}", turns=(Turn(0, "x"),), seed=i, stream=True)
        engine.admit(engine.prepare(req, tokens, tokens + 8, "estimate"))
    sink = _Sink()
    engine.step(sink)  # prefill and the first decode step
    engine.step(sink)  # warm
    real = type(engine)._forward
    lean = engine.decode_lm
    times: dict[str, list[float]] = {"transformers": [], "decode_lm": []}

    def timed(name: str, seqs, embeds):
        engine.decode_lm = lean if name == "decode_lm" else None
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = real(engine, seqs, embeds)
        if cuda:
            torch.cuda.synchronize()
        times[name].append((time.perf_counter() - t) * 1e3)
        return out

    def both(seqs, embeds):
        order = ["decode_lm", "transformers"]
        if len(times["decode_lm"]) % 2:
            order.reverse()
        outs = {name: timed(name, seqs, embeds) for name in order}
        engine.decode_lm = lean
        return outs["decode_lm"]

    engine._forward = both
    try:
        with torch.no_grad():
            for _ in range(steps):
                engine.step(sink)
    finally:
        del engine._forward
        for row in list(engine.rows):
            engine.cancel(row.id)
    hf = statistics.median(times["transformers"])
    ours = statistics.median(times["decode_lm"])
    return {
        "rows": rows,
        "steps": steps,
        "transformers_ms": round(hf, 2),
        "decode_lm_ms": round(ours, 2),
        "ratio": round(hf / ours, 2),
    }


def table(results: list[dict]) -> list[str]:
    out = [
        "| rows | transformers' forward (ms) | decode_lm (ms) | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for r in results:
        out.append(
            f"| {r['rows']} | {r['transformers_ms']} | {r['decode_lm_ms']} | {r['ratio']}x |"
        )
    return out


def main() -> int:
    import torch

    from bench.step_dispatches import build

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--steps", type=int, default=20, help="decode steps per row count")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build(torch)
    results = [lm_host_ms(model, int(r), args.steps, torch) for r in args.rows.split(",")]
    print("\n".join(table(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
