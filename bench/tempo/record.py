"""The record of the tempo section (OpenAI's `speed`), from the JSON `python -m
bench.tempo.run --out FILE` writes.

    python -m bench.tempo.record FILE [--doc docs/PERFORMANCE.md]

rewrites this section of the record in place from FILE; `make bench` writes it with the
others (bench/report.py).
"""

from __future__ import annotations

import math
import sys

from bench import common
from bench.rewrite import rewrite_main

TITLE = "## 4d. Speaking speed: the stretch's cost, on CPU"


def render(d: dict) -> str:
    rows = [
        [
            f"{s['speed']:g}",
            f"{s['whole_ms_per_s']:.2f}",
            f"{s['stream_ms_per_s']:.2f}",
            f"{s['stream_ms_per_s'] * d['hop'] / 24000:.3f}",
        ]
        for s in d["speeds"]
    ]
    head = ["speed", "whole: ms per s of audio", "streamed: ms per s of audio"]
    return common.table(head + [f"streamed: ms per push of {d['hop']} samples"], rows)


def body(d: dict) -> list[str]:
    worst = max(max(s["whole_ms_per_s"], s["stream_ms_per_s"]) for s in d["speeds"])
    return [
        f"`/v1/audio/speech` with a `speed` other than 1 stretches its audio with FFmpeg's "
        f"atempo through PyAV {d['pyav']} (libavfilter {d['libavfilter']}), pitch kept "
        "(`vibevoice_pool/api/tempo.py`; speeds outside 0.5-2 are a chain of equal steps). "
        f"{d['seconds']:g} s of a tone under noise, stretched whole (one call) and "
        f"streamed (pushed {d['hop']} samples at a time, as a worker sends them, then "
        f"flushed); medians of {d['repeats']} runs, milliseconds of one core per second "
        "of input audio.",
        "",
        render(d),
        "",
        "### Reading the figures",
        "",
        f"- At most {worst:.2f} ms per second of audio: under "
        f"{math.ceil(worst / 10)}% of one core at real time, far below the "
        "model's own cost per second, and of the order of an mp3 encode of the same "
        "audio (30 s in 0.29 s, `vibevoice_pool/encoders.py`). The chained speeds "
        "(0.25, 4.0) run two filters; 0.25 also makes four times the output.",
        "- A stream holds back what atempo has not finished: one push (one audio "
        "token, 133 ms of input) through one filter, two through a chain; the first "
        "audio leaves with the worker's next pieces "
        "(`tests/test_speed.py` stops the worker once the first audio arrives and finds "
        "its request still in flight).",
        "",
    ]


def section(sec, img_dir=None, rel="") -> list[str]:
    out = [TITLE, ""]
    if not sec or "data" not in sec:
        return out + common.failed("tempo", sec)
    return out + body(sec["data"])


def main(argv=None) -> int:
    return rewrite_main(argv, TITLE, "tempo", body, "python -m bench.tempo.run --out tempo.json")


if __name__ == "__main__":
    sys.exit(main())
