"""Every GPU measurement in one call, ordered by value, inside one time budget.

A lent GPU comes for minutes: this runs the GPU benchmarks one after the other as
subprocesses, each with its own time limit cut from what is left of `--budget-s`,
writes each one's JSON into `--out` as it goes and the whole output into
`--out`/log, so a run stopped at its limit still returns what was measured:

    env          nvidia-smi, Python and the package versions
    a_eager      bench_gpu_1p5b.py: 1, 4, 8, 16, 32 rows, fixed then mixed lengths, at
                 each row count engine_mode eager, graphs and graphs-lm in turn (the
                 summary says whether each run kept its graphs)
    b_respawn    gpu_respawn.py: builds the full-size random folder, CUDA init and the
                 weight copy in a worker forked from the zygote, who holds GPU memory
    c_pool       gpu_pool.py: the Pool on the one GPU, 1 worker against 2, a SIGKILL
                 mid-batch, nvidia-smi during the burst (uses b's folder); the
                 engine's default engine_mode, auto (graphs on a GPU), recorded
    a_compiled   bench_gpu_1p5b.py with the diffusion head compiled (CUDA graphs), with
                 what time is left

    python bench/gpu_all.py --out results/ --budget-s 400      # on the GPU
    python bench/gpu_all.py --out /tmp/dry --tiny               # the same path on CPU
    python bench/gpu_all.py --out results/ --model large        # VibeVoice-Large's shape
    python bench/gpu_all.py --out results/ --budget-s 250 --parts respawn,pool,engine \
        --engine-rows 1,4,16,32 --engine-lengths fixed --pool-rows 16 --pool-lengths 1,2,3,4

`--parts` picks the parts and their order (a part's limit keeps time for those after it).

It ends with a short summary of every part (what a reply that keeps only the end of
the output needs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PY = sys.executable


class Log:
    def __init__(self, path: Path):
        self.f = path.open("a", buffering=1)

    def __call__(self, line: str) -> None:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
        self.f.write(line if line.endswith("\n") else line + "\n")


def run_part(name: str, cmd: list[str], limit_s: float, log: Log) -> dict:
    """Run one part in its own process group, its output into the log; kill the group
    at `limit_s`."""
    log(f"=== {name}: {' '.join(cmd)} (limit {limit_s:.0f} s)")
    t0 = time.monotonic()
    if limit_s < 5:
        log(f"=== {name}: skipped, {limit_s:.0f} s left")
        return {"name": name, "skipped": True}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    timed_out = False
    deadline = t0 + limit_s
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if sel.select(timeout=min(1.0, left)):
            line = proc.stdout.readline()
            if not line:
                break
            if "it/s]" in line or "s/it]" in line:  # progress bars
                continue
            log(f"[{name} {time.monotonic() - t0:5.0f}s] {line.rstrip()}")
    rc = proc.wait()
    sel.close()
    wall = time.monotonic() - t0
    log(f"=== {name}: rc {rc}{' (time limit)' if timed_out else ''} in {wall:.0f} s")
    return {"name": name, "rc": rc, "timed_out": timed_out, "wall_s": round(wall, 1)}


def env_info(out: Path, log: Log) -> None:
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "diffusers", "pydantic", "numpy", "huggingface_hub"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # a missing package is a finding here
            info[mod] = f"missing: {type(e).__name__}"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit"
        r = subprocess.run(
            [smi, f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["gpu"] = r.stdout.strip() or r.stderr.strip()
    info["cpus"] = os.cpu_count()
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"env: {json.dumps(info)}")


def best_rows(a_json: Path, cap: int) -> int:
    """The row count (<= cap) with the most audio per second, fixed lengths, eager."""
    try:
        rows = json.loads(a_json.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return cap
    fixed = [r for r in rows if r["lengths"] == "fixed" and r["rows"] <= cap]
    if not fixed:
        return cap
    return max(fixed, key=lambda r: r["decode_audio_s_per_s"])["rows"]


def summary(out: Path, parts: list[dict], log: Log) -> None:
    def load(name):
        try:
            return json.loads((out / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    log("\n=== SUMMARY")
    for p in parts:
        log(f"part {p['name']}: {json.dumps(p)}")
    for name in ("a_eager", "a_compiled"):
        a = load(name)
        if not a:
            continue
        log(
            f"{name}: {a.get('device')} torch {a.get('torch')} transformers {a.get('transformers')}"
        )
        log(
            "rows len   mode      compile ms/step dec_aud_s/s whole_aud_s/s first_audio_ms ops syncs "
            "h2d MiB/row graphs_kept lm_graphs_kept/made audio_vs_eager"
        )
        for r in a["rows"]:
            log(
                f"{r['rows']:>3} {r['lengths']:<5} {r.get('engine_mode', 'eager'):<9} "
                f"{r['compile']:<15} {r['ms_per_step']:7.1f} "
                f"{r['decode_audio_s_per_s']:8.2f} {r['audio_s_per_s']:8.2f} "
                f"{1000 * (r['first_audio_s'] or 0):6.0f} {r.get('ops_per_step', '-')} "
                f"{r.get('host_syncs_per_step', '-')} {r.get('h2d_copies_per_step', '-')} "
                f"{r.get('peak_mem_per_row_mib', '-')} {r.get('graphs_kept', '-')} "
                f"{r.get('lm_graphs_kept', '-')}/{r.get('lm_graphs_made', '-')} "
                f"{r.get('audio_vs_eager', '-')}"
            )
        for c in a.get("lm_host", []):
            log(f"{name} LM forward: {json.dumps(c)}")
        if a.get("skipped"):
            log(f"{name} skipped: {a['skipped']}")
    b = load("b_respawn")
    if b:
        w = b.get("worker", {})
        keys = ("cuda_init_s", "map_s", "copy_s", "copy_gb_per_s", "engine_load_s")
        log(
            f"b_respawn: zygote warm {b.get('zygote_warm_s')}, zygote CUDA maps "
            f"{b.get('zygote_cuda_mappings')} / after {b.get('zygote_cuda_mappings_after')}, "
            f"hold {b.get('hold_s')} s; worker { ({k: w.get(k) for k in keys}) }; holders "
            f"{b.get('gpu_memory_holders')} only workers: {b.get('only_workers_hold_gpu_memory')}"
            f"{' ERROR ' + b['error'] if 'error' in b else ''}"
        )
    c = load("c_pool")
    if c:
        log(f"c_pool engine_mode {c.get('settings', {}).get('engine_mode', 'auto')}")
        for run in c.get("runs", []):
            bu = run.get("burst", {})
            mem = run.get("memory", {})
            brief = {k: v for k, v in bu.items() if k != "requests_detail"}
            log(
                f"c_pool {run.get('workers')} worker(s): start {run.get('start_to_ready_s')} s; {brief}"
            )
            log(
                f"  memory: holders {mem.get('holders_mib')} workers {mem.get('worker_pids')} "
                f"parent {mem.get('parent_pid')} zygote {mem.get('zygote_pid')} only workers "
                f"{mem.get('only_workers')}; parent maps {mem.get('parent_cuda_mappings')} "
                f"zygote maps {mem.get('zygote_cuda_mappings')}"
            )
            if "kill" in run:
                k = {x: v for x, v in run["kill"].items() if x != "requests"}
                log(f"  kill: {k}")
            if "error" in run:
                log(f"  ERROR {run['error']}")


PARTS = ("engine", "respawn", "pool", "compiled")
# each part: the most it may take, and the least kept for it while earlier parts run.
# The engine part runs each row count in eager, graphs and graphs-lm (issue 22's
# question): about 13 s a run on an H200 (Run 2: 9 s for 48 tokens, the warm-up run
# beside it), 15 runs at fixed lengths, the model's build and the LM forward both ways
# before them: some 230 s before the mixed lengths.
CAP_S = {"engine": 330, "respawn": 120, "pool": 150, "compiled": 600}
# (Run 2 spent about 200 of its 240 s on the respawn and pool parts together)
KEEP_S = {"engine": 60, "respawn": 90, "pool": 120, "compiled": 0}


def large_budget_mb() -> float:
    """Each worker's KV budget in configs/vibevoice-large.yaml, which the pool part keeps."""
    import yaml

    return yaml.safe_load((BENCH.parent / "configs" / "vibevoice-large.yaml").read_text())[
        "mem_budget_mb"
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files and the log")
    ap.add_argument("--budget-s", type=float, default=400.0, help="for every part together")
    ap.add_argument("--tiny", action="store_true", help="the dry run: tiny model, CPU")
    ap.add_argument("--model", choices=("1.5b", "large"), default="1.5b", help="the shape")
    ap.add_argument("--tokens", type=int, default=48, help="audio tokens per row in part a")
    ap.add_argument("--work", default=None, help="where the full-size folder goes")
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"which parts, in this order ({', '.join(PARTS)})"
    )
    ap.add_argument("--engine-rows", default=None, help="default 1,4,8,16,32 (tiny: 1,4)")
    ap.add_argument("--engine-lengths", default="fixed,mixed", help="fixed, mixed or both")
    ap.add_argument("--pool-rows", type=int, default=0, help="0: the engine's best (<= 16)")
    ap.add_argument("--pool-lengths", default=None, help="audio s per request, in turn")
    args = ap.parse_args(argv)
    order = [x for x in args.parts.split(",") if x]
    unknown = set(order) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log")
    t0 = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp(prefix="vvp-gpu-"))
    state = {"model": work / ("tiny" if args.tiny else f"vv-{args.model}")}

    def left(reserve: float = 0.0) -> float:
        return args.budget_s - (time.monotonic() - t0) - reserve

    a = [PY, str(BENCH / "bench_gpu_1p5b.py"), "--new-tokens", str(args.tokens)]
    a += ["--model", args.model]
    a += ["--tiny", "--cache-dir", str(work)] if args.tiny else []
    rows = args.engine_rows or ("1,4" if args.tiny else "1,4,8,16,32")

    def engine(limit: float) -> list[str]:  # eager; stops starting runs well inside its limit
        inner = max(5.0, limit - (20 if args.tiny else 30))
        return (
            a
            + ["--rows", rows, "--compile-modes", "", "--lengths", args.engine_lengths]
            + [
                "--budget-s",
                f"{inner:.0f}",
                "--out",
                str(out / "a_eager.json"),
            ]
        )

    def respawn(limit: float) -> list[str]:  # the folder, CUDA init, weight copy, holders
        b = [PY, str(BENCH / "gpu_respawn.py"), "--out", str(out / "b_respawn.json")]
        if args.tiny:
            return b + ["--tiny", str(work), "--gpu", "-1"]
        return b + ["--build-full-size", str(state["model"]), "--shape", args.model]

    def pool(limit: float) -> list[str]:  # 1 worker against 2, SIGKILL mid-batch, holders
        if args.tiny:  # gpu_respawn made the tiny model under work/
            state["model"] = next(work.glob("vibevoice-tiny-*"), state["model"])
        n = args.pool_rows or best_rows(out / "a_eager.json", 4 if args.tiny else 16)
        c = [PY, str(BENCH / "gpu_pool.py"), "--model", str(state["model"]), "--rows", str(n)]
        c += ["--kill", "--out", str(out / "c_pool.json")]
        # the Large: its config's KV budget per worker; two workers load 2 x 17.4 GiB
        c += ["--timeout", "90"] if args.model == "1.5b" else ["--timeout", "240"]
        c += ["--mem-budget-mb", str(large_budget_mb())] if args.model == "large" else []
        c += ["--requests", "4" if args.tiny else "16"]
        lengths = args.pool_lengths or ("1,2" if args.tiny else None)
        return c + (["--lengths", lengths] if lengths else []) + (["--tiny"] if args.tiny else [])

    def compiled(limit: float) -> list[str]:  # the head compiled (CUDA graphs per row count)
        comp = a + ["--rows", rows, "--compile-modes", "reduce-overhead", "--lengths", "fixed"]
        comp += ["--compiled-rows", "1,4" if args.tiny else "1,4,16"]
        comp += ["--budget-s", f"{max(0.0, limit - 60):.0f}"]
        return comp + ["--out", str(out / "a_compiled.json")]

    build = {"engine": engine, "respawn": respawn, "pool": pool, "compiled": compiled}
    names = {"engine": "a_eager", "respawn": "b_respawn", "pool": "c_pool"}
    names["compiled"] = "a_compiled"
    env_info(out, log)
    parts = []
    for i, part in enumerate(order):
        keep = sum(KEEP_S[p] for p in order[i + 1 :])
        limit = min(CAP_S[part], left(keep))
        parts.append(run_part(names[part], build[part](limit), limit, log))
    summary(out, parts, log)
    log(f"=== all parts in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
