"""The record of the resume section: a SIGKILL at 80% of a long streamed row,
resumed from its history against replayed from its start."""

from __future__ import annotations

from pathlib import Path

from bench import common

STALL_TARGET_S = 3.0  # issue 23: the longest stall after the kill, ~50 s row
SPLICE_TARGET = 2e-2  # of the clean row's peak, over the 5 s after the splice
FIRST_AUDIO_TARGET_S = 2.5  # issue 23: an interactive request behind two job rows


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
        *_preemption_targets(res),
    )


def _preemption_targets(res: dict) -> list[tuple[str, str, bool]]:
    p = res.get("preemption_summary")
    if not p:
        return []
    w, wo = p["with"], p["without"]
    return [
        (
            "one worker, both places held by job rows: an interactive request's first "
            f"audio under {FIRST_AUDIO_TARGET_S:g} s",
            f"{w['first_audio_max_s']:.2f} s (without preemption: {wo['first_audio_s']:.2f} s)",
            w["first_audio_max_s"] < FIRST_AUDIO_TARGET_S,
        ),
        (
            "the preempted jobs: their length equal, within 2e-2 of the peak",
            f"equal: {w['jobs_equal_length']}; {w['jobs_err']:.1e}",
            w["jobs_equal_length"] and w["jobs_err"] < SPLICE_TARGET,
        ),
    ]


def render_preemption(res: dict) -> str:
    p = res["preemption_summary"]
    rows = [
        [
            arm,
            f"{p[arm]['first_audio_s']:.2f} s (max {p[arm]['first_audio_max_s']:.2f})",
            "yes" if p[arm]["jobs_equal_length"] else "**no**",
            f"{p[arm]['jobs_err']:.1e}",
            f"{p[arm]['rounds']}",
        ]
        for arm in ("with", "without")
    ]
    return common.table(
        [
            f"preemption ({res['preemption']['job_s']:.0f} s jobs)",
            "interactive first audio (median)",
            "jobs' length equal",
            "jobs' error / peak",
            "rounds",
        ],
        rows,
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
        *([render_preemption(res), ""] if "preemption_summary" in res else []),
        "### Reading the figures",
        "",
        "- The stall after a kill is detection, then one prefill of the prompt and the "
        "history, and the rebuild of the stream caches from a window of frames "
        "(the model's own stream window, receptive.py): the prefill "
        "is one parallel pass, so the stall does not follow the audio already made ("
        + ", ".join(
            f"{x['resume_stall_s']:.2f} s at {x['audio_s']:.0f} s" for x in res["summary"].values()
        )
        + "), while a replay's stall is the time to make again the audio already sent ("
        + ", ".join(f"{x['replay_stall_s']:.2f} s" for x in res["summary"].values())
        + f"). The {r['audio_s']:.0f} s row kept {r['steps_kept']:.0f} steps it did not "
        "run again.",
        "- The splice error is float32 summation order: the resumed row's KV comes from one "
        "prefill instead of one forward a step (docs/MODEL.md).",
        "- Preemption: with both places of the one worker held by job rows, the interactive "
        "request is sent over capacity and the worker gives it the place of the job row with "
        "the most audio left at the next step boundary; without it, the request waits for a "
        "job row to end. The preempted job resumes from its history once a place frees.",
        "",
    ]
