"""The record of the tiny section: its targets, tables, plots and reading."""

from __future__ import annotations

from bench import common


def render(d: dict) -> str:
    """The figures as this script prints them: a heading, the spawn line, one table."""
    b, ln = d["spawn_breakdown_s"], d["lengths_s"]
    out = [
        "",
        f"Tiny VibeVoice on CPU, one engine, 1 torch thread, {d['diffusion_steps']} diffusion "
        f"steps; {d['requests']} requests of {ln['min']:.1f}-{ln['max']:.1f} s (mean "
        f"{ln['mean']:.1f} s, CV {ln['cv']:.2f}), streamed; all at once, then Poisson arrivals "
        f"at {d['poisson_load']:.0%} of batch-1 capacity ({d['poisson_rate_per_s']:.2f}/s). "
        "Times are the engine's own: its process's CPU time (one thread), idle gaps added, so "
        "the machine's other tenants do not distort them.",
        "",
        f"Spawn to ready (a cold process, median of {len(d['spawn_runs_s'])}): "
        f"{d['spawn_to_ready_s']:.2f} s; interpreter {b['interpreter_s']:.2f}, import torch "
        f"{b['torch_s']:.2f}, transformers {b['transformers_s']:.2f}, the VibeVoice classes "
        f"{b['model_classes_s']:.2f}, load {b['load_s']:.2f} s.",
        "",
        "| arrivals | mode | audio s/s | vs batch 1 | latency p50 / p99 (s) | "
        "first audio p50 / p99 (s) | step (ms) | rows in flight | join wait, max (steps) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arrivals, runs in (("all at once", d["burst"]), ("Poisson", d["poisson"])):
        base = runs["batch 1"]["audio_s_per_s"]
        for name, r in runs.items():
            wait = "-" if r["join_wait_steps_max"] is None else str(r["join_wait_steps_max"])
            out.append(
                f"| {arrivals} | {name} | {r['audio_s_per_s']:.2f} | "
                f"{r['audio_s_per_s'] / base:.2f}x | {r['latency_p50_s']:.1f} / "
                f"{r['latency_p99_s']:.1f} | {r['ttfa_p50_s']:.2f} / {r['ttfa_p99_s']:.2f} | "
                f"{r['step_ms_median']:.0f} | {r['rows_mean']:.1f} | {wait} |"
            )
    return "\n".join(out)


def targets(d: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for issue 3's start-up target and issue 14's three."""
    if "burst" not in d:  # a record written before the step engine
        return []
    b1, cb4 = d["poisson"]["batch 1"], d["poisson"]["CB 4"]
    wait = cb4["join_wait_steps_max"]
    return [
        (
            "tiny model on CPU: spawn to ready at most 3 s",
            f"{d['spawn_to_ready_s']:.2f} s",
            d["spawn_to_ready_s"] <= 3.0,
        ),
        (
            "tiny model, 1 thread, mixed lengths all at once: continuous batching at 4 rows "
            "at least 2.0x the audio-s/s of batch 1",
            f"{d['cb4_over_batch1']:.2f}x ({d['burst']['CB 4']['audio_s_per_s']:.2f} against "
            f"{d['burst']['batch 1']['audio_s_per_s']:.2f} audio s/s)",
            d["cb4_over_batch1"] >= 2.0,
        ),
        (
            f"same, Poisson at {d['poisson_load']:.0%} of batch-1 capacity: p99 latency of "
            "CB 4 no worse than batch 1",
            f"{cb4['latency_p99_s']:.1f} s against {b1['latency_p99_s']:.1f} s",
            cb4["latency_p99_s"] <= b1["latency_p99_s"],
        ),
        (
            "a request that arrives during others gets its first audio within two decode steps",
            "no request arrived during others"
            if wait is None
            else f"{wait} steps at most ({cb4['joined_busy']} such requests, CB 4, Poisson)",
            wait is not None and wait <= 2,
        ),
    ]


def reading(d: dict) -> list[str]:
    """What the figures say, and why a missed target is missed."""
    b = d.get("spawn_breakdown_s", {})
    imports = sum(b.get(k, 0.0) for k in ("torch_s", "transformers_s", "model_classes_s"))
    out = [  # the breakdown is of the median run (older records: per-part medians)
        "### Reading the figures",
        "",
        f"- Spawn to ready is {d['spawn_to_ready_s']:.2f} s, of which {imports:.2f} s is "
        "importing torch, transformers and the VibeVoice classes; loading the tiny model "
        f"takes {b.get('load_s', 0):.2f} s. This is a cold spawn: the pool's workers fork "
        "from a zygote that has imported all of it already (section 3b), so a respawned "
        "worker pays only its model load. On a GPU, `bench/gpu_respawn.py` measures the "
        "1.5B respawn (not run yet: no GPU here).",
    ]
    if "burst" not in d:
        return out
    burst, poisson = d["burst"], d["poisson"]
    out += [
        "- The engine runs in process through the same StepHost a worker runs (no pipe), "
        "one torch thread. Time is the process's CPU time plus the idle gaps between "
        "arrivals (a discrete-event clock driven by measured work): other tenants of this "
        "shared 2-core machine slow the run down but do not change the figures, which "
        "wall time did by up to 3x between modes.",
        f"- All at once, continuous batching makes {d['cb4_over_batch1']:.2f}x (4 rows) and "
        f"{d['cb8_over_batch1']:.2f}x (8 rows) the audio of batch 1 per wall second; the old "
        f"static batches (rows join only an empty engine) make {d['static4_over_batch1']:.2f}x: "
        "a batch runs as long as its longest row, and the rows that ended leave it emptier "
        f"and emptier (mean rows in flight {burst['static 4']['rows_mean']:.1f} against "
        f"{burst['CB 4']['rows_mean']:.1f}).",
        "- Two things hold CB 4 there: a step of more rows costs more (median "
        f"{burst['CB 4']['step_ms_median']:.0f} ms against {burst['batch 1']['step_ms_median']:.0f} "
        "ms at batch 1; on the tiny model on CPU most of a step is the acoustic decoder and the "
        "semantic encoder, convolutions whose cost grows with the rows, and the 10 "
        "diffusion-head calls), and a burst of mixed lengths ends with its longest request "
        f"alone (mean rows in flight {burst['CB 4']['rows_mean']:.1f} of 4). On a GPU the "
        "per-row cost of a step is far smaller: `bench/bench_gpu_1p5b.py` measures it.",
        f"- Under Poisson arrivals at {d['poisson_load']:.0%} of batch-1 capacity every mode "
        "keeps up on average, so audio s/s is near the offered load (a run ends with its "
        "last request, latest at batch 1, whose queue drains last); latency is what differs: "
        f"p99 {poisson['CB 4']['latency_p99_s']:.1f} s with CB 4 against "
        f"{poisson['batch 1']['latency_p99_s']:.1f} s at batch 1 (a queue of long requests "
        "in front of a short one) and "
        f"{poisson['static 4']['latency_p99_s']:.1f} s with static batches.",
        "- A newcomer joins at the next step boundary and makes its first audio in that "
        "step (prefill and first decode together): its wait is the rest of the step in "
        "progress plus its own join step, under two steps.",
    ]
    return out


# ---- in the record (bench/report.py assembles the sections) ---------------


def target_rows(d: dict) -> list[list[str]]:
    """This section's rows of the record's targets table."""
    return [[what, got, common.verdict(ok)] for what, got, ok in targets(d)]


def section(sec, img_dir=None, rel="", planned: bool = True) -> list[str]:
    out = ["## 4. The real model, tiny, on CPU", ""]
    if sec is None and not planned:
        return out + ["Not run in this run (`--only`).", ""]
    if sec is None:
        return out + ["the tiny-model section did not run.", ""]
    if "data" not in sec:
        return out + common.failed("tiny", sec)
    table_lines = [ln for ln in sec["stdout"].splitlines() if ln.startswith("|")]
    other = [ln for ln in sec["stdout"].splitlines() if ln.strip() and not ln.startswith("|")]
    out += ["`python -m bench.tiny.run` (its own table, as it prints it):", ""]
    for line in other[:5]:  # each its own paragraph
        out += [line, ""]
    out += table_lines + [""]
    out += reading(sec["data"]) + [""]
    return out
