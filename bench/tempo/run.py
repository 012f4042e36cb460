"""The cost of OpenAI's `speed` (vibevoice_pool/api/tempo.py) on CPU: milliseconds of
one core per second of audio stretched, for each speed, whole (one call) and streamed
(pushed in pieces of 3,200 samples, one audio token's hop, as a worker sends them),
medians of --repeats runs. The input is a tone under noise (the tiny model's audio is
noise-like); the cost does not depend on what the audio says.

    python -m bench.tempo.run [--seconds 30] [--repeats 5] [--out tempo.json]
    python -m bench.tempo.record tempo.json   # rewrite its part of docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import common
from bench.tempo.record import render
from bench.timing import median_ms

SPEEDS = (0.25, 0.5, 1.5, 2.0, 4.0)
HOP = 3200  # samples a worker sends per audio token
SR = 24000


def signal(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.2 * np.sin(2 * np.pi * 180 * t)
    return (tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def streamed(x: np.ndarray, speed: float) -> int:
    from vibevoice_pool.api.tempo import Stretcher

    st = Stretcher(speed)
    n = sum(len(st.push(x[i : i + HOP])) for i in range(0, len(x), HOP))
    return n + len(st.end())


def main(argv=None) -> int:
    import av

    from vibevoice_pool.api.tempo import stretch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="audio stretched per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="10 s of audio, 3 repeats")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 10.0, 3
    x = signal(args.seconds)
    rows = []
    for speed in SPEEDS:
        whole = median_ms(lambda s=speed: stretch(x, s), args.repeats)
        stream = median_ms(lambda s=speed: streamed(x, s), args.repeats)
        assert streamed(x, speed) == len(stretch(x, speed)) == round(len(x) / speed)
        rows.append(
            {
                "speed": speed,
                "whole_ms_per_s": round(whole / args.seconds, 3),
                "stream_ms_per_s": round(stream / args.seconds, 3),
            }
        )
    d = {
        "seconds": args.seconds,
        "repeats": args.repeats,
        "hop": HOP,
        "pyav": av.__version__,
        "libavfilter": ".".join(map(str, av.library_versions["libavfilter"])),
        "speeds": rows,
    }
    print(render(d))
    if args.out:
        common.save_json(args.out, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
