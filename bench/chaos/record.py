"""docs/PERFORMANCE.md's chaos section from a saved chaos run (docs/chaos/*.jsonl).

A run of `python -m bench.chaos.run` writes one line of facts (machine, date, command,
seed), one line a request (its kind, key, outcome, wait) and a fault, and the end's
checks. The newest file under docs/chaos/ is the section `make bench` keeps in the
record (it does not run the chaos: minutes of a shared machine).

    python -m bench.chaos.record docs/chaos/chaos-2026-12-07-123.jsonl   # print it
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from bench import common
from bench.chaos.traffic import KINDS, TOLERANCE_LSB

FOLDER = Path(__file__).resolve().parents[2] / "docs" / "chaos"
OUTCOMES = ("ok", "ok_rounding", "cancelled", "left", "quarantined")
OUTCOMES += ("mismatch", "error", "hung", "broken")
GOOD = {"ok", "ok_rounding", "cancelled", "left", "quarantined"}  # as the design says


def newest(folder: Path = FOLDER) -> Path | None:
    files = sorted(folder.glob("*.jsonl"))  # chaos-DATE-SEED.jsonl
    return files[-1] if files else None


def load(path: Path) -> dict:
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    end = next((x["end"] for x in lines if "end" in x), None)
    held = set(end.get("quarantined", ())) if end else set()
    reqs = [x for x in lines if "outcome" in x]
    for r in reqs:  # the server's log says why it ended: two workers died under it
        if r["outcome"] in ("broken", "error") and r.get("request_id") in held:
            r["outcome"] = "quarantined"
    faults = [x for x in lines if "fault" in x]
    refs = next((x["references"] for x in lines if "references" in x), 0)
    return {"info": lines[0]["info"], "requests": reqs, "faults": faults, "end": end} | {
        "references": refs
    }


def figures(run: dict) -> dict:
    reqs = run["requests"]
    bad = [r for r in reqs if r["outcome"] not in GOOD]
    worst = max(reqs, key=lambda r: r["wait_s"], default=None)
    return {
        "requests": len(reqs),
        "by": Counter((r["kind"], r["outcome"]) for r in reqs),
        "faults": Counter(f["fault"] for f in run["faults"] if "skipped" not in f),
        "skipped": sum(1 for f in run["faults"] if "skipped" in f),
        "fault_errors": [f for f in run["faults"] if "error" in f],
        "preempted": sum(f.get("preempted", 0) for f in run["faults"]),
        "bad": bad,
        "mismatches": sum(1 for r in reqs if r["outcome"] == "mismatch"),
        "quarantined": sum(1 for r in reqs if r["outcome"] == "quarantined"),
        "worst": worst,
    }


def section(path: Path) -> list[str]:
    run = load(path)
    info, f, end = run["info"], figures(run), run["end"]
    outcomes = [o for o in OUTCOMES if any(k[1] == o for k in f["by"])]
    rows = [
        [kind, *(str(f["by"].get((kind, o), 0)) for o in outcomes)]
        for kind in KINDS
        if any(k[0] == kind for k in f["by"])
    ]
    rows.append(["**all**", *(str(sum(f["by"].get((k, o), 0) for k in KINDS)) for o in outcomes)])
    worst = f["worst"]
    out = [
        "## 8. Chaos: faults at random, every answer checked (`bench/chaos`)",
        "",
        f"Run {info['date']} on {info['machine']}, commit {info['revision']}: "
        f"`{info['command']}` (file `docs/chaos/{Path(path).name}`). The soak's server (the "
        f"tiny model, 2 CPU workers, a {info['hang_s']:g} s hang timeout, batches of 2); "
        f"{info['keys']} requests of fixed seeds (script, voice, seed, pcm or wav), each "
        "answered once on the quiet server first (the reference); then clients send them "
        "at random, whole, streamed, as jobs, jobs cancelled, and streams left after "
        f"their first bytes, while {info.get('fault_threads', 1)} fault threads at once "
        "SIGKILL a worker (ready, busy or draining), SIGSTOP one past the "
        "hang timeout, restart one, remove one and add one, or fill every batch with "
        "jobs and send interactive requests (preemption), each a drawn 2-6 s apart. `ok`: "
        f"bit-equal to the reference; `ok_rounding`: within {TOLERANCE_LSB} 16-bit step on "
        "every sample, the same length (a batch of another size or a resumed row sums in "
        "another order: docs/MODEL.md).",
        "",
        common.table(["requests", *outcomes], rows),
        "",
        common.table(
            ["fault", "times"],
            [[k, str(v)] for k, v in sorted(f["faults"].items())]
            + [["skipped (no worker to take)", str(f["skipped"])]],
        ),
        "",
        f"- Mismatched answers: {f['mismatches']}; answers neither right nor meant "
        f"(mismatch, error, hung, broken): {len(f['bad'])}; quarantined (running on two "
        f"workers that died, answered worker_lost as designed): {f['quarantined']}.",
    ]
    if worst:
        out.append(
            f"- The longest wait: {worst['wait_s']:.1f} s ({worst['kind']}, "
            f"{worst['outcome']}); every request is bounded (a hang would show as `hung`)."
        )
    held = end["rows"].get("preempted", 0) if end else "?"
    out.append(
        f"- Batch rows preempted for interactive requests: {held} in all, "
        f"{f['preempted']} within 3 s of a `preempt` fault."
    )
    if end:
        out.append(
            f"- At the end, quiet: {end['workers']} workers ({', '.join(end['states'])}), "
            f"/ready {end['ready_workers']}, /v1/pool agrees: {end['pool_agrees']}; "
            f"{end['restarts']} worker restarts; rows {end['rows']}."
        )
        sent = sum(1 for r in run["requests"] if r["kind"] != "job_cancel") + run["references"]
        cancels = sum(1 for r in run["requests"] if r["kind"] == "job_cancel")
        done = end.get("pool_finished", {})
        n = sum(done.values())
        verdict = (
            "every request sent is accounted for"
            if sent <= n <= sent + cancels
            else f"**{sent - n} not accounted for**"
        )
        by = ", ".join(f"{k} {v}" for k, v in sorted(done.items()))
        out.append(
            "- The pool's own count (/metrics `vibevoice_pool_requests_total`, references "
            f"included): {n} requests finished ({by}) for {sent} sent and {cancels} jobs "
            f"cancelled (a job cancelled before its turn never reaches the pool): {verdict}."
        )
    for r in f["bad"][:10]:
        out.append(f"- `{r['kind']}` {tuple(r['key'])}: {r['outcome']}, {r.get('detail', '')}")
    return [*out, ""]


if __name__ == "__main__":
    print("\n".join(section(Path(sys.argv[1]) if len(sys.argv) > 1 else newest())))
