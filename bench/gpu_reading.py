"""The reading of a GPU run: what its figures say, beside the run before it.

bench/gpu_record.py writes docs/PERFORMANCE.md's GPU section from the saved runs
(docs/gpu/*.json); this module holds the bullets that read one run (the engine against
the run before, the pool's 1 worker against 2, the respawn and its parts, who holds
the CUDA driver and GPU memory) and the settings the newest run sets. In: a run's
dict as gpu_record loads it; out: Markdown lines. Every figure comes from the dict.
"""

from __future__ import annotations

VLLM_OMNI_C4 = 7.0  # audio s per wall s at 4 concurrent, one H100 (their author's figure)
TARGETS = {"rows4": 15.0, "rows16": 60.0, "first_audio_ms": 300.0, "kill_to_ready_s": 5.0}


def row(a: dict, rows: int, lengths: str = "fixed") -> dict | None:
    return next(
        (r for r in a.get("rows", []) if r["rows"] == rows and r["lengths"] == lengths), None
    )


def pool_runs(d: dict) -> list[dict]:
    return [r for r in (d.get("c_pool") or {}).get("runs", []) if "burst" in r]


def kill_of(d: dict) -> dict | None:
    return next((r["kill"] for r in pool_runs(d) if "kill" in r), None)


def _pairs(prev: dict, d: dict) -> list[str]:
    out = []
    for n in (1, 4, 8, 16, 32):
        old, new = row(prev.get("a_eager") or {}, n), row(d.get("a_eager") or {}, n)
        if old and new:
            out.append(
                f"{old['ms_per_step']:.0f} -> {new['ms_per_step']:.0f} ms per step and "
                f"{old['decode_audio_s_per_s']:.2f} -> {new['decode_audio_s_per_s']:.2f} "
                f"audio s/s at {n} row{'s' if n > 1 else ''}"
            )
    return out


def engine(label: str, d: dict, prev: tuple[str, dict] | None) -> list[str]:
    a = d.get("a_eager") or {}
    r1, r4, r16, r32 = row(a, 1), row(a, 4), row(a, 16), row(a, 32)
    out = []
    if r1 and r4:
        out.append(
            f"- **Beside vLLM-Omni** (their author's figures, one H100): about "
            f"{VLLM_OMNI_C4:g} audio s/s at 4 concurrent and RTF 0.30 at batch 1 eager. "
            f"{label}: {r4['decode_audio_s_per_s']:.2f} audio s/s at 4 rows "
            f"({r4['decode_audio_s_per_s'] / VLLM_OMNI_C4:.2f}x theirs) and RTF "
            f"{r1['rtf']:.2f} at 1 row."
        )
    if prev and _pairs(prev[1], d):
        p16 = row(prev[1].get("a_eager") or {}, 16) or {}
        out.append(
            f"- **{label} against {prev[0]}** (one LM forward for both branches, one host "
            f"sync per step): {'; '.join(_pairs(prev[1], d))}. Per step at 16 rows: "
            f"{p16.get('ops_per_step')} -> {(r16 or {}).get('ops_per_step')} operators, "
            f"{p16.get('host_syncs_per_step')} -> {(r16 or {}).get('host_syncs_per_step')} "
            f"host syncs, {p16.get('h2d_copies_per_step')} -> "
            f"{(r16 or {}).get('h2d_copies_per_step')} host-to-GPU copies."
        )
    if r4 and r16:
        steps = [r["ms_per_step"] for r in a["rows"]]
        ops = r16.get("ops_per_step", 0)
        at32 = f", {r32['ms_per_step']:.0f} ms at 32" if r32 else ""
        kinds = ", ".join(f"{v} {k}" for k, v in r16.get("sync_kinds", {}).items())
        out.append(
            f"- **The host is the bottleneck, not the GPU.** A step costs "
            f"{min(steps):.0f}-{max(steps):.0f} ms whatever the row count "
            f"({r4['ms_per_step']:.0f} ms at 4 rows, {r16['ms_per_step']:.0f} ms at 16{at32}; "
            f"the 1-row run came first, at {r1['ms_per_step'] if r1 else 0:.0f} ms), so audio "
            f"per second grows almost in proportion to the rows. Each step dispatches about "
            f"{ops:,} operators (on the GPU each is a kernel launch; a few, such as each row's "
            f"noise drawn from its own CPU generator, run on the host): "
            f"{1000 * r16['ms_per_step'] / ops:.0f} us of host time per operator at 16 rows, "
            f"with {r16.get('host_syncs_per_step')} host syncs ({kinds}) and "
            f"{r16.get('h2d_copies_per_step')} copies of host lists to the GPU. Fewer syncs "
            "alone do not close the gap: the launches must go (CUDA graphs over the whole "
            "decode step, fused kernels). The targets at 4 and 16 rows are out of reach by "
            f"{TARGETS['rows4'] / r4['decode_audio_s_per_s']:.1f}x and "
            f"{TARGETS['rows16'] / r16['decode_audio_s_per_s']:.1f}x."
        )
    comp = d.get("a_compiled")
    if comp and comp.get("rows"):
        pairs = [
            f"{r['ms_per_step']:.0f} against {row(a, r['rows'])['ms_per_step']:.0f} ms at "
            f"{r['rows']}"
            for r in comp["rows"]
            if row(a, r["rows"])
        ]
        out.append(
            "- **Compiling the diffusion head** (`head_compile: reduce-overhead`, CUDA graphs) "
            f"did not pay on {label}'s engine: {'; '.join(pairs)} rows (compiled against "
            "eager). The head is a small part of the step's dispatches."
        )
    m16 = row(a, 16, "mixed")
    if m16 and r16:
        out.append(
            f"- **Mixed lengths** give less: {m16['decode_audio_s_per_s']:.2f} audio s/s at 16 "
            f"rows against {r16['decode_audio_s_per_s']:.2f} fixed, because rows leave as they "
            "end and no new row joins in this benchmark. In the pool, waiting requests fill "
            "the freed rows."
        )
    if r16:
        out.append(
            f"- **Memory is not the limit**: the peak per row is about "
            f"{r16.get('peak_mem_per_row_mib', 0):.0f} MiB for a {a.get('prompt_tokens')}-token "
            f"prompt and {a.get('new_tokens')} audio tokens; the weights take about 5.4 GB of "
            "the card's 141 GB."
        )
    return out


def pool(d: dict) -> list[str]:
    pool = {r["workers"]: r for r in pool_runs(d)}
    out = []
    if 1 in pool and 2 in pool:
        one, two = pool[1]["burst"], pool[2]["burst"]
        warm16 = row(d.get("a_eager") or {}, 16) or {}
        out.append(
            f"- **Two workers on the one GPU beat one**: {two['audio_s_per_s']:.2f} against "
            f"{one['audio_s_per_s']:.2f} audio s/s ({two['audio_s_per_s'] / one['audio_s_per_s']:.2f}x), "
            f"latency p50 {two['latency_p50_s']:.2f} against {one['latency_p50_s']:.2f} s, p99 "
            f"{two['latency_p99_s']:.2f} against {one['latency_p99_s']:.2f} s, first audio p50 "
            f"{two['first_audio_p50_s']:.2f} against {one['first_audio_p50_s']:.2f} s. A step "
            "is bound by one Python thread launching kernels; two workers' launches overlap on "
            "the GPU. The burst's audio per second is below the engine's at 16 rows because "
            f"its requests are short ({min(one['lengths_s']):g}-{max(one['lengths_s']):g} s), "
            "rows leave as they end, and the first step of a batch of a new size is slow: the "
            "warm-up request was one row per worker, and the engine part's first 16-row step "
            f"took {1000 * warm16.get('first_audio_s_warmup_run', 0):.0f} ms against "
            f"{1000 * warm16.get('first_audio_s', 0):.0f} ms once warm."
        )
    return out


def respawn(d: dict) -> list[str]:
    b, k, out = d.get("b_respawn") or {}, kill_of(d), []
    w = b.get("worker")
    if k and w:
        ev = k["events_after_kill_s"]
        out.append(
            f"- **Kill-to-ready {k['kill_to_ready_s']:.2f} s**: the supervisor saw the worker "
            f"dead {1000 * ev.get('dead', 0):.0f} ms after the SIGKILL and started a new one "
            f"at once ({'spawned' if 'spawned' in ev else 'forked'}); its boot took "
            f"{k['engine_load_s']:.1f} s. Its parts, from the respawn part: CUDA init "
            f"{w['cuda_init_s']:.2f} s, the weight copy {w['copy_s']:.2f} s "
            f"({w['weight_bytes'] / 1e9:.2f} GB from the weights held in memory, "
            f"{w['copy_gb_per_s']:.1f} GB/s), the engine's whole load() {w['engine_load_s']:.1f} "
            "s in a process that has imported torch and started CUDA; the rest of the boot "
            f"(~{k['engine_load_s'] - w['engine_load_s']:.1f} s) is a spawned worker's own "
            "start (imports, CUDA init). So the target is missed twice over: the load() "
            "(the processor, from_pretrained on the CPU, then `.to(cuda)`) takes "
            f"{w['engine_load_s'] - w['copy_s']:.1f} s beyond the raw copy (the fix to try: "
            "load straight onto the GPU), and the worker spawns instead of forking from the "
            "warm zygote (below). The requests in flight were sent back to the queue "
            f"({k['requeued']} requeued) and all finished."
        )
    zyg, probe = b.get("zygote_cuda_mappings"), b.get("cuda_touch_probe") or {}
    if w and zyg is not None:
        first = probe.get("first_calls", {}).get("is_available", "")
        where = [ln.strip() for ln in first.splitlines() if ln.strip().startswith("File")]
        src = where[-3].split('"')[1].split(">/", 1)[-1] if len(where) >= 3 else "?"
        held = b.get("gpu_memory_holders") or {}
        mem = [r.get("memory", {}) for r in pool_runs(d)]
        parent = mem[0].get("parent_cuda_mappings") if mem else None
        out.append(
            "- **Hands off CUDA.** nvidia-smi listed only workers as holders (the respawn "
            f"part's worker: {', '.join(f'pid {k}, {v} MiB' for k, v in held.items())}; the "
            "pool runs above). The "
            f"zygote, after its imports with PYTORCH_NVML_BASED_CUDA_CHECK="
            f"{probe.get('env_nvml_check')}, maps {', '.join(f'`{p}`' for p in zyg)} but no "
            "/dev/nvidia* file, where run 1's had /dev/nvidia0 and /dev/nvidiactl (the "
            "driver library loaded, seemingly not initialised); its first "
            f"CUDA query comes from `{src}` at import (diffusers' device detection, "
            "`torch.accelerator.is_available()`). The parent's check counts the library as "
            "the driver loaded, so every worker spawned (zygote usable: "
            f"{b.get('zygote_usable')}). The parent maps {', '.join(f'`{x}`' for x in parent or [])} "
            "(NVML, which the pool asks for the GPUs, opens /dev/nvidiactl; what loaded "
            "libcuda.so there was not traced) and holds no GPU memory. Since: a probe on the "
            "same card (`bench/gpu_zygote_probe.py`, 28 s, 18:50 UTC) imported the zygote's "
            "preload without diffusers: libcuda.so mapped, no /dev/nvidia* file, CUDA not "
            "initialised, and a child forked from it ran CUDA work (first call 0.53 s). So "
            "the parent now counts only the device files, and with a CUDA build of torch the "
            "zygote leaves diffusers to the worker. A forked respawn of the 1.5B worker is "
            "not yet measured."
        )
    return out


def run1(d: dict) -> list[str]:
    """What a run whose workers could not start CUDA did and did not show."""
    b, out = d.get("b_respawn") or {}, []
    errors = [r for r in (d.get("c_pool") or {}).get("runs", []) if "error" in r]
    if any("re-initialize CUDA" in r["error"] for r in errors):
        out.append(
            "- **The zygote touched CUDA.** After its imports the zygote had the CUDA driver "
            f"and the GPU device files mapped and {b.get('zygote_threads', '?')} threads, so "
            'every worker forked from it failed to boot with "Cannot re-initialize CUDA in '
            'forked subprocess": no respawn or pool figure. On a CPU build of torch none of '
            "this shows. Fixed for the next run: PYTORCH_NVML_BASED_CUDA_CHECK=1 before torch "
            "loads, and the parent spawns the workers when the zygote has the driver mapped."
        )
    if b.get("zygote_warm_s") and "worker" not in b:
        out.append(
            f"- The respawn part measured the zygote's imports, {b['zygote_warm_s']:.1f} s, "
            f"and holding the 1.5B weights in memory, {b['hold_s']:.1f} s for "
            f"{b['held_bytes'] / 1e9:.2f} GB."
        )
    out += [f"- Pool with {r['workers']} worker(s): {r['error']}." for r in errors]
    return out


def settings(labelled: list[tuple[str, dict]]) -> list[str]:
    label, d = labelled[-1]
    pool = {r["workers"]: r for r in pool_runs(d)}
    out = ["### The settings this sets (`configs/vibevoice-1.5b.yaml`)", ""]
    if 1 in pool and 2 in pool:
        one, two = pool[1], pool[2]
        n = 2 if two["burst"]["audio_s_per_s"] > one["burst"]["audio_s_per_s"] else 1
        rows = pool[n]["rows_per_worker"]
        bigs = [row(x.get("a_eager") or {}, 32) for _, x in labelled]
        big = next((r for r in bigs[::-1] if r), None)
        out.append(
            f"- `workers_per_gpu: {n}`: {pool[n]['burst']['audio_s_per_s']:.2f} against "
            f"{pool[3 - n]['burst']['audio_s_per_s']:.2f} audio s/s and the lower p50, p99 "
            f"and first audio in {label}'s pool burst; a worker holds about "
            f"{max((pool[n]['memory'].get('holders_mib') or {'-': 0}).values()) / 1024:.1f} GiB."
        )
        out.append(
            f"- `max_batch_size: {rows}`: the rows per worker the pool ran ({n * rows} rows per "
            "GPU); a step at 16 rows costs about what one at 4 does"
            + (
                f", and 32 rows in one worker made {big['decode_audio_s_per_s']:.2f} audio s/s "
                "in the first run"
                if big
                else ""
            )
            + ". 32 rows per worker with two workers was not measured."
        )
    comp = next((x for _, x in labelled if x.get("a_compiled")), None)
    if comp:
        out.append(
            '- `head_compile: ""` (eager): the compiled head measured no faster (first run); '
            "not measured again on the new engine."
        )
    return out + [""]
