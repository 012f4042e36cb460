"""Run every benchmark, then rewrite docs/PERFORMANCE.md and docs/img/*.png.

    make bench                     (= python -m bench)
    python -m bench --quick --doc /tmp/perf.md --img-dir /tmp/img   (development)
    python -m bench --render-from DIR   (the record again, from a --keep DIR)

Each section runs in its own process (its own pool, nothing left over for the
next) and leaves its figures as JSON in a temporary folder; bench/report.py
turns them into the record, with the machine, the date and the command. Each
section is a package: `run.py` measures (`python -m bench.<section>.run --out
FILE`), `record.py` writes its part of the record from the figures.

    scheduling/   policies against the central-queue bound
    overhead/     zero-work latency, decisions/s, HTTP against a bare handler
    recovery/     SIGKILLs at 80% load: lost, duplicated, detection, re-dispatch
    respawn/      SIGKILL a tiny-model worker: kill to ready, zygote against spawn
    resume/       SIGKILL at 80% of a long row: resumed from its history against replayed
    tiny/         the real tiny model on CPU
    shape/        the step engine's shape (issue 22): dispatches, host syncs, the LM's host time, CB against generate
    upsample/     the decoder's upsampling at 1.5B widths: transformers' conv against conv_stacks
    tempo/        OpenAI's speed: the stretch's cost per second of audio, whole and streamed
    longrow/      a row's host cost by its length: the worker's step, the parent's stream and job
    ray_peer/     Ray Serve beside the pool

bench_gpu_1p5b.py needs a GPU and is listed, not run. A failed section is
recorded as failed and the script exits non-zero after writing the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

SECTIONS = (  # name, the module that measures it, its time limit in seconds
    ("scheduling", "bench.scheduling.run", 900),
    ("overhead", "bench.overhead.run", 600),
    ("recovery", "bench.recovery.run", 900),
    ("respawn", "bench.respawn.run", 600),
    ("resume", "bench.resume.run", 600),
    ("tiny", "bench.tiny.run", 900),
    ("shape", "bench.shape.run", 600),
    ("upsample", "bench.upsample.run", 300),
    ("tempo", "bench.tempo.run", 120),
    ("longrow", "bench.longrow.run", 300),
    ("ray", "bench.ray_peer.run", 900),
)
BUDGET_S = 15 * 60


def run_section(name: str, module: str, timeout: int, tmp: Path, quick: bool) -> dict:
    out = tmp / f"{name}.json"
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", module, "--out", str(out)]
    if quick and name != "tiny":
        cmd.append("--quick")
    print(f"== {name}: python -m {module}", flush=True)
    t = time.monotonic()
    stdout_lines: list[str] = []
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=common.ROOT)
        try:
            for line in proc.stdout:
                stdout_lines.append(line)
                if name != "tiny":
                    print(f"   {line.rstrip()}", flush=True)
            proc.wait(timeout=max(1, timeout - (time.monotonic() - t)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t
    result = {
        "name": name,
        "seconds": seconds,
        "rc": proc.returncode,
        "stdout": "".join(stdout_lines),
    }
    if proc.returncode == 0 and out.exists():
        result["data"] = common.load_json(out)
    else:
        tail = log.read_text().splitlines()[-15:]
        result["error"] = "\n".join(tail) or f"exit code {proc.returncode}"
        print(f"   FAILED (exit {proc.returncode}):\n   " + "\n   ".join(tail), flush=True)
    print(f"   {name}: {seconds:.0f} s", flush=True)
    return result


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=common.ROOT,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "vibevoice_pool", "workers"],
            capture_output=True,
            text=True,
            cwd=common.ROOT,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, for development")
    ap.add_argument("--only", action="append", help="run only this section (repeatable)")
    ap.add_argument("--doc", default=str(common.ROOT / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--img-dir", default=str(common.ROOT / "docs" / "img"))
    ap.add_argument("--keep", metavar="DIR", help="keep each section's JSON and log in DIR")
    ap.add_argument(
        "--render-from", metavar="DIR", help="only rewrite the record from a --keep DIR"
    )
    args = ap.parse_args(argv)
    if args.render_from:
        saved = common.load_json(Path(args.render_from) / "run.json")
        return write_record(saved["info"], saved["sections"], args)

    t_start = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc)
    info = {
        "machine": common.machine(),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "revision": git_revision(),
        "load_before": common.load_average(),
        "quick": args.quick,
        "only": args.only or [],
    }
    sections = {}
    with tempfile.TemporaryDirectory(prefix="vvp-bench-") as tmp:
        where = Path(args.keep) if args.keep else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        for name, module, timeout in SECTIONS:
            if args.only and name not in args.only:
                continue
            sections[name] = run_section(name, module, timeout, where, args.quick)
        info["load_after"] = common.load_average()
        info["seconds"] = time.monotonic() - t_start
        if args.keep:
            common.save_json(where / "run.json", {"info": info, "sections": sections})
    return write_record(info, sections, args)


def write_record(info: dict, sections: dict, args) -> int:
    from bench import report

    img_dir = Path(args.img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    doc = report.render(info, sections, img_dir, Path(args.doc))
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(doc)
    total = info["seconds"]
    print(
        f"wrote {Path(args.doc).name} and its plots; the benchmarks took {total / 60:.1f} min "
        f"({'within' if total <= BUDGET_S else 'OVER'} the 15 minute budget)"
    )
    return 0 if all("data" in s for s in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
