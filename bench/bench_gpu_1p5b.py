"""Throughput of the full-size VibeVoice-1.5B architecture on one GPU, by batch size.

Builds VibeVoice-1.5B's architecture (Qwen2.5-1.5B text model, the real acoustic and
semantic tokenizers and diffusion head) with random weights, in bf16 with SDPA, and times
`generate` at batch 1, 2, 4 and 8: a fixed prompt (script tokens and one voice sample),
a fixed number of new audio tokens, 10 diffusion steps, cfg 1.3. Random weights never
pick the audio token, so a sequence_bias on it makes every new token an audio token: the
compute per token is the real model's. It runs the way VibeVoiceEngine runs the model
(diffusion-only guidance: the text-CFG pass transformers adds is dropped unless
--keep-text-cfg). Prints a Markdown table; --out writes JSON.

    python bench/bench_gpu_1p5b.py --out results.json          # one GPU, a few minutes
    python bench/bench_gpu_1p5b.py --tiny --out tiny.json      # the tiny model on CPU

Needs torch, transformers with VibeVoice (>= 5.17) and diffusers (the default noise
scheduler). No weights or tokenizer are downloaded: inputs are built from token ids.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
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

    from workers.tiny import configure_generation, ensure_tiny_model
    from workers.vibevoice import _drop_text_cfg

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
    if not args.keep_text_cfg:
        _drop_text_cfg(model)
    return model


def make_inputs(model, batch: int, prompt_tokens: int, voice_s: float, torch, device):
    """What the processor makes for a script + one voice: text ids around a voice slot."""
    cfg = model.config
    voice_tokens = max(1, int(voice_s * SAMPLE_RATE) // HOP)
    n_text = max(4, prompt_tokens - voice_tokens - 3)
    g = torch.Generator().manual_seed(0)
    top = min(cfg.text_config.vocab_size, cfg.eos_token_id, cfg.audio_bos_token_id)
    text = torch.randint(16, top, (batch, n_text), generator=g)  # ordinary text tokens
    half = n_text // 2
    slot = torch.tensor(
        [cfg.audio_bos_token_id] + [cfg.audio_token_id] * voice_tokens + [cfg.audio_eos_token_id]
    ).expand(batch, -1)
    start = torch.full((batch, 1), cfg.audio_bos_token_id)
    ids = torch.cat([text[:, :half], slot, text[:, half:], start], dim=1)
    voice = 0.1 * torch.randn(batch, 1, voice_tokens * HOP, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "input_values": voice.to(device=device, dtype=model.dtype),
        "padding_mask": torch.ones(batch, voice_tokens * HOP, dtype=torch.int32).to(device),
    }


def time_batch(model, batch, args, torch):
    inputs = make_inputs(model, batch, args.prompt_tokens, args.voice_s, torch, args.device)
    cuda = args.device.startswith("cuda")
    walls = []
    for run in range(args.warmup + args.runs):
        if cuda:
            torch.cuda.synchronize()
            if run == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(run)
        t0 = time.perf_counter()
        with torch.inference_mode():
            audio = model.generate(
                **inputs,
                max_new_tokens=args.new_tokens,
                num_diffusion_steps=args.steps,
                guidance_scale=args.cfg,
            )
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        samples = [0 if a is None else a.shape[-1] for a in audio]
        if samples != [args.new_tokens * HOP] * batch:
            raise SystemExit(f"expected {args.new_tokens} audio tokens per row, got {samples}")
        if run >= args.warmup:
            walls.append(wall)
    wall = statistics.median(walls)
    audio_s = args.new_tokens * HOP / SAMPLE_RATE
    row = {
        "batch": batch,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(batch * args.new_tokens / wall, 2),
        "ms_per_step": round(1000 * wall / args.new_tokens, 2),
        "rtf": round(wall / audio_s, 4),  # wall seconds per audio second, each row
        "audio_s_per_s": round(batch * audio_s / wall, 3),  # all rows together
        "runs_s": [round(w, 4) for w in walls],
    }
    if cuda:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        import resource

        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random model on CPU")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--new-tokens", type=int, default=None, help="audio tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=160)
    p.add_argument("--voice-s", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=1.3)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--keep-text-cfg", action="store_true", help="keep transformers' text-CFG pass")
    p.add_argument("--cache-dir", default=None, help="where --tiny builds the tiny model")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.new_tokens = args.new_tokens or (32 if args.tiny else 96)

    import torch
    import transformers

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU check")
    t0 = time.perf_counter()
    model = build_model(args, torch)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    rows = [time_batch(model, int(b), args, torch) for b in args.batches.split(",")]

    result = {
        "model": "tiny random VibeVoice" if args.tiny else "VibeVoice-1.5B architecture, random",
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
        "text_cfg_pass": args.keep_text_cfg,
        "threads": args.threads if args.device == "cpu" else None,
        "rows": rows,
    }
    mem = "peak_mem_gib" if args.device.startswith("cuda") else "peak_rss_gib"
    print(
        f"\n{result['model']} ({params / 1e6:.1f} M params, {result['dtype']}) on {device_name}; "
        f"{args.new_tokens} new tokens ({args.new_tokens * HOP / SAMPLE_RATE:.2f} s of audio) per "
        f"row, {args.steps} diffusion steps, cfg {args.cfg}, median of {args.runs}\n"
    )
    print(f"| batch | wall s | tokens/s | ms/step | RTF (per row) | audio s/s (all) | {mem} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['wall_s']:.3f} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} "
            f"| {r['rtf']:.3f} | {r['audio_s_per_s']:.2f} | {r[mem]:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
