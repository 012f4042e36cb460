"""The record of the resume section: a SIGKILL at 80% of a long streamed row,
resumed from its history against replayed from its start."""

from __future__ import annotations

from pathlib import Path

from bench import common

STALL_TARGET_S = 3.0  # issue 23: the longest stall after the kill, ~50 s row
SPLICE_TARGET = 2e-2  # of the clean row's peak, over the 5 s after the splice


def _longest(res: dict) -> dict:
    s = res["summary"]
    return s[max(s, key=lambda k: s[k]["audio_s"])]


def target_rows(res: dict) -> list[list[str]]:
    r = _longest(res)
    length = f"{r['audio_s']:.0f} s row"
    return common.rows(
        (
            f"SIGKILL at 80% of a {length}: longest stall, resumed, under {STALL_TARGET_S:g} s",
            f"{r['resume_stall_max_s']:.2f} s (replay from the start: {r['replay_stall_s']:.2f} s)",
            r["resume_stall_max_s"] < STALL_TARGET_S,
        ),
        (
            "the resumed row: its length equal, the 5 s after the splice within 2e-2 of the peak",
            f"equal: {r['equal_length']}; {r['splice_err_max']:.1e}",
            r["equal_length"] and r["splice_err_max"] < SPLICE_TARGET,
        ),
    )


def render(res: dict) -> str:
    rows = []
    for r in res["summary"].values():
        rows.append(
            [
                f"{r['audio_s']:.1f} s",
                f"{r['clean_wall_s']:.2f} s",
                f"{r['clean_gap_s']:.2f} s",
                f"{r['resume_stall_s']:.2f} s (max {r['resume_stall_max_s']:.2f})",
                f"{r['replay_stall_s']:.2f} s",
                f"{r['replay_stall_s'] / max(1e-9, r['resume_stall_s']):.1f}x",
                f"{r['steps_kept']:.0f}",
                f"{r['splice_err_max']:.1e}",
                "yes" if r["equal_length"] else "**no**",
                f"{r['rounds']}",
            ]
        )
    return common.table(
        [
            "row",
            "clean run",
            "clean: longest gap",
            "stall after kill, resumed (median)",
            "stall, replayed (median)",
            "replay / resume",
            "steps not recomputed",
            "splice error / peak",
            "length equal",
            "rounds",
        ],
        rows,
    )


def section(sec, img_dir: Path | None = None, rel: str = "") -> list[str]:
    out = ["## 3c. Long rows that survive: resume against replay", ""]
    if sec is None or "data" not in sec:
        return out + common.failed("resume", sec)
    res = sec["data"]
    r = _longest(res)
    return out + [
        "Two tiny-model CPU workers, one row each; a streamed row, its worker SIGKILLed "
        "once 80% of its audio has reached the parent. `resume`: the row goes on on the "
        "other worker from the history its chunks carried; `replay`: the same kill with "
        "the parent's history dropped (in the benchmark's process only), so the row runs "
        "again from its start and the audio already sent is skipped, as before issue 23. "
        "Arms alternate; `python -m bench.resume.run`.",
        "",
        render(res),
        "",
        "### Reading the figures",
        "",
        "- The stall after a kill is detection, then one prefill of the prompt and the "
        "history, and the rebuild of the stream caches from at most 48 frames: it grows "
        "with the prefill only ("
        + ", ".join(
            f"{x['resume_stall_s']:.2f} s at {x['audio_s']:.0f} s" for x in res["summary"].values()
        )
        + "), while a replay's stall is the time to make again the audio already sent ("
        + ", ".join(f"{x['replay_stall_s']:.2f} s" for x in res["summary"].values())
        + f"). The {r['audio_s']:.0f} s row kept {r['steps_kept']:.0f} steps it did not "
        "run again.",
        "- The splice error is float32 summation order: the resumed row's KV comes from one "
        "prefill instead of one forward a step (docs/MODEL.md).",
        "",
    ]
