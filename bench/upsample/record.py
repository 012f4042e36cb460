"""The record of the upsample section, from the JSON `python -m bench.upsample.run --out
FILE` writes.

    python -m bench.upsample.record FILE [--doc docs/PERFORMANCE.md]

rewrites this section of the record in place from FILE; `make bench` writes it with the
others (bench/report.py).
"""

from __future__ import annotations

import sys

from bench import common
from bench.rewrite import rewrite_main

TITLE = "## 4c. The decoder's upsampling in a decode step, at 1.5B widths, on CPU"


def _totals(d: dict) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for s in d["stages"]:
        theirs, ours = out.get(s["rows"], (0.0, 0.0))
        out[s["rows"]] = (theirs + s["transformers_ms"], ours + s["upsample_ms"])
    return out


def render(d: dict) -> str:
    """The table as the run prints it: each stage at each row count, then the six."""
    rows = []
    for count, (total_t, total_u) in _totals(d).items():
        for s in (s for s in d["stages"] if s["rows"] == count):
            t, u, diff = s["transformers_ms"], s["upsample_ms"], s["max_diff_of_peak"]
            rows.append([count, s["stage"], f"{t:.2f}", f"{u:.2f}", f"{t / u:.2f}x", f"{diff:.1e}"])
        rows.append(
            [count, "all six", f"{total_t:.2f}", f"{total_u:.2f}", f"{total_t / total_u:.2f}x", ""]
        )
    head = ["rows", "stage (in→out, kernel/stride, new frames)", "transformers ms"]
    return common.table(head + ["upsample ms", "ratio", "max diff / peak"], rows)


def reading(d: dict) -> list[str]:
    totals = _totals(d)
    first = [s for s in d["stages"] if s["stage"].endswith(", 1")]
    worst = max(s["max_diff_of_peak"] for s in d["stages"])
    spans = ", ".join(
        f"{t / u:.1f}x at {r} row{'s' if r > 1 else ''}" for r, (t, u) in totals.items()
    )
    firsts = ", ".join(
        f"{s['transformers_ms'] / s['upsample_ms']:.1f}x at {s['rows']}" for s in first
    )
    return [
        "### Reading the figures",
        "",
        f"- The six stages of one step: {spans}. The first stage (1 new frame against 15 of "
        f"context) is where transformers' conv wastes most ({firsts} rows). The later "
        "stages have many new frames per step and little context to skip; on CPU they "
        "gain from running one batched matmul per kernel tap instead of the conv's own "
        "CPU kernel, which scales badly with rows.",
        f"- The outputs differ by float rounding only (at most {worst:.1e} of the peak; "
        "`tests/test_stream_convs.py` checks every path, with the CPU's operators and a GPU's, "
        "against transformers' module chunk "
        "after chunk).",
        "- The tiny model's whole step is in section 4b. On a GPU this is unmeasured: the "
        "first stage is 8x fewer multiply-adds there too, but a GPU step at these sizes is "
        "bound by its launches.",
    ]


def body(d: dict) -> list[str]:
    out = [
        "Each of the acoustic decoder's six upsampling stages gets the new frames of one "
        "decode step (1 latent frame into the first) with a full stream cache; random "
        f"weights, float32, {d.get('threads', 1)} torch thread, medians of "
        f"{d.get('repeats', 5)} calls, milliseconds per call. transformers' streaming "
        "transposed conv runs over its whole left context (K - 1 frames) and keeps the "
        "last (new frames x stride) samples; `conv_stacks.upsample` feeds only the "
        "(K - 1) // stride context frames that reach them. On CPU "
        "(`conv_stacks.CPU_KERNELS`) one new frame, and as many as the kernel or more, "
        "run one matmul per kernel tap; between those, one matmul and an overlap-add (on a "
        "GPU: that wherever the new frames are fewer than the kernel, the module's conv "
        "elsewhere).",
        "",
        render(d),
        "",
    ]
    return out + reading(d) + [""]


def section(sec, img_dir=None, rel="") -> list[str]:
    out = [TITLE, ""]
    if not sec or "data" not in sec:
        return out + common.failed("upsample", sec)
    return out + body(sec["data"])


def main(argv=None) -> int:
    return rewrite_main(
        argv, TITLE, "upsample", body, "python -m bench.upsample.run --out upsample.json"
    )


if __name__ == "__main__":
    sys.exit(main())
