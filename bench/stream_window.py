"""How many latent frames VibeVoice's streaming conv stacks remember: the window a
resumed row must run through the acoustic decoder and the semantic encoder to rebuild
their stream caches exactly (workers/engines/vibevoice/resume.py, docs/MODEL.md).

The engine reads that window from the loaded modules (receptive.lookback_frames). This
measures it instead, with an impulse: latents that are zero but for frame 0 are
streamed a frame at a time, as the engine streams them (transformers' padding caches),
through the decoder and then the semantic encoder, with every bias zero and every
layer scale 1, in float64. Every output is then exactly zero where frame 0 does not
reach it and non-zero where it does (a zero baseline: nothing large for a far-reaching
small term to be rounded away against), so the last non-zero frame is the lookback.
A lookback depends on kernels, strides and depths, not on widths or weights, so the
full-size tower runs at one filter (--num-filters) to be fast; --num-filters 32 is
VibeVoice-1.5B's real width.

    python -m bench.stream_window
"""

from __future__ import annotations

import argparse
import sys
import time


def towers(num_filters: int | None) -> dict:
    """name -> (decoder config, semantic encoder config): VibeVoice-1.5B's tower and the
    tiny model's. Any other checkpoint's window is read from its own modules."""
    from transformers import VibeVoiceConfig

    from bench.bench_gpu_1p5b import full_size_config
    from workers.checkpoints.tiny import tiny_config_dict

    ids = {"pad": 0, "eos": 0, "audio_bos": 1, "audio_eos": 2, "audio": 3}
    tiny = VibeVoiceConfig(**tiny_config_dict(8, ids))
    full = full_size_config()
    for c in (full.audio_config, full.semantic_model_config):  # decoder_config is made anew
        c.num_filters = num_filters or c.num_filters
    return {
        "VibeVoice-1.5B": (full.audio_config.decoder_config, full.semantic_model_config),
        "tiny": (tiny.audio_config.decoder_config, tiny.semantic_model_config),
    }


def build(decoder_config, encoder_config):
    """The two stacks with random weights, float64, biases 0 and layer scales 1."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    stacks = []
    for cfg in (decoder_config, encoder_config):
        stack = AutoModel.from_config(cfg).to(torch.float64).eval()
        with torch.no_grad():
            for name, p in stack.named_parameters():
                if name.endswith("gamma"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
        stacks.append(stack)
    return stacks


def impulse_lookback(decoder, encoder, frames: int) -> tuple[int | None, int | None]:
    """The last frame (counted from the impulse at frame 0) whose decoder audio, and
    whose semantic features, frame 0 still reaches; None when it reaches the last
    frame streamed (stream more)."""
    import torch

    width = decoder.config.hidden_size
    latents = torch.zeros(1, width, frames, dtype=torch.float64)
    latents[0, :, 0] = torch.randn(width, dtype=torch.float64)
    dec_cache = enc_cache = None
    last_audio = last_sem = -1
    with torch.no_grad():
        for t in range(frames):
            d = decoder(latents[:, :, t : t + 1], padding_cache=dec_cache, use_cache=True)
            e = encoder(d.audio, padding_cache=enc_cache, use_cache=True)
            dec_cache, enc_cache = d.padding_cache, e.padding_cache
            if bool(d.audio.ne(0).any()):
                last_audio = t
            if bool(e.latents.ne(0).any()):
                last_sem = t

    def seen(last: int) -> int | None:
        return None if last == frames - 1 else last

    return seen(last_audio), seen(last_sem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=160, help="latent frames streamed")
    p.add_argument("--num-filters", type=int, default=1, help="1.5B tower's width (real: 32)")
    args = p.parse_args(argv)

    import torch

    from workers.engines.vibevoice.receptive import lookback_frames

    torch.set_num_threads(1)
    print(
        "Past latent frames that reach the current frame's output, read from the modules "
        "(receptive.lookback_frames, the engine's window) and measured with an impulse "
        f"({args.frames} frames streamed).\n"
    )
    print("| tower | filters | decoder: read | measured | + semantic encoder: read | measured |")
    print("|---|---:|---:|---:|---:|---:|")
    agree = True
    for name, (dec_cfg, sem_cfg) in towers(args.num_filters).items():
        t0 = time.monotonic()
        decoder, encoder = build(dec_cfg, sem_cfg)
        read = lookback_frames(decoder), lookback_frames(decoder, encoder)
        seen = impulse_lookback(decoder, encoder, args.frames)
        agree &= read == seen
        shown = [f"> {args.frames - 1}" if s is None else str(s) for s in seen]
        print(
            f"| {name} | {dec_cfg.num_filters} | {read[0]} | {shown[0]} | {read[1]} "
            f"| {shown[1]} ({time.monotonic() - t0:.0f} s) |"
        )
    print(
        "\nA resumed row reruns that many latents (the window, the last column) through "
        "both stacks from zero caches; fewer would leave its semantic features, fed back "
        "to the LM, different from the uninterrupted row's."
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
