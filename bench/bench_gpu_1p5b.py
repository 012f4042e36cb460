"""The step engine on the full-size VibeVoice-1.5B architecture, one GPU, by live rows.

Builds VibeVoice-1.5B's architecture (the Qwen2.5-1.5B text model, the real acoustic and
semantic tokenizers and diffusion head), or with --model large VibeVoice-Large's (the
Qwen2.5-7B inside: 17.4 GiB), with random weights, bf16, SDPA, and runs the step
engine (workers/engines/vibevoice/step.py) with 1, 4, 8, 16 and 32 rows admitted together:
a fixed prompt per row (script tokens and one voice sample), 10 diffusion steps, cfg 1.3,
diffusion-only guidance as microsoft's loop. Lengths "fixed": every row the same number of
audio tokens; "mixed": 0.5, 0.83, 1.17 and 1.5 times it in turn, so rows leave one by one.
A sequence_bias on the audio token makes every new token an audio token (random weights
never pick it): the compute per token is the real model's. At each row count the engine
modes run in turn (--engine-modes): eager; graphs (the diffusion loop and the audio
decode/encode captured per row bucket); graphs-lm (the LM's decode step captured too: the
measurement that decides whether the LM is captured); on CPU the same bucket code runs as
plain calls. --compile-modes adds eager runs with the diffusion loop compiled
("reduce-overhead" = torch.compile's CUDA graphs), off by default. Reports audio s per
wall s per GPU (decode phase and whole run), ms per step, RTF per row, first audio
(admission to the first chunk), peak memory per row, and the operators one decode step
dispatches and the host syncs among them (a TorchDispatchMode); each captured run's audio
of its first row against the eager run's (audio_vs_eager: 0 where the replays compute
what eager computes; bf16 rounding that the autoregressive loop carries forward where a
mode sums in another order, as graphs-lm's wider tables do; near 1 for a wrong graph).
Each run's KV pool is grown to its rows' peak before the clock. Prints a Markdown table;
--out JSON, rewritten after every run (a run stopped at a time limit keeps what it
measured); --budget-s skips the runs that would start after that many seconds.

    python bench/bench_gpu_1p5b.py --out results.json          # one GPU, under 8 minutes
    python bench/bench_gpu_1p5b.py --tiny --out tiny.json      # the tiny model on CPU
    python bench/bench_gpu_1p5b.py --model large --out large.json   # VibeVoice-Large's shape

For comparison (their author's figures, one H100, VibeVoice-1.5B): vLLM-Omni's port
reports RTF 0.30 at batch 1 eager, 0.19 with CUDA graphs, and about 7 audio s per wall
s at 4 concurrent. Needs torch, transformers with VibeVoice (>= 5.17) and diffusers (the
default noise scheduler). No weights or tokenizer are downloaded: prompts are token ids.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE_RATE = 24000
HOP = 3200

from bench.full_size import NAMES, full_size_config  # noqa: E402 (after the path)


def build_model(args, torch):
    from transformers import VibeVoiceForConditionalGeneration

    from workers.checkpoints.tiny import configure_generation, ensure_tiny_model

    attn = {"text_config": "sdpa"}
    if args.tiny:
        path = ensure_tiny_model(args.cache_dir or Path(tempfile.gettempdir()) / "vv-bench")
        model = VibeVoiceForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn
        )
    else:
        with torch.device(args.device):
            model = VibeVoiceForConditionalGeneration._from_config(
                full_size_config(model=args.model), dtype=torch.bfloat16, attn_implementation=attn
            )
    model = model.to(args.device).eval()
    configure_generation(model.generation_config, model.config.audio_token_id, bias=True)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model


class SyntheticPrompts:
    """The step engine's prompt seam, without a tokenizer: what the processor makes for a
    script and one voice (text ids around a voice slot, then speech_start)."""

    def __init__(self, model, prompt_tokens: int, voice_s: float):
        cfg = model.config
        self.cfg = cfg
        self.voice_tokens = max(1, int(voice_s * SAMPLE_RATE) // HOP)
        self.n_text = max(4, prompt_tokens - self.voice_tokens - 3)
        self.top = min(cfg.text_config.vocab_size, cfg.eos_token_id, cfg.audio_bos_token_id)

    def length(self, req) -> int:
        return self.n_text + self.voice_tokens + 3

    def batch(self, requests, device, dtype):
        import torch

        from workers.engines.vibevoice.prompt import PromptBatch

        cfg, n = self.cfg, len(requests)
        g = torch.Generator().manual_seed(int(requests[0].seed))
        text = torch.randint(16, self.top, (n, self.n_text), generator=g)
        half = self.n_text // 2
        slot = [cfg.audio_bos_token_id] + [cfg.audio_token_id] * self.voice_tokens
        slot = torch.tensor(slot + [cfg.audio_eos_token_id]).expand(n, -1)
        start = torch.full((n, 1), cfg.audio_bos_token_id)
        ids = torch.cat([text[:, :half], slot, text[:, half:], start], dim=1)
        voice = 0.1 * torch.randn(n, 1, self.voice_tokens * HOP, generator=g)
        inputs = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "input_values": voice.to(device=device, dtype=dtype),
            "padding_mask": torch.ones(n, self.voice_tokens * HOP, dtype=torch.int32).to(device),
        }
        width = int(ids.shape[1])
        return PromptBatch(inputs, [width] * n, list(range(n)), [self.voice_tokens] * n)


class _Sink:
    def __init__(self):
        self.samples = 0
        self.failed: list[str] = []
        self.first_chunk_at: float | None = None

        self.first_row: list = []  # row r0's audio, to set the engine modes side by side

    def chunk(self, rid, pcm, history=None):
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        self.samples += len(pcm)
        if rid == "r0":
            import numpy as np

            self.first_row.append(np.array(pcm, dtype=np.float32))

    def finish(self, rid, stop_reason="eos"):
        pass

    def fail(self, rid, error):
        self.failed.append(f"{rid}: {error.message}")

    def step(self):
        pass


MIXED = (0.5, 5 / 6, 7 / 6, 1.5)  # row i makes MIXED[i % 4] x the tokens: the same mean

# Operators that only make a view: no kernel, no work (left out of the count).
VIEW_OPS = {
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "transpose", "t",
    "slice", "select", "expand", "expand_as", "unsqueeze", "squeeze", "permute",
    "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "narrow",
    "chunk", "unflatten", "flatten", "diagonal", "lift_fresh", "numpy_T",
}  # fmt: skip
SYNC_OPS = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}


def row_tokens(rows: int, tokens: int, lengths: str) -> list[int]:
    if lengths == "fixed":
        return [tokens] * rows
    return [max(2, round(tokens * MIXED[i % len(MIXED)])) for i in range(rows)]


def count_step(engine, sink, torch) -> dict:
    """One engine step under a TorchDispatchMode: the operators it dispatches (views
    left out; on a GPU each is a kernel launch), the host syncs among them (.item(),
    nonzero, copies from the device to pageable host memory) and the copies from the
    host to the device (from pageable memory, torch.tensor(list, device=...): each
    waits for the host). A non-blocking copy from or into pinned memory waits for
    nothing (the audio's way to the host, caches.to_device): counted apart, as async."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"ops": 0, "syncs": 0, "h2d": 0, "async_copies": 0, "sync_kinds": {}}

    def direction(func, args, kwargs, out) -> str:
        name = func.overloadpacket.__name__
        if name == "copy_" and len(args) > 1:
            dst, src = args[0], args[1]
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        elif name == "_to_copy" and args:
            dst, src = out, args[0]
            non_blocking = kwargs.get("non_blocking", False)
        else:
            return ""
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
            return ""
        if src.device.type != "cpu" and dst.device.type == "cpu":
            return "async" if non_blocking and dst.is_pinned() else "to_host"
        if src.device.type == "cpu" and dst.device.type != "cpu":
            return "async" if non_blocking and src.is_pinned() else "to_device"
        return ""

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in VIEW_OPS:
                counts["ops"] += 1
            way = direction(func, args, kwargs or {}, out)
            if name in SYNC_OPS or way == "to_host":
                counts["syncs"] += 1
                key = f"{name} (to host)" if way else name
                counts["sync_kinds"][key] = counts["sync_kinds"].get(key, 0) + 1
            elif way == "to_device":
                counts["h2d"] += 1
            elif way == "async":
                counts["async_copies"] += 1
            return out

    with Count():
        engine.step(sink)
    return counts


def reserve_kv(engine) -> None:
    """The engine's KV pool grown now to its rows' predicted peak (the blocks
    StepEngine.peak_bytes counts), so that no growth falls inside the timing: a growth
    drops graphs-lm's graphs, whose capture and checked replays would then be timed."""
    from workers.engines.vibevoice.paged_kv import blocks_for

    bt = engine.kv.block_tokens
    shapes = [engine._shape(r) for r in engine.open_rows()]
    engine.kv.reserve(sum(blocks_for(p + s + 2, bt) + blocks_for(s + 2, bt) for p, s in shapes))


def run_rows(
    model,
    prompts,
    rows: int,
    tokens: int,
    args,
    torch,
    compile_mode: str,
    lengths="fixed",
    count=False,
    engine_mode="eager",
) -> dict:
    """`rows` rows admitted together (`tokens` audio tokens each, or mixed around it), to
    the end. The steps checked against eager (the captured graphs' in graphs mode,
    audio.CHECKED_RUNS; the lean LM forward's, decode_lm.CHECKED_STEPS) are left out of
    the timings; with `count`, the step after them runs under the operator counter
    (count_step), also out of the timings."""
    from workers.engines.vibevoice.audio import CHECKED_RUNS
    from workers.engines.vibevoice.lm_graph import CHECKED_RUNS as LM_CHECKED_RUNS
    from workers.engines.vibevoice.step import StepEngine
    from workers.wire.messages import Request, Turn

    cuda = args.device.startswith("cuda")
    per_row = row_tokens(rows, tokens, lengths)
    engine = StepEngine(
        model, args.device, rows, prompts, head_compile=compile_mode, engine_mode=engine_mode
    )
    for i, n in enumerate(per_row):
        kw = {"inference_steps": args.steps, "cfg_scale": args.cfg, "stream": True}
        req = Request(id=f"r{i}", turns=(Turn(0, "x"),), seed=i, **kw)
        engine.admit(engine.prepare(req, n, n + 8, "estimate"))
    sink = _Sink()
    with torch.no_grad():  # graphs mode: every bucket captured before the clock starts
        captured = engine.speech.capture(args.steps, rows)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    reserve_kv(engine)  # the KV pool counts in the peak per row, as its growth did
    t0 = time.perf_counter()
    engine.step(sink)  # prefill and the first decode step
    if cuda:
        torch.cuda.synchronize()
    t1 = t_first = time.perf_counter()
    steps, counted = 1, None
    # the graphs' and the LM's checked steps (each also run eagerly): out of count and timing
    lm_checks = engine.decode_lm.checks_left if engine.decode_lm else 0
    if engine.lm_graphs is not None:  # then each LM graph's first replays, checked
        lm_checks += LM_CHECKED_RUNS
    checks = max(CHECKED_RUNS if engine_mode != "eager" else 0, lm_checks)
    for _ in range(checks if engine.live else 0):
        engine.step(sink)
        steps += 1
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    if count and engine.live:
        counted = count_step(engine, sink, torch)
        steps += 1
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()  # the counted step is slow: out of the timings
    first, early = steps, sink.samples
    while engine.live:
        engine.step(sink)
        steps += 1
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    if sink.failed or sink.samples != sum(per_row) * HOP:
        raise SystemExit(f"expected {per_row} audio tokens: {sink.failed or sink.samples}")
    audio_s = sum(per_row) * HOP / SAMPLE_RATE
    decode_s = (t2 - t1) / max(1, steps - first)
    out = {
        "rows": rows,
        "lengths": lengths,
        "engine_mode": engine_mode,
        "graphs_captured": captured,
        # what the run ended on: a graph that failed its check or its capture turns off
        "graphs_kept": engine.speech.mode == "graphs" if engine_mode != "eager" else None,
        "lm_graphs_kept": engine.lm_graphs is not None if engine_mode == "graphs-lm" else None,
        # LM graphs made over the run (remade after a pool growth included; the run's
        # own, checked and captured in the untimed steps, are one per bucket)
        "lm_graphs_made": engine.lm_graphs.made if engine.lm_graphs is not None else None,
        "compile": compile_mode or "off",
        "tokens": per_row if lengths != "fixed" else tokens,
        "steps": steps,
        "wall_s": round(t2 - t0, 4),
        "first_step_s": round(t_first - t0, 4),
        "first_audio_s": round(sink.first_chunk_at - t0, 4) if sink.first_chunk_at else None,
        "ms_per_step": round(1000 * decode_s, 2),
        "audio_s_per_s": round(audio_s / (t2 - t0), 3),  # all rows, whole run
        "rtf": round(decode_s / (HOP / SAMPLE_RATE), 4),  # wall s per audio s, each row
    }
    out["_first_row_pcm"] = sink.first_row  # taken out by main (audio_vs_eager)
    # The decode phase (after the first step): the audio it made over its time.
    out["decode_audio_s_per_s"] = round((sink.samples - early) / SAMPLE_RATE / (t2 - t1), 3)
    if counted is not None:
        out["ops_per_step"] = counted["ops"]
        out["host_syncs_per_step"] = counted["syncs"]
        out["h2d_copies_per_step"] = counted["h2d"]
        out["async_copies_per_step"] = counted["async_copies"]
        out["sync_kinds"] = counted["sync_kinds"]
    if cuda:
        out["peak_mem_per_row_mib"] = round(
            (torch.cuda.max_memory_allocated() - base) / rows / 2**20, 1
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model on CPU")
    p.add_argument("--model", choices=sorted(NAMES), default="1.5b", help="the shape built")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--rows", default="1,4,8,16,32")
    p.add_argument("--lengths", default="fixed,mixed", help="fixed, mixed or both")
    p.add_argument("--engine-modes", default="eager,graphs,graphs-lm", help="run in turn")
    p.add_argument("--compile-modes", default="", help='eager runs: e.g. ",reduce-overhead"')
    p.add_argument("--compiled-rows", default=None, help="row counts to compile (default all)")
    p.add_argument("--new-tokens", type=int, default=None, help="audio tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--voice-s", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=1.3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--cache-dir", default=None, help="where --tiny builds the tiny model")
    p.add_argument(
        "--budget-s", type=float, default=None, help="start no run after this (0: none; GPU: 420)"
    )
    p.add_argument("--lm-rows", default="1,16", help="the LM forward both ways (lm_host.py)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from bench.engine_runs import audio_difference, print_table, run_plan

    plan = run_plan(args)  # a bad --engine-modes stops here, before the model is built
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.new_tokens = args.new_tokens or (16 if args.tiny else 96)
    if args.budget_s is None:
        args.budget_s = 0 if args.tiny else 420  # the whole run under 8 minutes

    import torch
    import transformers

    t_start = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU check")
    model = build_model(args, torch)
    build_s = time.perf_counter() - t_start
    prompts = SyntheticPrompts(model, args.prompt_tokens, args.voice_s)
    params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    rows: list[dict] = []
    result = {
        "model": "tiny random VibeVoice"
        if args.tiny
        else f"{NAMES[args.model]} architecture, random",
        "engine": "step engine (continuous batching), rows admitted together",
        "params": params,
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "build_s": round(build_s, 2),
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "voice_s": args.voice_s,
        "diffusion_steps": args.steps,
        "cfg_scale": args.cfg,
        "threads": args.threads if args.device == "cpu" else None,
        "rows": rows,
        "skipped": [],
        "vllm_omni_h100": {"rtf_b1_eager": 0.30, "rtf_b1_graphs": 0.19, "audio_s_per_s_c4": 7.0},
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    save()
    from bench.lm_host import lm_host_ms

    result["lm_host"] = []  # the LM decode forward, transformers' against decode_lm's
    for r in [int(x) for x in args.lm_rows.split(",") if x]:
        result["lm_host"].append(lm_host_ms(model, r, 12, torch, args.device, prompts))
        save()
    eager_pcm: dict = {}
    for engine_mode, mode, lengths, r in plan:
        label = f"{engine_mode}/{mode or 'off'}/{lengths}/{r}"
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            result["skipped"].append(label)
            continue
        with torch.no_grad():
            # warm-up (captures, compiles); uncompiled: one step is counted
            run = functools.partial(run_rows, model, prompts, r, engine_mode=engine_mode)
            warm = run(6, args, torch, mode, count=not mode)
            res = run(args.new_tokens, args, torch, mode, lengths)
        counted = ("ops_per_step", "host_syncs_per_step", "h2d_copies_per_step", "sync_kinds")
        for key in (*counted, "async_copies_per_step"):
            if key in warm:
                res[key] = warm[key]
        res["first_audio_s_warmup_run"] = warm["first_audio_s"]
        warm.pop("_first_row_pcm")
        pcm = res.pop("_first_row_pcm")
        if engine_mode == "eager" and not mode:
            eager_pcm[(lengths, r)] = pcm
        elif (lengths, r) in eager_pcm:  # the same row's audio, captured against eager
            res["audio_vs_eager"] = audio_difference(pcm, eager_pcm[(lengths, r)])
        rows.append(res)
        save()
        print(json.dumps(res), file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print_table(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
