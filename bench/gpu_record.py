"""The record of a GPU run: docs/PERFORMANCE.md's GPU section from its saved JSON.

A GPU is lent now and then, not at every `make bench`: the figures of a run of
`bench/gpu_all.py` are kept in docs/gpu/<card>-<date>[-N].json (the parts' JSON files
together, with the date and the command), and `section(path)` turns the run at `path`
and every earlier run beside it into Markdown: each run's card, date, code and command,
the engine by row count run beside run, the pool (1 worker against 2), the respawn
after a SIGKILL and its parts, who holds GPU memory, the issue's targets met or missed
(and by how much) in each run, and the settings the newest run sets. bench/report.py
calls it (and `not_measured`), so the section survives a CPU-only `make bench`.

    python bench/gpu_record.py docs/gpu/h200-2026-12-04.json     # print the section
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__:
    from bench import gpu_reading as reading
    from bench.gpu_reading import TARGETS, kill_of, pool_runs, row
else:  # run as a script: bench/ is on the path
    import gpu_reading as reading
    from gpu_reading import TARGETS, kill_of, pool_runs, row

ROOT = Path(__file__).resolve().parents[1]


def runs(folder: Path = ROOT / "docs" / "gpu") -> list[Path]:
    """The saved runs, oldest first (by the date in the name, then the run number)."""
    return sorted(folder.glob("*.json"), key=lambda p: p.stem.split("-", 1)[-1])


def newest(folder: Path = ROOT / "docs" / "gpu") -> Path | None:
    found = runs(folder)
    return found[-1] if found else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _card(env: dict) -> tuple[str, str]:
    gpu = env.get("gpu", "").split(", ")
    name = gpu[0] if gpu else "?"
    if len(gpu) < 6:
        return name, env.get("gpu", "?")
    return name, (
        f"{name}, {gpu[1]}, driver {gpu[2]} (SM clock {gpu[3]} idle, {gpu[4]} max; "
        f"{gpu[5]} power limit)"
    )


def _meta(label: str, path: Path, d: dict) -> list[str]:
    env, a = d["env"], d.get("a_eager") or {}
    command = (
        d["command"]
        .replace("python3 bench/gpu_all.py", "`python3 bench/gpu_all.py")
        .replace(", the card", "`, the card", 1)
    )
    model = (
        f"VibeVoice-1.5B's architecture, random weights ({a.get('params', 0) / 1e6:,.0f} "
        f"M parameters), {a.get('dtype')}, SDPA, a sequence_bias on the audio token; "
        f"{a.get('diffusion_steps')} diffusion steps, cfg {a.get('cfg_scale')}; prompt "
        f"{a.get('prompt_tokens')} tokens with a {a.get('voice_s'):g} s voice; "
        f"{a.get('new_tokens')} audio tokens ({a.get('new_tokens', 0) * 0.1333:.1f} s) per row"
    )
    return [
        f"### {label}: {d['date']} ({d['run_wall_s']:.0f} s, `docs/gpu/{path.name}`)",
        "",
        *_table(
            ["", ""],
            [
                ["GPU", _card(env)[1]],
                ["date", d["date"]],
                ["command", command],
                ["code", d["what"]],
                [
                    "software",
                    f"Python {env['python']}, torch {env['torch']}, transformers "
                    f"{env['transformers']}, diffusers {env['diffusers']}, "
                    f"huggingface_hub {env['huggingface_hub']}",
                ],
                ["host", f"{env['cpus']} CPU cores, {env['platform']}"],
                ["model", model],
            ],
        ),
        "",
    ]


def _engine_table(labelled: list[tuple[str, dict]]) -> list[str]:
    rows = []
    for label, d in labelled:
        for part in (d.get("a_eager"), d.get("a_compiled")):
            for r in (part or {}).get("rows", []):
                rows.append(
                    [
                        label,
                        r["rows"],
                        r["lengths"],
                        r.get("engine_mode", "eager"),
                        r["compile"],
                        f"{r['ms_per_step']:.0f}",
                        f"{r['rtf']:.2f}",
                        f"**{r['decode_audio_s_per_s']:.2f}**",
                        f"{r['audio_s_per_s']:.2f}",
                        f"{1000 * r['first_audio_s']:.0f}",
                        r.get("ops_per_step", "-"),
                        r.get("host_syncs_per_step", "-"),
                        r.get("h2d_copies_per_step", "-"),
                        f"{r.get('peak_mem_per_row_mib', 0):.0f}",
                    ]
                )
    head = ["run", "rows", "lengths", "engine mode", "head compile", "ms/step", "RTF per row"]
    head += ["audio s/s (decode)", "audio s/s (whole run)", "first audio ms", "ops/step"]
    head += ["host syncs/step", "host-to-GPU copies/step", "peak MiB/row"]
    return _table(head, rows)


def _lm_table(labelled: list[tuple[str, dict]]) -> list[str]:
    rows = [
        [label, c["rows"], f"{c['transformers_ms']:.1f}", f"{c['decode_lm_ms']:.1f}"]
        + [f"{c['ratio']:.2f}x"]
        for label, d in labelled
        for c in (d.get("a_eager") or {}).get("lm_host", [])
    ]
    if not rows:
        return []
    head = ["run", "rows", "transformers' forward (ms)", "decode_lm (ms)", "ratio"]
    return [
        "### The LM's decode forward, both ways (`bench/lm_host.py`)",
        "",
        "The same decode steps, each forward timed between two CUDA synchronizes, the "
        "order alternating; the median of 12 steps.",
        "",
        *_table(head, rows),
        "",
    ]


def _pool_table(d: dict) -> list[str]:
    rows = []
    for run in pool_runs(d):
        b, mem = run["burst"], run.get("memory", {})
        holders = ", ".join(f"{p}: {m} MiB" for p, m in (mem.get("holders_mib") or {}).items())
        rows.append(
            [
                f"{run['workers']} x {run['rows_per_worker']} rows",
                f"{run['start_to_ready_s']:.1f}",
                f"{b['ok']}/{b['requests']}",
                f"**{b['audio_s_per_s']:.2f}**",
                f"{b['latency_p50_s']:.2f} / {b['latency_p99_s']:.2f}",
                f"{b['first_audio_p50_s']:.2f} / {b['first_audio_p99_s']:.2f}",
                " / ".join(str(v) for v in b["per_worker"].values()),
                f"{holders or '-'} (workers {mem.get('worker_pids')}, parent "
                f"{mem.get('parent_pid')}): only workers {mem.get('only_workers')}",
            ]
        )
    head = ["workers x rows", "start to ready s", "ok", "audio s/s", "latency p50 / p99 s"]
    head += ["first audio p50 / p99 s", "requests per worker", "GPU memory (nvidia-smi)"]
    return _table(head, rows)


def _verdicts(d: dict) -> dict[str, tuple[str, str]]:
    """{target: (measured, verdict)} for one run; a target it did not measure is left out."""
    a, b = d.get("a_eager") or {}, d.get("b_respawn") or {}
    out: dict[str, tuple[str, str]] = {}
    for key, rows in (("rows4", 4), ("rows16", 16)):
        r = row(a, rows)
        if r:
            got, want = r["decode_audio_s_per_s"], TARGETS[key]
            short = f"**missed** by {want - got:.1f} ({want / got:.1f}x short)"
            out[key] = (f"{got:.2f}", "met" if got >= want else short)
    r1 = row(a, 1)
    if r1:
        ms, cold = 1000 * r1["first_audio_s"], 1000 * r1["first_audio_s_warmup_run"]
        ok = ms <= TARGETS["first_audio_ms"]
        out["first_audio_ms"] = (
            f"{ms:.0f} ms on a warm engine ({cold:.0f} ms for the engine's very first row)",
            "met" if ok else f"**missed** by {ms - TARGETS['first_audio_ms']:.0f} ms",
        )
    k = kill_of(d)
    if k:
        s = k["kill_to_ready_s"]
        out["kill_to_ready_s"] = (
            f"{s:.2f} s (a spawned worker; {len(k['requests'])} requests in flight, all done: "
            f"{k['all_done']})",
            "met" if s < TARGETS["kill_to_ready_s"] else f"**missed** by {s - 5:.1f} s",
        )
    seen = [b.get("only_workers_hold_gpu_memory")]
    seen += [r.get("memory", {}).get("only_workers") for r in pool_runs(d)]
    checks = [x for x in seen if isinstance(x, bool)]
    zyg = b.get("zygote_cuda_mappings")
    if checks:
        n = len(checks)
        out["holders"] = (
            f"nvidia-smi listed only workers in {sum(checks)} of {n} checks (respawn part, "
            "each pool run); the parent and the zygote held no GPU memory",
            "met" if all(checks) else "**missed**",
        )
    elif zyg:
        out["holders"] = (
            "the zygote had the CUDA driver loaded after its imports: "
            + ", ".join(f"`{p}`" for p in zyg)
            + " (whether it held memory too was not read: no worker got as far as nvidia-smi)",
            "**missed**",
        )
    return out


TARGET_NAMES = {
    "rows4": "at least 15 audio s/s at 4 rows",
    "rows16": "at least 60 audio s/s at 16 rows",
    "first_audio_ms": "first audio at 1 row within 300 ms",
    "kill_to_ready_s": "kill-to-ready under 5 s",
    "holders": "no GPU memory held by the parent or the zygote",
}


def _targets(labelled: list[tuple[str, dict]]) -> list[str]:
    per_run = [_verdicts(d) for _, d in labelled]
    head = ["target (issue 26)"]
    for label, _ in labelled:
        head += [f"{label}: measured", ""]
    rows = []
    for key, name in TARGET_NAMES.items():
        row = [name]
        for v in per_run:
            row += list(v.get(key, ("no figure", "**not measured**")))
        rows.append(row)
    return _table(head, rows)


def section(path: Path) -> list[str]:
    """Section 6 from the run at `path` and every earlier run in its folder."""
    path = Path(path)
    found = [
        p for p in runs(path.parent) if p.stem.split("-", 1)[-1] <= path.stem.split("-", 1)[-1]
    ]
    labelled = [(f"Run {i + 1}", json.loads(p.read_text())) for i, p in enumerate(found)]
    paths = {lab: p for (lab, _), p in zip(labelled, found, strict=True)}
    name = _card(labelled[-1][1]["env"])[0]
    out = [
        f"## 6. On a GPU: {name}",
        "",
        f"{len(labelled)} call(s) of `bench/gpu_all.py` on a lent machine, each kept in "
        "`docs/gpu/` and written here from that file (`bench/gpu_record.py`); the newest "
        "run last.",
        "",
    ]
    for label, d in labelled:
        out += _meta(label, paths[label], d)
    out += [
        "### The step engine by row count (`bench/bench_gpu_1p5b.py`)",
        "",
        "Rows admitted together and run to their end; ms/step and audio s/s (decode) after "
        "the first step; first audio from admission (prefill included); ops and syncs "
        "counted over one decode step with a TorchDispatchMode (views left out).",
        "",
        *_engine_table(labelled),
        "",
        *_lm_table(labelled),
    ]
    for label, d in labelled:
        skipped = [*(d.get("a_eager") or {}).get("skipped", [])]
        skipped += (d.get("a_compiled") or {}).get("skipped", [])
        if skipped:
            out += [f"{label}, not run (time budget): {', '.join(skipped)}.", ""]
    for label, d in labelled:
        if pool_runs(d):
            c = d["c_pool"]["settings"]
            out += [
                f"### The pool on the one GPU ({label}, `bench/gpu_pool.py`)",
                "",
                f"{c['requests']} requests submitted at once, {c['lengths']} s of audio in "
                "turn, after a one-row warm-up per worker; audio s/s over the burst (first "
                "submit to last finish); GPU memory read while the burst ran.",
                "",
                *_pool_table(d),
                "",
            ]
    out += ["### Targets", "", *_targets(labelled), ""]
    for i, (label, d) in enumerate(labelled):
        prev = labelled[i - 1] if i else None
        lines = reading.engine(label, d, prev) + reading.pool(d)
        lines += reading.respawn(d) + reading.run1(d)
        out += [f"### Reading {label}", "", *lines, ""]
    return out + reading.settings(labelled)


def not_measured(path: Path) -> list[str]:
    """What the newest GPU run left out, one Markdown bullet each."""
    d = json.loads(Path(path).read_text())
    a, b = d.get("a_eager") or {}, d.get("b_respawn") or {}
    out = []
    if a.get("skipped"):
        out.append(f"- On a GPU, the engine at {', '.join(a['skipped'])} (time budget).")
    if not any(r["lengths"] == "mixed" for r in a.get("rows", [])) or not d.get("a_compiled"):
        out.append("- On a GPU, mixed lengths and the compiled head on the newest engine.")
    if not any(r.get("engine_mode") == "graphs" for r in a.get("rows", [])):
        out.append(
            "- On a GPU: `engine_mode: graphs` (the diffusion loop and the audio decode "
            "captured as CUDA graphs) against eager."
        )
    if not any(r.get("engine_mode") == "graphs-lm" for r in a.get("rows", [])):
        out.append(
            "- On a GPU: `engine_mode: graphs-lm` (the LM's decode step captured too) "
            "against graphs: the measurement that decides whether the LM is captured."
        )
    if not a.get("lm_host"):
        out.append(
            "- On a GPU: the LM's decode forward, transformers' against `decode_lm` "
            "(`bench/lm_host.py`, part of the engine run since)."
        )
    if not kill_of(d):
        out.append("- On a GPU: kill-to-ready and the pool (1 worker against 2).")
    elif b.get("worker_forked") is False:
        out.append(
            "- On a GPU: a respawn forked from the zygote (every worker spawned: the zygote "
            "maps the CUDA driver library after its imports)."
        )
    return out


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:] or [str(newest())])[0])
    print("\n".join(section(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
