"""The step engine on the full-size VibeVoice-1.5B architecture, one GPU, by live rows.

Builds VibeVoice-1.5B's architecture (Qwen2.5-1.5B text model, the real acoustic and
semantic tokenizers and diffusion head) with random weights, in bf16 with SDPA, and runs
the step engine (workers/engines/vibevoice/step.py) with 1, 4, 8 and 16 rows admitted together: a
fixed prompt per row (script tokens and one voice sample), a fixed number of audio
tokens, 10 diffusion steps, cfg 1.3, diffusion-only guidance as microsoft's loop.
Random weights never pick the audio token, so a sequence_bias on it makes every new
token an audio token: the compute per token is the real model's. Each row count runs
with the diffusion head eager, then compiled (--compile-modes, "reduce-overhead" = CUDA
graphs per row count). Reports audio s per wall s per GPU (decode phase and whole run),
ms per step, RTF per row and peak memory per row. Prints a Markdown table; --out JSON.

    python bench/bench_gpu_1p5b.py --out results.json          # one GPU, a few minutes
    python bench/bench_gpu_1p5b.py --tiny --out tiny.json      # the tiny model on CPU

For comparison (their author's figures, one H100, VibeVoice-1.5B): vLLM-Omni's port
reports RTF 0.30 at batch 1 eager, 0.19 with CUDA graphs, and about 7 audio s per wall
s at 4 concurrent. Needs torch, transformers with VibeVoice (>= 5.17) and diffusers (the
default noise scheduler). No weights or tokenizer are downloaded: prompts are token ids.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE_RATE = 24000
HOP = 3200

QWEN25_1P5B = {  # the text model of VibeVoice-1.5B (Qwen2.5-1.5B)
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}


def full_size_config():
    from transformers import VibeVoiceConfig

    tower = {
        "num_filters": 32,
        "kernel_size": 7,
        "downsampling_ratios": [2, 2, 4, 5, 5, 8],
        "depths": [3, 3, 3, 3, 3, 3, 8],
        "rms_norm_eps": 1e-5,
        "layer_scale_init_value": 1e-6,
        "vae_std": 0.625,
    }
    return VibeVoiceConfig(
        text_config=QWEN25_1P5B,
        audio_config={"model_type": "vibevoice_acoustic_tokenizer", "hidden_size": 64, **tower},
        semantic_model_config={
            "model_type": "vibevoice_acoustic_tokenizer_encoder",
            "hidden_size": 128,
            **tower,
        },
        diffusion_head_config={
            "num_hidden_layers": 4,
            "intermediate_size": 4608,  # head_ffn_ratio 3.0 x 1536
            "frequency_embedding_size": 256,
            "rms_norm_eps": 1e-5,
        },
        pad_token_id=151643,
        eos_token_id=151643,
        audio_bos_token_id=151652,
        audio_eos_token_id=151653,
        audio_token_id=151654,
    )


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
                full_size_config(), dtype=torch.bfloat16, attn_implementation=attn
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

    def chunk(self, rid, pcm):
        self.samples += len(pcm)

    def finish(self, rid, stop_reason="eos"):
        pass

    def fail(self, rid, error):
        self.failed.append(f"{rid}: {error.message}")

    def step(self):
        pass


def run_rows(model, prompts, rows: int, tokens: int, args, torch, compile_mode: str) -> dict:
    """`rows` rows admitted together, each `tokens` audio tokens, to the end."""
    from workers.engines.vibevoice.step import StepEngine
    from workers.wire.messages import Request, Turn

    cuda = args.device.startswith("cuda")
    engine = StepEngine(model, args.device, rows, prompts, head_compile=compile_mode)
    for i in range(rows):
        req = Request(
            id=f"r{i}",
            turns=(Turn(0, "x"),),
            seed=i,
            inference_steps=args.steps,
            cfg_scale=args.cfg,
            stream=True,
        )
        engine.admit(engine.prepare(req, tokens, tokens + 8, "estimate"))
    sink = _Sink()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine.step(sink)  # prefill and the first decode step
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    steps = 1
    while engine.live:
        engine.step(sink)
        steps += 1
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    if sink.failed or sink.samples != rows * tokens * HOP:
        raise SystemExit(f"expected {rows} x {tokens} audio tokens: {sink.failed or sink.samples}")
    audio_s = rows * tokens * HOP / SAMPLE_RATE
    decode_s = (t2 - t1) / max(1, steps - 1)
    out = {
        "rows": rows,
        "compile": compile_mode or "off",
        "wall_s": round(t2 - t0, 4),
        "first_step_s": round(t1 - t0, 4),
        "ms_per_step": round(1000 * decode_s, 2),
        "audio_s_per_s": round(audio_s / (t2 - t0), 3),  # all rows, whole run
        "decode_audio_s_per_s": round(rows * HOP / SAMPLE_RATE / decode_s, 3),
        "rtf": round(decode_s / (HOP / SAMPLE_RATE), 4),  # wall s per audio s, each row
    }
    if cuda:
        out["peak_mem_per_row_mib"] = round(
            (torch.cuda.max_memory_allocated() - base) / rows / 2**20, 1
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model on CPU")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--rows", default="1,4,8,16")
    p.add_argument("--compile-modes", default=None, help='e.g. ",reduce-overhead" (""=off)')
    p.add_argument("--new-tokens", type=int, default=None, help="audio tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--voice-s", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=1.3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--cache-dir", default=None, help="where --tiny builds the tiny model")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.new_tokens = args.new_tokens or (16 if args.tiny else 96)
    if args.compile_modes is None:
        args.compile_modes = "" if args.tiny else ",reduce-overhead"

    import torch
    import transformers

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU check")
    t0 = time.perf_counter()
    model = build_model(args, torch)
    build_s = time.perf_counter() - t0
    prompts = SyntheticPrompts(model, args.prompt_tokens, args.voice_s)
    params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    rows = []
    for mode in args.compile_modes.split(","):
        for r in (int(x) for x in args.rows.split(",")):
            with torch.no_grad():
                run_rows(model, prompts, r, 2, args, torch, mode)  # warm-up (and compile)
                rows.append(run_rows(model, prompts, r, args.new_tokens, args, torch, mode))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    result = {
        "model": "tiny random VibeVoice" if args.tiny else "VibeVoice-1.5B architecture, random",
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
        "vllm_omni_h100": {"rtf_b1_eager": 0.30, "rtf_b1_graphs": 0.19, "audio_s_per_s_c4": 7.0},
    }
    mem = args.device.startswith("cuda")
    print(
        f"\n{result['model']} ({params / 1e6:.1f} M params, {result['dtype']}) on {device_name}; "
        f"{args.new_tokens} audio tokens ({args.new_tokens * HOP / SAMPLE_RATE:.2f} s) per row, "
        f"{args.steps} diffusion steps, cfg {args.cfg}\n"
    )
    head = (
        "| rows | head compile | ms/step | RTF (per row) | audio s/s, decode | audio s/s, whole |"
    )
    print(head + (" peak MiB per row |" if mem else ""))
    print("|---:|---|---:|---:|---:|---:|" + ("---:|" if mem else ""))
    for r in rows:
        line = (
            f"| {r['rows']} | {r['compile']} | {r['ms_per_step']:.1f} | {r['rtf']:.3f} | "
            f"{r['decode_audio_s_per_s']:.2f} | {r['audio_s_per_s']:.2f} |"
        )
        print(line + (f" {r['peak_mem_per_row_mib']:.0f} |" if mem else ""))
    print(
        "\nvLLM-Omni's VibeVoice-1.5B port, its author's figures on one H100: RTF 0.30 at batch "
        "1 eager, 0.19 with CUDA graphs, about 7 audio s/s at 4 concurrent."
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
