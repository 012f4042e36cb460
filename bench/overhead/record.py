"""The record of the overhead section: its targets, tables, plots and reading."""

from __future__ import annotations

from pathlib import Path

from bench import common


def targets(res: dict) -> dict:
    lat = res["latency"]["total"]
    return {
        "p50": lat["p50"],
        "p99": lat["p99"],
        "ok_p50": lat["p50"] < 0.3e-3,
        "ok_p99": lat["p99"] < 1e-3,
        "http_ratio": res["http"]["ratio"],
        "ok_http": res["http"]["ratio"] <= 1.5,
    }


def render(res: dict) -> str:
    lat = res["latency"]
    rows = []
    for key, label in (
        ("decide", "submit() -> dispatched (parent: admission, policy, write to the pipe)"),
        ("transport", "dispatched -> Started.at (the worker wakes, reads, starts)"),
        ("total", "**submit() -> Started.at**"),
    ):
        s = lat[key]
        rows.append(
            [
                label,
                common.ms(s["p50"], 3),
                common.ms(s["p90"], 3),
                common.ms(s["p99"], 3),
                common.ms(s["max"], 3),
            ]
        )
    out = [
        f"Enqueue-to-worker latency, zero-work requests, one at a time on an idle pool of 4 "
        f"workers ({lat['total']['n']} requests, milliseconds):",
        "",
        common.table(["segment", "p50", "p90", "p99", "max"], rows),
        "",
    ]
    d, p = res["dispatcher_alone"], res["pool_throughput"]
    out += [
        common.table(
            ["throughput", "figure"],
            [
                [
                    "Dispatcher alone: decisions/s (submit + least_work + hand-off, fake workers)",
                    f"{d['per_s']:,.0f} ({d['us_each']:.0f} us each)",
                ],
                [
                    "Zero-work requests/s through 4 real workers (burst of "
                    f"{p['n']}, late binding)",
                    f"{p['per_s']:,.0f}",
                ],
                [
                    "submit() calls/s during that burst (admission only)",
                    f"{p['submit_per_s']:,.0f}",
                ],
            ],
        ),
        "",
    ]
    h = res["http"]
    seq, asg = h["sequential"], res.get("asgi", {})

    def p50(d: dict, name: str) -> str:
        return common.ms(d[name]["p50"], 2) if name in d else "n/a"

    out += [
        "Where the time goes: one zero-work request at a time, p50 in milliseconds "
        "(0.73 s of tone back, a 35 KB WAV):",
        "",
        common.table(
            ["layer", "bare FastAPI handler", "vibevoice-pool"],
            [
                [
                    "the pool in process: submit() -> Done",
                    "-",
                    common.ms(lat["roundtrip"]["p50"], 2),
                ],
                [
                    "the ASGI app in process (no socket, no uvicorn; the pool's API without "
                    "the page)",
                    p50(asg, "bare"),
                    p50(asg, "pool"),
                ],
                [
                    "HTTP on 127.0.0.1, one kept-alive connection",
                    p50(seq, "bare"),
                    p50(seq, "pool"),
                ],
            ],
        ),
        "",
    ]
    if "error" in asg:
        out += [f"(The in-process ASGI layer could not be measured: {asg['error']}.)", ""]
    rows = []
    for name, label in (
        ("bare", "bare FastAPI handler (the floor)"),
        ("pool", "vibevoice-pool launch --engine sim --sim-rtf 0"),
    ):
        r = h[name]
        rows.append(
            [
                label,
                f"{r['rps_median']:.0f}",
                " / ".join(f"{x:.0f}" for x in r["rps_all"]),
                common.ms(r["p50"], 2),
                common.ms(r["p99"], 2),
                r["errors"],
            ]
        )
    out += [
        f"Throughput: POST /v1/synthesize from {h['clients']} concurrent httpx connections, "
        f"rounds of {h['round_s']:g} s taken in turns (bare, pool, bare, pool); the client "
        "runs on the same 2 cores:",
        "",
        common.table(
            ["server", "req/s (median)", "req/s per round", "p50 ms", "p99 ms", "errors"], rows
        ),
        "",
        f"Ratio bare / pool: **{h['ratio']:.2f}x** (target: at most 1.5x).",
    ]
    return "\n".join(out)


def plot(res: dict, img_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.sort(np.asarray(res["latency"]["samples"]) * 1e3)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, np.arange(1, len(x) + 1) / len(x))
    ax.axvline(0.3, color="green", linestyle=":", label="p50 target 0.3 ms")
    ax.axvline(1.0, color="red", linestyle=":", label="p99 target 1 ms")
    ax.axhline(0.5, color="grey", linewidth=0.6)
    ax.axhline(0.99, color="grey", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("submit() -> worker start (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Enqueue-to-worker latency, zero-work requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return [common.save_plot(plt, fig, img_dir, "dispatch_latency.png")]


# ---- in the record (bench/report.py assembles the sections) ---------------


def target_rows(o: dict) -> list[list[str]]:
    """This section's rows of the record's targets table."""
    t = targets(o)
    return common.rows(
        ("enqueue-to-worker p50 under 0.3 ms", f"{t['p50'] * 1e3:.3f} ms", t["ok_p50"]),
        ("enqueue-to-worker p99 under 1 ms", f"{t['p99'] * 1e3:.3f} ms", t["ok_p99"]),
        (
            "HTTP requests/s within 1.5x of a bare FastAPI handler",
            f"bare / pool = {t['http_ratio']:.2f}x",
            t["ok_http"],
        ),
    )


def section(sec, img_dir: Path, rel: str) -> list[str]:
    out, res = common.opening(
        "## 2. Dispatch overhead", "overhead", sec, render, plot, img_dir, rel
    )
    if res is None:
        return out
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
