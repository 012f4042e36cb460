"""The record of the longrow section (a row's host cost by its length), from the JSON
`python -m bench.longrow.run --out FILE [--before OLD]` writes.

    python -m bench.longrow.record FILE [--doc docs/PERFORMANCE.md]

rewrites this section of the record in place from FILE; `make bench` writes it with the
others (bench/report.py).
"""

from __future__ import annotations

import sys

from bench import common
from bench.rewrite import rewrite_main

TITLE = "## 4e. Long rows: the host's cost by a row's length, on CPU"


def worker_rows(d: dict) -> list[list[str]]:
    return [
        [
            f"{w['audio_s']:g} s ({w['audio_s'] / d['base_s']:g}x)",
            str(w["steps"]),
            f"{w['first_step_ms']:.1f}",
            f"{w['step_ms']:.1f}",
            f"{w['kv_ms']:.1f}",
            f"{w['calls_per_step']:.0f}",
            f"{w['pickle_us']:.0f}",
            f"{w['sent_bytes_per_step'] / 1e3:.1f}",
            f"{w['row_host_bytes'] / 1e3:.1f}",
        ]
        for w in d["worker"]
    ]


def parent_rows(d: dict) -> list[list[str]]:
    p = d["parent"]
    out = []
    for s, j in zip(p["stream"], p["job"], strict=True):
        out.append(
            [
                f"{s['audio_s']:g} s",
                f"{s['chunk_us']:.0f}",
                f"{s['held'] / s['audio_s'] / 1e3:.1f}",
                f"{j['chunk_us']:.0f}",
                f"{j['tick_ms']:.1f}",
            ]
        )
    return out


PARENT_HEAD = [
    "row",
    "stream: us a chunk",
    "stream: KB held per audio s at its end",
    "job: us a chunk",
    "job: ms a progress tick",
]


KEPT = "job, read as before (the handle keeps its audio)"
LABELS = {
    "job_kept": KEPT,
    "whole": "whole answer (past a minute in a temporary file)",
    "whole_kept": "whole answer, read as before (the handle keeps its audio)",
}


def job_memory_rows(d: dict) -> list[list[str]]:
    """A job's parent memory at its row's end, as the runner reads it now and as it
    read it before, from one run."""
    p = d["parent"]
    return [
        [f"{j['audio_s']:g} s", _per_s(j["held"], j), _per_s(k["held"], k)]
        for j, k in zip(p["job"], p["job_kept"], strict=True)
    ]


def _per_s(n: float, r: dict) -> str:
    return f"{n / r['audio_s'] / 1e3:.1f}"


def traced(d: dict) -> list[list[str]]:
    p = d["parent"]
    rows = []
    for mode in ("stream", "job", "job_kept", "whole", "whole_kept"):
        t = p.get(f"{mode}_traced")
        if t is None:  # a run before this reader was measured
            continue
        rows.append(
            [
                LABELS.get(mode, mode),
                f"{t['audio_s']:g} s",
                f"{t['held_bytes'] / t['audio_s'] / 1e3:.1f}",
                f"{t['peak_bytes'] / t['audio_s'] / 1e3:.1f}",
            ]
        )
    return rows


def body(d: dict) -> list[str]:
    before = d.get("before")
    out = [
        f"What grows with a row's length on the host (`bench/longrow/run.py`): rows of "
        f"{', '.join(f'{k}x' for k in d['lengths'])} {d['base_s']:g} s of audio. The "
        "worker: the tiny model's step engine in one process (a StepHost and a HostSink "
        "whose messages are pickled as the worker's pipe pickles them), medians over the "
        "row's last tenth. The parent: the same row's chunks pushed into a RequestHandle "
        "as the dispatcher pushes them (3,200 samples and one history step of "
        f"VibeVoice-1.5B's width, {d['width']} values, a chunk), read as a streamed wav "
        "answer (`speech.encoded`) or as a durable job (`jobs/runner.py`'s loop, a "
        "progress tick each second of audio into a temporary folder).",
        "",
        "### The worker",
        "",
        common.table(
            [
                "row",
                "steps",
                "ms a step, its first tenth",
                "ms a step, its last tenth",
                "of which attention (sdpa, KV gather)",
                "Python calls a step",
                "us pickling a step",
                "KB sent a step",
                "KB of host state at its end",
            ],
            worker_rows(d),
        ),
        "",
        "### The parent, after the fixes",
        "",
        common.table(PARENT_HEAD, parent_rows(d)),
        "",
    ]
    if "job_kept" in d["parent"]:
        out += [
            "A durable job's audio and history held by the parent at the row's end, its "
            "result not written yet (the handle's chunks, the runner's unsaved tail, the "
            "history), per second of audio: as the runner reads a job now (the handle "
            "lets go of what it read, the runner of what it saved), and as it read one "
            "before (the handle kept every chunk), in the same run:",
            "",
            common.table(
                ["row", "job: KB held per audio s", f"{KEPT}: KB held per audio s"],
                job_memory_rows(d),
            ),
            "",
        ]
    if before:
        out += [
            f"### The parent before the fixes (commit {before.get('revision', '?')})",
            "",
            common.table(PARENT_HEAD, parent_rows(before)),
            "",
        ]
    out += [
        "Every byte the parent's side still holds once the reader has all the audio "
        "(tracemalloc, the longest row; a job's result written), and its peak, per "
        "second of audio:",
        "",
        common.table(
            ["reader", "row", "KB held per audio s", "KB peak per audio s"],
            traced(d),
        ),
        "",
    ]
    if before:
        out += [
            "Before:",
            "",
            common.table(
                ["reader", "row", "KB held per audio s", "KB peak per audio s"],
                traced(before),
            ),
            "",
        ]
    out += reading(d, before)
    return out


def reading(d: dict, before: dict | None) -> list[str]:
    w = d["worker"]
    job = d["parent"]["job"]
    lines = [
        "### Reading the figures",
        "",
        f"- The worker's Python work a step does not grow: {w[0]['calls_per_step']:.0f} "
        f"calls a step at {w[0]['audio_s']:g} s, {w[-1]['calls_per_step']:.0f} at "
        f"{w[-1]['audio_s']:g} s; a row's host state (audio held back, its trail) stays "
        f"under a chunk. What grows is the model's attention over a longer KV cache "
        f"(sdpa and its KV gather: {w[0]['kv_ms']:.1f} ms a step at {w[0]['audio_s']:g} s, "
        f"{w[-1]['kv_ms']:.1f} ms at {w[-1]['audio_s']:g} s; device work on a GPU, paged); "
        "the rest of a step's time moves with this shared machine's load.",
        f"- A durable job's progress tick at {job[-1]['audio_s']:g} s costs "
        f"{job[-1]['tick_ms']:.1f} ms against {job[0]['tick_ms']:.1f} ms at "
        f"{job[0]['audio_s']:g} s (three fsyncs and a rename each: the audio, the steps, the counts).",
    ]
    if before:
        bj = before["parent"]["job"]
        lines.append(
            f"  Before the fixes it grew with the job: {bj[0]['tick_ms']:.1f} ms at "
            f"{bj[0]['audio_s']:g} s, {bj[-1]['tick_ms']:.1f} ms at {bj[-1]['audio_s']:g} s "
            "(the whole audio concatenated twice and the whole history copied and "
            "rewritten each second: O(n^2) a job)."
        )
    st = d["parent"]["stream"][-1]
    lines += [
        f"- A streamed answer's handle holds {st['held'] / st['audio_s'] / 1e3:.1f} KB a "
        "second of audio once its client has it all: the row's history, which a resume "
        "needs (`HistoryLog`), and no audio but what is not sent yet.",
    ]
    if before:
        bs = before["parent"]["stream"][-1]
        per_s = bs["held"] / bs["audio_s"]
        lines.append(
            f"  Before, {per_s / 1e3:.1f} KB a second: the whole answer too, "
            f"{per_s * 5400 / 1e6:.0f} MB at the end of a 90 minute stream."
        )
    lines += job_reading(d["parent"], d["width"])
    lines += whole_reading(d["parent"]) + [""]
    return lines


def whole_reading(p: dict) -> list[str]:
    if "whole_traced" not in p:
        return [
            "- A whole answer and the page's handles keep the audio they encode at the end "
            "(96 KB a second of audio, float32 at 24 kHz: 518 MB for 90 minutes)."
        ]
    w, k = p["whole"][-1], p["whole_kept"][-1]
    tw, tk = p["whole_traced"], p["whole_kept_traced"]
    return [
        f"- An answer sent whole, at the end of a {w['audio_s']:g} s row: the parent "
        f"holds {w['held'] / 1e6:.1f} MB of its audio and history "
        f"({w['held'] / w['audio_s'] / 1e3:.1f} KB a second; at most a minute of audio "
        "in memory, the rest in a temporary file), against "
        f"{k['held'] / 1e6:.1f} MB ({k['held'] / k['audio_s'] / 1e3:.1f} KB a second) "
        "read as before; the peak while it is encoded, "
        f"{tw['peak_bytes'] / 1e6:.1f} MB against {tk['peak_bytes'] / 1e6:.1f} MB. "
        "The page's handles keep the audio they play (96 KB a second).",
    ]


def job_reading(p: dict, width: int) -> list[str]:
    if "job_kept" not in p:
        return [
            "- A job's handle keeps the audio it encodes at the end (96 KB a second of "
            "audio); it is on disk too (its progress)."
        ]
    j, k = p["job"][-1], p["job_kept"][-1]
    tj, tk = p["job_traced"], p["job_kept_traced"]
    held, kept = j["held"] / j["audio_s"], k["held"] / k["audio_s"]
    history = 7.5 * 4 * (1 + width)  # 7.5 steps a second: a token and `width` values each
    return [
        f"- A durable job's parent memory at the end of a {j['audio_s']:g} s row: "
        f"{held / 1e3:.1f} KB a second of audio: the history a resume needs "
        f"({history / 1e3:.1f} KB a second at this width) and the audio not saved yet "
        "(under a second); read as before, the handle kept every "
        f"chunk: {kept / 1e3:.1f} KB a second ({kept * 5400 / 1e6:.0f} MB for a 90 "
        f"minute job, {kept * 5400 * 10 / 1e9:.1f} GB for ten at once; now "
        f"{held * 5400 / 1e6:.0f} MB, {held * 5400 * 10 / 1e6:.0f} MB for ten). The "
        "result is encoded from the file a block at a time: the peak while it is "
        f"written, {tj['peak_bytes'] / 1e6:.1f} MB in all "
        f"({tj['peak_bytes'] / tj['audio_s'] / 1e3:.1f} KB a second of audio), against "
        f"{tk['peak_bytes'] / 1e6:.1f} MB ({tk['peak_bytes'] / tk['audio_s'] / 1e3:.1f} KB "
        "a second) with the whole audio in one array.",
    ]


def section(sec, img_dir=None, rel="") -> list[str]:
    out = [TITLE, ""]
    if not sec or "data" not in sec:
        return out + common.failed("longrow", sec)
    return out + body(sec["data"])


def main(argv=None) -> int:
    return rewrite_main(
        argv, TITLE, "longrow", body, "python -m bench.longrow.run --out longrow.json"
    )


if __name__ == "__main__":
    sys.exit(main())
