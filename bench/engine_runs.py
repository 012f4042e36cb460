"""What bench_gpu_1p5b.py runs, in order, and the table it prints of them."""

from __future__ import annotations

SAMPLE_RATE = 24000
HOP = 3200


def run_plan(args) -> list[tuple[str, str, str, int]]:
    """(engine mode, head compile, lengths, rows) of each run, in order: at each row
    count the engine modes in turn (a run stopped by the budget leaves them side by
    side), then the compiled head's runs (fixed lengths only: mixed lengths change the
    head's batch as rows leave, each new batch size a new capture inside the timing)."""
    modes = [e for e in args.engine_modes.split(",") if e]
    if set(modes) - {"eager", "graphs", "graphs-lm"}:
        raise SystemExit(f"--engine-modes {args.engine_modes}: of eager, graphs, graphs-lm")
    plan = []
    for lengths in args.lengths.split(","):
        for r in [int(x) for x in args.rows.split(",")]:
            if lengths == "mixed" and r == 1:
                continue  # one row: the same as fixed
            plan += [(e, "", lengths, r) for e in modes]
    counts = args.compiled_rows or args.rows
    for c in [c for c in args.compile_modes.split(",") if c]:
        plan += [("eager", c, "fixed", int(r)) for r in counts.split(",")]
    return plan


def audio_difference(got: list, want: list) -> float | None:
    """The largest difference between two runs' audio of one row (lists of chunks),
    relative to the peak of `want`: 0 where a mode computes what eager computes, float
    rounding where it sums in another order (graphs: padded buckets), far more where a
    captured graph computes something else after its checked replays. None without
    audio; the shorter length is compared."""
    import numpy as np

    a = np.concatenate(got) if got else np.zeros(0)
    b = np.concatenate(want) if want else np.zeros(0)
    n = min(len(a), len(b))
    if not n:
        return None
    peak = max(float(np.abs(b[:n]).max()), 1e-12)
    return round(float(np.abs(a[:n] - b[:n]).max()) / peak, 6)


def print_table(result: dict, args) -> None:
    mem = args.device.startswith("cuda")
    new = args.new_tokens
    print(
        f"\n{result['model']} ({result['params'] / 1e6:.1f} M params, {result['dtype']}) on "
        f"{result['device']}; {new} audio tokens ({new * HOP / SAMPLE_RATE:.2f} s) per row "
        f"(mixed: 0.5-1.5x), {args.steps} diffusion steps, cfg {args.cfg}\n"
    )
    head = (
        "| rows | lengths | engine mode | head compile | ms/step | RTF (per row) | audio s/s, decode | "
        "audio s/s, whole | first audio ms | ops/step | syncs/step |"
    )
    print(head + (" peak MiB per row |" if mem else ""))
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem else ""))
    for r in result["rows"]:
        line = (
            f"| {r['rows']} | {r['lengths']} | {r.get('engine_mode', 'eager')} | {r['compile']} | "
            f"{r['ms_per_step']:.1f} | "
            f"{r['rtf']:.3f} | {r['decode_audio_s_per_s']:.2f} | {r['audio_s_per_s']:.2f} | "
            f"{1000 * (r['first_audio_s'] or 0):.0f} | {r.get('ops_per_step', '-')} | "
            f"{r.get('host_syncs_per_step', '-')} |"
        )
        print(line + (f" {r['peak_mem_per_row_mib']:.0f} |" if mem else ""))
    if result.get("lm_host"):
        from bench.lm_host import table

        print("\nThe LM's decode forward, both ways:\n" + "\n".join(table(result["lm_host"])))
    if result["skipped"]:
        print(f"\nskipped (time budget): {', '.join(result['skipped'])}")
    print(
        "\nvLLM-Omni's VibeVoice-1.5B port, its author's figures on one H100: RTF 0.30 at batch "
        "1 eager, 0.19 with CUDA graphs, about 7 audio s/s at 4 concurrent."
    )
