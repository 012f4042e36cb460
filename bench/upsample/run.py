"""The acoustic decoder's upsampling stages in one decode step, at VibeVoice-1.5B's
widths, on CPU: transformers' streaming transposed conv (over its whole left context)
against conv_stacks.upsample (over the frames that reach the new output).

Each stage gets the new frames of one decode step (1 latent frame into the first stage,
then each stage's output into the next) with a full stream cache. The weights are
random (timing does not depend on them); float32, one torch thread. Medians of
--repeats runs, milliseconds per call, and the largest difference of the outputs
relative to their peak.

    python -m bench.upsample.run [--rows 1,4,16] [--repeats 5] [--out upsample.json]
    python -m bench.upsample.record upsample.json   # rewrite its part of docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import sys

from bench import common
from bench.timing import median_ms
from bench.upsample.record import render

FILTERS = 32  # the 1.5B acoustic tokenizer's n_filters
RATIOS = (8, 5, 5, 4, 2, 2)  # its upsampling ratios, in the decoder's order; kernel 2 x ratio


def stages() -> list[tuple[int, int, int, int, int]]:
    """(in channels, out channels, kernel, stride, new frames) of each stage."""
    out, channels, frames = [], FILTERS * 2 ** len(RATIOS), 1
    for ratio in RATIOS:
        out.append((channels, channels // 2, 2 * ratio, ratio, frames))
        channels, frames = channels // 2, frames * ratio
    return out


def one_stage(rows: int, shape: tuple, g, repeats: int) -> tuple[float, float, float]:
    """(transformers ms, upsample ms, max difference / peak) of one stage at `rows`."""
    import torch
    from transformers.models.vibevoice_acoustic_tokenizer import (
        modeling_vibevoice_acoustic_tokenizer as mod,
    )

    from workers.engines.vibevoice.conv_stacks import upsample

    c_in, c_out, kernel, stride, frames = shape
    module = mod.VibeVoiceAcousticTokenizerCausalConvTranspose1d(
        c_in, c_out, kernel, "up", stride=stride
    )
    x = torch.randn(rows, c_in, frames, generator=g)
    context = torch.randn(rows, c_in, kernel - 1, generator=g)
    caches = []
    with torch.no_grad():
        for _ in range(2):  # a full stream cache for each way
            cache = mod.VibeVoiceAcousticTokenizerConv1dPaddingCache()
            module(context, padding_cache=cache)
            caches.append(cache)
        want = module(x, padding_cache=caches[0])
        got = upsample(module, x, caches[1])
        diff = float((got - want).abs().max() / want.abs().max())
        # each call moves its cache on; what it holds does not change the time
        theirs = median_ms(lambda: module(x, padding_cache=caches[0]), repeats)
        ours = median_ms(lambda: upsample(module, x, caches[1]), repeats)
    return theirs, ours, diff


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 and 4 rows, 3 repeats")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = "1,4", 3
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for shape in stages():
            theirs, ours, diff = one_stage(rows, shape, g, args.repeats)
            c_in, c_out, kernel, stride, frames = shape
            results.append(
                {
                    "rows": rows,
                    "stage": f"{c_in}→{c_out}, {kernel}/{stride}, {frames}",
                    "transformers_ms": round(theirs, 3),
                    "upsample_ms": round(ours, 3),
                    "max_diff_of_peak": diff,
                }
            )
    d = {"torch": torch.__version__, "threads": 1, "repeats": args.repeats, "stages": results}
    print(render(d))
    if args.out:
        common.save_json(args.out, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
