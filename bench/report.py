"""The performance record: docs/PERFORMANCE.md from the sections' figures.

`render(info, sections, img_dir, doc_path)` returns the Markdown: the machine,
the date, the command, a table of every target (met or missed, by how much),
each section's tables and plots, and for each missed target why, from the
measured figures. Each section module owns its own tables (`render`), plots
(`plot`) and target checks (`targets`); this module only assembles them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import bench_tiny_cpu
import common
import dispatch_overhead
import gpu_record
import recovery
import respawn
import scheduling

GPU_SCRIPT = "bench_gpu_1p5b.py"


def render(info: dict, sections: dict, img_dir: Path, doc_path: Path) -> str:
    rel = os.path.relpath(img_dir, doc_path.parent)
    m = info["machine"]
    out = [
        "# Performance record",
        "",
        "Written by `make bench` (`python bench/run_all.py`); every figure below comes from "
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
    out += _scheduling(sections.get("scheduling"), img_dir, rel)
    out += _overhead(sections.get("overhead"), img_dir, rel)
    out += _recovery(sections.get("recovery"), img_dir, rel)
    out += _respawn(sections.get("respawn"))
    out += _tiny(sections.get("tiny"), "tiny" in sections or not info.get("only"))
    out += _peer(sections.get("ray"))
    out += _not_run("ray" in sections)
    return "\n".join(out).rstrip() + "\n"


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "n/a"


def _failed(name: str, section) -> list[str]:
    if section is None:
        return ["Not run in this run (`--only`).", ""]
    return [
        f"**This section failed** (exit code {section['rc']}):",
        "",
        "```",
        section.get("error", ""),
        "```",
        "",
    ]


# ---- the targets table ------------------------------------------------------


def _targets(sections: dict) -> str:
    rows = []
    s = sections.get("scheduling", {}).get("data")
    if s:
        for t in scheduling.targets(s):
            cv = f"CV {t['cv']:g}, load 0.9"
            rows.append(
                [
                    f"least_work p99 within 10% of the bound ({cv})",
                    f"{t['vs_bound']:.2f}x the bound",
                    common.verdict(t["ok_bound"]),
                ]
            )
            rows.append(
                [
                    f"least_work p99 at least 15% below seed ({cv})",
                    f"{_pct(t['vs_seed'])}",
                    common.verdict(t["ok_seed"]),
                ]
            )
            rows.append(
                [
                    f"least_work p99 at least 15% below least_queue ({cv})",
                    f"{_pct(t['vs_least_queue'])}",
                    common.verdict(t["ok_least_queue"]),
                ]
            )
    o = sections.get("overhead", {}).get("data")
    if o:
        t = dispatch_overhead.targets(o)
        rows.append(
            [
                "enqueue-to-worker p50 under 0.3 ms",
                f"{t['p50'] * 1e3:.3f} ms",
                common.verdict(t["ok_p50"]),
            ]
        )
        rows.append(
            [
                "enqueue-to-worker p99 under 1 ms",
                f"{t['p99'] * 1e3:.3f} ms",
                common.verdict(t["ok_p99"]),
            ]
        )
        rows.append(
            [
                "HTTP requests/s within 1.5x of a bare FastAPI handler",
                f"bare / pool = {t['http_ratio']:.2f}x",
                common.verdict(t["ok_http"]),
            ]
        )
    r = sections.get("recovery", {}).get("data")
    if r:
        t = recovery.targets(r)
        rows.append(
            ["no request lost under kills", f"{t['lost']} lost", common.verdict(t["ok_lost"])]
        )
        rows.append(
            [
                "no request duplicated under kills",
                f"{t['duplicated']} duplicated",
                common.verdict(t["ok_dup"]),
            ]
        )
        rows.append(["at least 20 kills", f"{t['kills']}", common.verdict(t["ok_count"])])
        rows.append(
            [
                "detection (kill -> dead) median under 100 ms",
                f"{t['detect_p50'] * 1e3:.1f} ms",
                common.verdict(t["ok_detect"]),
            ]
        )
        rows.append(
            [
                "re-dispatch (kill -> dispatched again) median under 250 ms",
                f"{t['redispatch_p50'] * 1e3:.1f} ms",
                common.verdict(t["ok_redispatch"]),
            ]
        )
    d = sections.get("respawn", {}).get("data")
    if d:
        rows += [[what, got, common.verdict(ok)] for what, got, ok in respawn.targets(d)]
    d = sections.get("tiny", {}).get("data")
    if d:
        rows += [[what, got, common.verdict(ok)] for what, got, ok in bench_tiny_cpu.targets(d)]
    for name, sec in sections.items():
        if "data" not in sec:
            rows.append([f"section `{name}`", "failed", "**not measured**"])
    return common.table(["target", "measured", ""], rows)


def _pct(ratio: float) -> str:
    return f"{(1 - ratio) * 100:.0f}% below" if ratio <= 1 else f"{(ratio - 1) * 100:.0f}% above"


# ---- sections ----------------------------------------------------------------


def _scheduling(sec, img_dir: Path, rel: str) -> list[str]:
    out = ["## 1. Scheduling quality", ""]
    if not sec or "data" not in sec:
        return out + _failed("scheduling", sec)
    res = sec["data"]
    out += [scheduling.render(res), ""]
    for name in scheduling.plot(res, img_dir):
        out += [f"![{name}]({rel}/{name})", ""]
    out += _scheduling_why(res)
    return out


def _scheduling_why(res: dict) -> list[str]:
    out = ["### Reading the figures", ""]
    at_09 = [c for c in res["configs"] if abs(c["load"] - 0.9) < 1e-9]
    for t, c in zip(scheduling.targets(res), at_09, strict=True):
        lw = c["runs"]["least_work"]
        line = (
            f"- **CV {c['cv']:g}, load 0.9.** least_work's p99 is {t['vs_bound']:.2f}x the "
            f"bound of its own run ({'within' if t['ok_bound'] else 'outside'} the 10% target)."
        )
        gap, share = lw["gap"]["mean"], lw["gap_share"]
        line += (
            f" A late-bound worker gets its next request only after its answer has reached "
            f"the parent and the parent's choice has reached it: that hand-off gap was "
            f"{gap * 1e3:.2f} ms on average while work was waiting, {share:.1%} of the "
            "workers' compute time."
        )
        if not t["ok_bound"] and "bound_with_gap" in lw:
            bg = lw["bound_with_gap"]["p99"]
            line += (
                f" The same central queue simulated with that gap added gives p99 "
                f"{bg * 1e3:.0f} ms against {lw['stats']['p99'] * 1e3:.0f} ms measured: the gap "
                f"accounts for {_share(lw['bound']['p99'], bg, lw['stats']['p99'])} of the "
                "distance to the bound."
            )
        if not t["ok_bound"] and scheduling.BOUND in c["runs"]:
            fixed = c["runs"][scheduling.BOUND]["stats"]["p99"]
            line += (
                f" Against the bound calibrated before the runs (one for all six policies) "
                f"least_work's p99 is {lw['stats']['p99'] / fixed:.2f}x. A run's own bound is "
                "fitted to the compute times its workers delivered in that run, and on these "
                "shared cores it moves between runs by more than the 10% the target allows; so "
                f"does the p99 of {c['n']} requests, which rests on their "
                f"{math.ceil(c['n'] / 100)} slowest, at a CV whose heaviest request is "
                f"{c['max_s']:.0f} s of audio."
            )
        line += (
            f" The benchmark runs {1 / res['time_scale']:.0f}x faster than a GPU at RTF "
            f"{res['real_rtf']:g} but the gap does not shrink with it: at real request lengths "
            f"the same gap would be about {share * res['time_scale']:.2%} of compute."
        )
        line += (
            f" Against the policies bound at arrival, least_work's p99 is {_pct(t['vs_seed'])} "
            f"seed's and {_pct(t['vs_least_queue'])} least_queue's; each over the bound of its "
            f"own run: least_work {lw['stats']['p99'] / lw['bound']['p99']:.2f}, seed "
            f"{_own(c, 'seed (stale), bound'):.2f}, least_queue "
            f"{_own(c, 'least_queue, bound'):.2f}."
        )
        for key, label in (("seed", "seed (stale), bound"), ("least_queue", "least_queue, bound")):
            if t[f"ok_{key}"] or label not in c["runs"]:
                continue
            own = _own(c, label)
            best = 1 - lw["bound"]["p99"] / c["runs"][label]["stats"]["p99"]
            line += (
                f" The miss against {key}: {key}'s p99 is itself only {own - 1:.0%} above the "
                f"bound of its run here, so even a policy at the bound would be only about "
                f"{best:.0%} below it; a late-bound least_work does not beat the bound it "
                "imitates: the target can only be met where the other policy is some 15% or "
                "more above the bound."
            )
        out.append(line)
    strayed = [
        f"CV {c['cv']:g}/load {c['load']:g}: {scheduling._load_range(c)}"
        for c in res["configs"]
        if any(
            abs(r["realised_load"] - c["load"]) > 0.05
            for r in c["runs"].values()
            if "realised_load" in r
        )
    ]
    if strayed:
        out.append(
            "- Realised loads strayed from the nominal ones ("
            + "; ".join(strayed)
            + "): the workers ran slower or faster during the run than during the "
            "calibration just before it, as the machine's other tenants came and went. The six "
            "policies of a pair ran at the same time and share the stray; compare them with "
            "each other and with their own bounds, and read the load label as approximate."
        )
    pairs = [
        f"CV {c['cv']:g}/load {c['load']:g}: "
        f"{c['runs']['least_work']['stats']['p99'] / c['runs']['least_work, bound']['stats']['p99']:.2f}"
        for c in res["configs"]
        if "least_work" in c["runs"] and "least_work, bound" in c["runs"]
    ]
    if pairs:
        out.append(
            "- What late binding buys, least_work against least_work bound at arrival (p99 "
            "late / p99 bound at arrival): " + "; ".join(pairs) + ". Bound at arrival, a request "
            "joins the queue of the worker whose estimated finish is soonest, and stays there "
            "when the estimates were wrong; late-bound, it waits in one queue and goes to the "
            "first worker that frees, which no estimate error can mislead, but each request "
            "pays the hand-off gap."
        )
    out += [
        "- The bound is the issue's reference (one FCFS queue; the fastest idle worker takes "
        "the head), not a true lower bound: a policy that sometimes leaves a request for a "
        "busy fast worker rather than give it to an idle slow one (least_work bound at "
        "arrival can) may beat it.",
        "- round_robin ignores speed: the half-speed workers get as many requests as the fast "
        "ones, and at these loads their queues run away.",
        "- least_work's speed column is learned from what each worker measures; the warm-up "
        "before the runs measured every worker, so no run here starts with unknown speeds "
        "(an unmeasured worker is taken to be as fast as the mean of the measured ones, "
        "until its first request ends).",
        "- What would close the hand-off gap in the core: let each worker hold one request "
        "beyond its batch (late binding with a lookahead of one: bind the next request when "
        "the worker starts its current one), so that it is already there when the current "
        "one ends. The hand-off itself is already short: the dispatcher writes the worker's "
        "pipe itself, with no feeder thread between them.",
        "",
    ]
    return out


def _share(bound_p99: float, with_gap: float, actual: float) -> str:
    span = actual - bound_p99
    if span <= 0:
        return "none"
    return f"{min(1.0, max(0.0, (with_gap - bound_p99) / span)):.0%}"


def _own(config: dict, label: str) -> float:
    r = config["runs"][label]
    return r["stats"]["p99"] / r["bound"]["p99"]


def _overhead(sec, img_dir: Path, rel: str) -> list[str]:
    out = ["## 2. Dispatch overhead", ""]
    if not sec or "data" not in sec:
        return out + _failed("overhead", sec)
    res = sec["data"]
    out += [dispatch_overhead.render(res), ""]
    for name in dispatch_overhead.plot(res, img_dir):
        out += [f"![{name}]({rel}/{name})", ""]
    lat, h = res["latency"], res["http"]
    seq, asg = h["sequential"], res.get("asgi", {})
    out += [
        "### Reading the figures",
        "",
        f"- Of the {lat['total']['p50'] * 1e3:.3f} ms median, {lat['decide']['p50'] * 1e3:.3f} ms "
        f"is the parent's own work (admission, the policy over a board snapshot, the "
        f"bookkeeping, pickling the request and writing it into the worker's pipe) and "
        f"{lat['transport']['p50'] * 1e3:.3f} ms is the crossing: the worker's main loop, "
        "waiting on that pipe, wakes, reads the request and starts the batch; on a machine "
        "of two shared cores that wake-up waits for a core.",
        "- A multiprocessing.Queue would add a thread switch to every dispatch: its put "
        "hands the message to a feeder thread that must get the GIL before it pickles and "
        "writes. The pool's request channel (vibevoice_pool/pool/channel.py) writes from "
        "the dispatcher's own thread into a non-blocking pipe, and only what the pipe cannot "
        "take right now (a busy or stopped worker) waits in an ordered outbox for a sender "
        "thread. Before that change this record showed 0.221 ms of parent work and 0.352 ms "
        "of crossing (p50 0.578 ms, p99 1.177 ms).",
    ]
    if "pool" in asg:
        app_extra = asg["pool"]["p50"] - lat["roundtrip"]["p50"]
        out.append(
            f"- The HTTP gap is in the pool's API app, not in the socket: in process, the pool "
            f"answers a zero-work request in {lat['roundtrip']['p50'] * 1e3:.2f} ms; through its "
            f"API app (still in process) in {asg['pool']['p50'] * 1e3:.2f} ms, "
            f"{app_extra * 1e3:.2f} ms more, where the bare app needs "
            f"{asg['bare']['p50'] * 1e3:.2f} ms in all. On that path: a body-limit middleware, "
            "pydantic's parse of the body, the request built on the loop (script parsing, the "
            "speaker's default voice found in the voices folder), four events handed from the "
            "supervisor's thread to the event loop (Started, two Chunks, Done, each by "
            "`call_soon_threadsafe`), a disconnect watcher task, and the WAV encoded. Over a "
            f"real socket: bare {seq['bare']['p50'] * 1e3:.2f} ms, pool "
            f"{seq['pool']['p50'] * 1e3:.2f} ms."
        )
        out.append(
            f"- The default voice ({asg.get('voice_bytes', 0) / 1024:.0f} KB of samples) "
            "crosses to each worker once: a preset is a read-only array, which the parent's "
            "VoiceSender sends as KeptVoice the first time and names by VoiceRef after that; "
            "the worker's VoiceCache keeps the last 16. Before that change the samples were "
            "pickled to the worker with every request and the in-process API path took "
            "7.07 ms (bare / pool over HTTP: 3.11x)."
        )
    out += [
        "- The client (httpx, on the same two cores) limits the bare handler's requests/s: "
        "the ratio of requests/s understates the server-side difference, which the "
        "one-at-a-time latencies above show.",
        "- What would close the rest: hand a request's events to the loop in one wake-up when "
        "they arrive together (a zero-work request's Started, Chunks and Done come in one "
        "burst), and let the worker send them as one message; both matter only for requests "
        "that take no time, since a real request's events are seconds apart.",
        "",
    ]
    return out


def _recovery(sec, img_dir: Path, rel: str) -> list[str]:
    out = ["## 3. Recovery under fire", ""]
    if not sec or "data" not in sec:
        return out + _failed("recovery", sec)
    res = sec["data"]
    out += [recovery.render(res), ""]
    for name in recovery.plot(res, img_dir):
        out += [f"![{name}]({rel}/{name})", ""]
    k = res["phases"]["kills"]
    out += [
        "### Reading the figures",
        "",
        "- Detection is the supervisor's `multiprocessing.connection.wait` on the process "
        "sentinels: the kill is seen as soon as its loop thread gets a core.",
        f"- Re-dispatch is detection plus the wait for a free worker: the requeued request "
        f"goes to the head of the queue, and at {res['load']:.0%} load a worker frees within a "
        f"fraction of a service time (kill -> requeued p50 {k['requeue']['p50'] * 1e3:.1f} ms, "
        f"-> dispatched p50 {k['redispatch']['p50'] * 1e3:.1f} ms).",
        "- Each kill costs the killed request its work so far (it runs again from the "
        "start, with the audio already sent skipped) and the slot its backoff plus a respawn. "
        "A first death respawns at once; deaths in a row back off (1, 2, 4, 8 s ..., the "
        "count starts over once a worker has been ready 10 s): settings of "
        "the recovery policy (backoff_cap_s, healthy_reset_s), not scaled with this benchmark, and here each worker dies up to "
        f"{_most_kills(k)} times in {res.get('run_s', 0):.0f} s, so its later deaths keep it "
        f"down longer: dead or starting slots took {k['down_share']:.1%} of "
        f"the worker-time of the run, so the {res['load']:.0%} offered load ran at about "
        f"{res['load'] / max(1e-9, 1 - k['down_share']):.0%} of what was left. That, with the "
        "replays, is the p99 difference between the two runs.",
        "",
    ]
    return out


def _respawn(sec) -> list[str]:
    out = ["## 3b. Respawn: a killed worker serving again", ""]
    if sec is None:
        return out + ["`bench/respawn.py` was not run in this run.", ""]
    if "data" not in sec:
        return out + _failed("respawn", sec)
    return out + [respawn.render(sec["data"]), "", *respawn.reading(sec["data"]), ""]


def _most_kills(phase: dict) -> int:
    counts: dict[int, int] = {}
    for x in phase["kills"]:
        counts[x["slot"]] = counts.get(x["slot"], 0) + 1
    return max(counts.values(), default=0)


def _tiny(sec, planned: bool) -> list[str]:
    out = ["## 4. The real model, tiny, on CPU", ""]
    if sec is None and not planned:
        return out + ["Not run in this run (`--only`).", ""]
    if sec is None:
        return out + ["`bench/bench_tiny_cpu.py` is not in this checkout: not run.", ""]
    if "data" not in sec:
        return out + _failed("tiny", sec)
    table_lines = [ln for ln in sec["stdout"].splitlines() if ln.startswith("|")]
    other = [ln for ln in sec["stdout"].splitlines() if ln.strip() and not ln.startswith("|")]
    out += ["`python bench/bench_tiny_cpu.py` (its own table, as it prints it):", ""]
    for line in other[:5]:  # each its own paragraph
        out += [line, ""]
    out += table_lines + [""]
    out += bench_tiny_cpu.reading(sec["data"]) + [""]
    return out


def _peer(sec) -> list[str]:
    out = ["## 5. A peer, side by side: Ray Serve", ""]
    if sec is None:
        return out + ["`bench/ray_peer.py` was not run in this run.", ""]
    if "data" not in sec:
        return out + _failed("ray", sec)
    data = sec["data"]
    if "skipped" in data:
        return out + [f"Not measured: {data['skipped']}.", ""]
    return out + [
        "`python bench/ray_peer.py` (its own table, as it prints it; see its docstring for "
        "the set-up):",
        "",
        data.get("table", "").rstrip(),
        "",
    ]


def _not_run(peer_ran: bool) -> list[str]:
    record = gpu_record.newest()  # the last GPU run's section (docs/gpu/*.json)
    out = [*(gpu_record.section(record) if record else []), "## Not measured here", ""]
    if not record:
        out.append(f"- `bench/{GPU_SCRIPT}` and `bench/gpu_all.py`: on a GPU only.")
    else:
        out.append(
            "- On a GPU: kill-to-ready, nvidia-smi's list of holders and the pool (1 worker "
            "against 2) did not run (section 6); `bench/gpu_all.py` runs them on the next GPU."
        )
    if not peer_ran:
        out.append("- Ray Serve side by side (issue 7, item 5): not part of this run.")
    return out + [""]
