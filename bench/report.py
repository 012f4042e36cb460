"""The performance record: docs/PERFORMANCE.md from the sections' figures.

`render(info, sections, img_dir, doc_path)` returns the Markdown: the machine,
the date, the command, a table of every target (met or missed, by how much),
each section's tables and plots, and for each missed target why, from the
measured figures. Each section's record module (bench/<section>/record.py) owns
its tables, plots, target checks and reading (`target_rows`, `section`); this
module only assembles them.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench import common, gpu_record
from bench.chaos import record as chaos_record
from bench.longrow import record as longrow
from bench.overhead import record as overhead
from bench.ray_peer import record as ray_peer
from bench.recovery import record as recovery
from bench.respawn import record as respawn
from bench.resume import record as resume
from bench.scheduling import record as scheduling
from bench.shape import record as shape
from bench.soak import record as soak_record
from bench.tempo import record as tempo
from bench.tiny import record as tiny
from bench.upsample import record as upsample

# the sections in the order of the record: (name in run_all, its record module)
SECTIONS = (
    ("scheduling", scheduling),
    ("overhead", overhead),
    ("recovery", recovery),
    ("respawn", respawn),
    ("resume", resume),
    ("tiny", tiny),
    ("shape", shape),
    ("upsample", upsample),
    ("tempo", tempo),
    ("longrow", longrow),
    ("ray", ray_peer),
)

GPU_SCRIPT = "bench_gpu_1p5b.py"


def render(info: dict, sections: dict, img_dir: Path, doc_path: Path) -> str:
    Path(img_dir).mkdir(parents=True, exist_ok=True)  # the plots' folder (with matplotlib)
    rel = os.path.relpath(img_dir, doc_path.parent)
    m = info["machine"]
    out = [
        "# Performance record",
        "",
        "Written by `make bench` (`python -m bench`); every figure below comes from "
        "the one run described here. Do not edit by hand: run it again.",
        "",
        common.table(
            ["", ""],
            [
                ["date", info["date"]],
                [
                    "command",
                    "`make bench`"
                    + (" (`--quick`: short development runs)" if info["quick"] else ""),
                ],
                ["code", f"commit {info['revision']}"],
                ["CPU", f"{m['cpu']}, {m['cores']} cores"],
                ["memory", f"{m['mem_gib']} GiB"],
                ["OS", m["os"]],
                [
                    "Python / torch",
                    f"{m['python']} / {m['torch']} (numpy {m['numpy']}, "
                    f"fastapi {m['fastapi']}, uvicorn {m['uvicorn']})",
                ],
                [
                    "load average (1, 5, 15 min)",
                    f"{_load(info['load_before'])} before; {_load(info['load_after'])} after",
                ],
                [
                    "duration of the whole run",
                    f"{info['seconds'] / 60:.1f} min "
                    f"({'within' if info['seconds'] <= 900 else '**over**'} the 15 min budget)",
                ],
            ],
        ),
        "",
        "The machine is shared: other processes (test suites, servers) run beside the "
        "benchmark, which is why the load average is shown. Timings on 2 shared cores move "
        "from run to run; ratios taken within one run (policy against the bound of the same "
        "run, pool against the bare handler in alternating rounds) move much less.",
        "",
    ]
    out += ["## Targets", "", _targets(sections), ""]
    for name, record in SECTIONS:
        if name == "tiny":
            planned = "tiny" in sections or not info.get("only")
            out += record.section(sections.get(name), img_dir, rel, planned=planned)
        else:
            out += record.section(sections.get(name), img_dir, rel)
    out += _not_run("ray" in sections)
    return "\n".join(out).rstrip() + "\n"


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "n/a"


def _targets(sections: dict) -> str:
    rows = []
    for name, record in SECTIONS:
        data = sections.get(name, {}).get("data")
        if data and hasattr(record, "target_rows"):
            rows += record.target_rows(data)
    for name, sec in sections.items():
        if "data" not in sec:
            rows.append([f"section `{name}`", "failed", "**not measured**"])
    return common.table(["target", "measured", ""], rows)


def _not_run(peer_ran: bool) -> list[str]:
    record = gpu_record.newest()  # the last GPU run's section (docs/gpu/*.json)
    soak = soak_record.newest()  # the last soak's (docs/soak/*.jsonl): ten minutes, kept
    out = [*(gpu_record.section(record) if record else [])]
    chaos = chaos_record.newest()  # the last chaos run's (docs/chaos/*.jsonl): minutes, kept
    out += [*(soak_record.section(soak) if soak else [])]
    out += [*(chaos_record.section(chaos) if chaos else []), "## Not measured here", ""]
    if not record:
        out.append(f"- `bench/{GPU_SCRIPT}` and `bench/gpu_all.py`: on a GPU only.")
    else:
        out += gpu_record.not_measured(record)
    if not peer_ran:
        out.append("- Ray Serve side by side (issue 7, item 5): not part of this run.")
    return out + [""]
