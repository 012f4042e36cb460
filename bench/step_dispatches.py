"""The host's work per decode step of the step engine: operators dispatched, on CPU.

On a GPU every operator the step dispatches is a kernel launch (unless it runs inside
a captured graph), so their count is the host's share of a step. This builds a model
with VibeVoice-1.5B's depths at tiny widths (28 LM layers, 4 diffusion head layers,
tokenizer stage depths 3-3-3-3-3-3-8; the 1.5B model's operator count at negligible
compute), runs the step engine (workers/engines/vibevoice/step.py) with 1, 4 and 16
rows admitted together, and counts with a TorchDispatchMode the aten operators of
each decode step after the first. Views are not counted: they launch nothing. Nor is
`_unsafe_view`, aten's view that autograd does not track as one (a reshape of a
matmul's output): it too only makes new tensor metadata. Its count is reported apart
(`metadata_ops_per_step`), so the figure with it is one addition away.
`_local_scalar_dense` (.item()) and `nonzero` are host syncs; `.tolist()` and `.cpu()`
on a CPU tensor dispatch nothing, so those are read from the code.

Each operator is also charged to a phase: the innermost of the methods in PHASES that
is running when it is dispatched (the LM forward, the KV cache's bookkeeping, the
diffusion head, the acoustic decode and semantic re-encode), else "other" (the token
choice, embeddings, the step's own bookkeeping).

    python -m bench.step_dispatches            # a minute or two on one CPU core
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

SYNC_OPS = {"_local_scalar_dense", "nonzero", "item"}
METADATA_OPS = {"_unsafe_view"}  # views in all but name: no kernel, no copy
HOST_PHASE = "noise (host)"

# (module, class, methods, phase): the methods whose operators count for the phase. A
# class or method missing from the code under test is skipped, so the same table
# measures the engine before and after a change.
PHASES = [
    ("workers.engines.vibevoice.step", "StepEngine", ("_forward",), "lm"),
    ("workers.engines.vibevoice.step", "StepEngine", ("_prefill",), "prefill"),
    ("workers.engines.vibevoice.audio", "Speech", ("diffuse",), "diffusion"),
    # each speaking row's starting noise, from its own CPU generator: on a GPU too these
    # run on the host's tensors (one copy to the device follows), no kernel launched
    ("workers.engines.vibevoice.audio", "Speech", ("_packed",), HOST_PHASE),
    ("workers.engines.vibevoice.audio", "Speech", ("decode", "zero"), "audio"),
    (
        "workers.engines.vibevoice.step",
        "StepEngine",
        ("_advance", "_decode_mask", "_reset_negative", "_drop_closed"),
        "cache",
    ),
    ("workers.engines.vibevoice.caches", "BranchKV", ("cache", "absorb", "add", "keep"), "cache"),
    ("transformers.cache_utils", "DynamicLayer", ("update",), "cache"),
    (
        "workers.engines.vibevoice.paged_kv",
        "PagedKV",
        ("begin", "advance", "release", "store_prompt"),
        "cache",
    ),
    ("workers.engines.vibevoice.paged_kv", "StepCache", ("update",), "cache"),
]


class _Phases:
    """Charges each dispatched operator to the innermost running method of PHASES."""

    def __init__(self):
        self.stack = ["other"]
        self.saved: list[tuple[type, str, object]] = []

    def __enter__(self):
        import importlib

        for module, cls_name, methods, phase in PHASES:
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except (ImportError, AttributeError):
                continue
            for name in methods:
                if name in vars(cls):
                    self.saved.append((cls, name, vars(cls)[name]))
                    setattr(cls, name, self._wrap(vars(cls)[name], phase))
        return self

    def __exit__(self, *exc):
        for cls, name, fn in reversed(self.saved):
            setattr(cls, name, fn)
        self.saved.clear()

    def _wrap(self, fn, phase):
        stack = self.stack

        def charged(*args, **kwargs):
            stack.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()

        return charged


def depths_config():
    """VibeVoice-1.5B's depths at tiny widths: the 1.5B's operator count, cheaply."""
    from bench.bench_gpu_1p5b import full_size_config

    cfg = full_size_config()
    text = cfg.text_config
    text.hidden_size, text.intermediate_size = 64, 128
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 4, 2, 16
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    head = cfg.diffusion_head_config
    head.hidden_size, head.intermediate_size = 64, 128
    for tower in (cfg.audio_config, cfg.semantic_model_config):
        tower.num_filters = 4
    return cfg


def build(torch):
    from transformers import VibeVoiceForConditionalGeneration

    from workers.checkpoints.tiny import configure_generation

    torch.manual_seed(0)
    model = VibeVoiceForConditionalGeneration._from_config(
        depths_config(), dtype=torch.float32, attn_implementation={"text_config": "sdpa"}
    ).eval()
    configure_generation(model.generation_config, model.config.audio_token_id, bias=True)
    model.generation_config.eos_token_id = model.config.eos_token_id
    return model


def checking(engine) -> bool:
    """Whether the engine's next step would still run something twice (decode_lm's
    checked steps; each graph's first replays, compared with eager)."""
    lm = engine.decode_lm is not None and engine.decode_lm.checks_left > 0
    graphs = any(engine.speech.checks_left.values())
    lmg = getattr(engine, "lm_graphs", None)
    lm_graphs = lmg is not None and (not lmg.graphs or any(lmg.checks_left.values()))
    return lm or graphs or lm_graphs


def count_steps(model, rows: int, measured: int, torch, engine_mode: str = "") -> dict:
    """`engine_mode` graphs or graphs-lm: the bucketed static-buffer paths (on CPU a
    plain call per bucket: the operators a captured graph holds). `launches_per_step`
    counts what a GPU would launch: each graph replay one, the operators in it none,
    nor those of the host phase (the rows' noise, drawn on the host on a GPU too). The
    steps that still check a graph against eager run before the count. The conv
    stacks run the operators a GPU runs, not the CPU's own (conv_stacks.CPU_KERNELS)."""
    from workers.engines.vibevoice import conv_stacks

    cpu_kernels, conv_stacks.CPU_KERNELS = conv_stacks.CPU_KERNELS, False
    try:
        return _count_steps(model, rows, measured, torch, engine_mode)
    finally:
        conv_stacks.CPU_KERNELS = cpu_kernels


def _count_steps(model, rows: int, measured: int, torch, engine_mode: str) -> dict:
    from torch.utils._python_dispatch import TorchDispatchMode

    from bench.bench_gpu_1p5b import SyntheticPrompts, _Sink
    from workers.engines.vibevoice.graphs import Graph
    from workers.engines.vibevoice.step import StepEngine
    from workers.wire.messages import Request, Turn

    phases = _Phases()

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()
            self.by_phase: collections.Counter = collections.Counter()
            self.metadata = 0
            self.launches = 0
            self.in_graph = 0  # inside a graph's run: its operators are one replay

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.is_view:
                pass
            elif func.__name__.split(".")[0] in METADATA_OPS:
                self.metadata += 1
            else:
                self.ops[func.__name__.split(".")[0]] += 1
                self.by_phase[phases.stack[-1]] += 1
                self.launches += not self.in_graph and phases.stack[-1] != HOST_PHASE
            return func(*args, **(kwargs or {}))

    prompts = SyntheticPrompts(model, prompt_tokens=64, voice_s=0.8)
    engine = StepEngine(
        model, "cpu", rows, prompts, **({"engine_mode": engine_mode} if engine_mode else {})
    )
    tokens = measured + 12
    for i in range(rows):
        req = Request(id=f"r{i}", turns=(Turn(0, "x"),), seed=i, stream=True)
        engine.admit(engine.prepare(req, tokens, tokens + 8, "estimate"))
    sink = _Sink()
    engine.step(sink)  # prefill and the first decode step
    engine.step(sink)  # warm
    for _ in range(8):
        if not checking(engine):
            break
        engine.step(sink)
    counter = Counter()
    real_run = Graph.run

    def replay(self):
        counter.launches += 1
        counter.in_graph += 1
        try:
            return real_run(self)
        finally:
            counter.in_graph -= 1

    Graph.run = replay
    try:
        with phases, counter:
            for _ in range(measured):
                engine.step(sink)
    finally:
        Graph.run = real_run
    total = sum(counter.ops.values())
    syncs = sum(n for op, n in counter.ops.items() if op in SYNC_OPS)
    return {
        "rows": rows,
        "engine_mode": engine_mode or "eager",
        "dispatches_per_step": total / measured,
        "launches_per_step": counter.launches / measured,
        "syncs_per_step_seen": syncs / measured,
        "metadata_ops_per_step": counter.metadata / measured,
        "phases": {k: n / measured for k, n in counter.by_phase.most_common()},
        "top": counter.ops.most_common(8),
    }


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--steps", type=int, default=3, help="decode steps counted per row count")
    p.add_argument("--engine-mode", default="", help="eager or graphs (default: the engine's)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build(torch)
    rows = [int(r) for r in args.rows.split(",")]
    results = [count_steps(model, r, args.steps, torch, args.engine_mode) for r in rows]
    print("| rows | dispatches per decode step | host syncs seen | _unsafe_view (not counted) |")
    print("|---|---|---|---|")
    for r in results:
        cells = (r["dispatches_per_step"], r["syncs_per_step_seen"], r["metadata_ops_per_step"])
        print(f"| {r['rows']} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    names = list(dict.fromkeys(k for r in results for k in r["phases"]))
    print("\n| phase | " + " | ".join(f"{r['rows']} rows" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        cells = " | ".join(f"{r['phases'].get(name, 0):.0f}" for r in results)
        print(f"| {name} | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
