"""The record of the recovery section: its targets, tables, plots and reading."""

from __future__ import annotations

from pathlib import Path

from bench import common


def targets(res: dict) -> dict:
    k = res["phases"]["kills"]
    return {
        "lost": k["lost"] + k["bad_audio_count"],
        "duplicated": k["duplicated"],
        "kills": len(k["kills"]),
        "detect_p50": k["detect"]["p50"],
        "redispatch_p50": k["redispatch"]["p50"],
        "ok_lost": k["lost"] == 0 and k["bad_audio_count"] == 0,
        "ok_dup": k["duplicated"] == 0,
        "ok_count": len(k["kills"]) >= 20,
        "ok_detect": k["detect"]["p50"] < 0.1,
        "ok_redispatch": k["redispatch"]["p50"] < 0.25,
    }


def render(res: dict) -> str:
    b, k = res["phases"]["baseline"], res["phases"]["kills"]
    speeds = ", ".join(f"{s:g}" for s in res["speeds"])
    out = [
        f"Two pools side by side, each of {len(res['speeds'])} SimEngine workers (speeds "
        f"{speeds}) in its own process, on one schedule started at the same instant: sim_rtf "
        f"{res['sim_rtf']:g}, sizes lognormal mean {res['mean_s']:g} s CV {res['cv']:g}, "
        f"Poisson arrivals for {res.get('run_s', 0):.0f} s at {res['load']:.0%} of the "
        f"calibrated capacity ({res['rate']:.1f} requests/s). In one of them a random running "
        f"worker in the middle of a request (one of those killed least so far) gets SIGKILL "
        f"every {res['kill_every_s']:g} s; the other is the run without kills. Every answer is checked: exactly one outcome per "
        "request, its audio of the exact length, and a replayed request's audio bit-identical "
        "to a clean run of its seed.",
        "",
        common.table(
            ["", "no kills", "with kills"],
            [
                ["requests", b["submitted"], k["submitted"]],
                ["kills", len(b["kills"]), len(k["kills"])],
                ["requests replayed on another worker", b["replayed"], k["replayed"]],
                [
                    "**lost** (no answer, or not its audio)",
                    b["lost"] + b["bad_audio_count"],
                    k["lost"] + k["bad_audio_count"],
                ],
                ["**duplicated** (answered twice)", b["duplicated"], k["duplicated"]],
                [
                    "replays checked bit-exact against a clean run",
                    "-",
                    k["replays_checked_bit_exact"],
                ],
                [
                    "latency p50 (ms)",
                    common.ms(b["latency"]["p50"]),
                    common.ms(k["latency"]["p50"]),
                ],
                [
                    "latency p99 (ms)",
                    common.ms(b["latency"]["p99"]),
                    common.ms(k["latency"]["p99"]),
                ],
                [
                    "p99 ratio with / without kills",
                    "1.00",
                    f"{k['latency']['p99'] / b['latency']['p99']:.2f}",
                ],
                [
                    "latency p99 of the replayed requests (ms)",
                    "-",
                    common.ms(k["latency_replayed"]["p99"]),
                ],
            ],
        ),
        "",
        f"Over {len(k['kills'])} kills ({k['redispatch']['n']} requests re-dispatched"
        + (
            "; a worker can finish its request in the instant before the kill"
            if k["redispatch"]["n"] < len(k["kills"])
            else ""
        )
        + "), milliseconds:",
        "",
        common.table(
            ["from the SIGKILL to", "p50", "p99", "max"],
            [
                [label, common.ms(s["p50"], 1), common.ms(s["p99"], 1), common.ms(s["max"], 1)]
                for label, s in (
                    ("the supervisor's `dead` event (detection)", k["detect"]),
                    ("the request's `requeued` event", k["requeue"]),
                    ("the request's next `dispatched` event (**re-dispatch**)", k["redispatch"]),
                    ("the slot's `ready` event (backoff + spawn)", k["respawn"]),
                )
            ],
        ),
    ]
    return "\n".join(out)


def plot(res: dict, img_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = res["phases"]["kills"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    t_kill = [x["t"] - k["t0"] for x in k["kills"]]
    b = res["phases"]["baseline"]
    ax.plot(
        b["arrivals"],
        np.asarray(b["latencies"]) * 1e3,
        ".",
        color="grey",
        markersize=2,
        alpha=0.35,
        label="the same requests, pool without kills",
    )
    ax.plot(
        k["arrivals"],
        np.asarray(k["latencies"]) * 1e3,
        ".",
        markersize=2,
        alpha=0.5,
        label="pool with kills (by arrival)",
    )
    for i, t in enumerate(t_kill):
        ax.axvline(t, color="red", linewidth=0.6, alpha=0.6, label="SIGKILL" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title("Latency under kills")
    ax.legend(fontsize=8)
    ax = axes[1]
    for label, key in (("detection", "detect"), ("re-dispatch", "redispatch")):
        if key == "detect":
            xs = [x["detect"] for x in k["kills"] if x["detect"] is not None]
        else:
            xs = [t for x in k["kills"] for t in x["redispatch"]]
        x = np.sort(np.asarray(xs) * 1e3)
        ax.plot(x, np.arange(1, len(x) + 1) / max(1, len(x)), marker=".", label=label)
    ax.axvline(100, color="green", linestyle=":", label="detection target 100 ms")
    ax.axvline(250, color="red", linestyle=":", label="re-dispatch target 250 ms")
    ax.set_xlabel("ms after SIGKILL")
    ax.set_ylabel("fraction of kills")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return [common.save_plot(plt, fig, img_dir, "recovery.png")]


# ---- in the record (bench/report.py assembles the sections) ---------------


def target_rows(r: dict) -> list[list[str]]:
    """This section's rows of the record's targets table."""
    t = targets(r)
    return common.rows(
        ("no request lost under kills", f"{t['lost']} lost", t["ok_lost"]),
        ("no request duplicated under kills", f"{t['duplicated']} duplicated", t["ok_dup"]),
        ("at least 20 kills", f"{t['kills']}", t["ok_count"]),
        (
            "detection (kill -> dead) median under 100 ms",
            f"{t['detect_p50'] * 1e3:.1f} ms",
            t["ok_detect"],
        ),
        (
            "re-dispatch (kill -> dispatched again) median under 250 ms",
            f"{t['redispatch_p50'] * 1e3:.1f} ms",
            t["ok_redispatch"],
        ),
    )


def section(sec, img_dir: Path, rel: str) -> list[str]:
    out, res = common.opening(
        "## 3. Recovery under fire", "recovery", sec, render, plot, img_dir, rel
    )
    if res is None:
        return out
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


def _most_kills(phase: dict) -> int:
    counts: dict[int, int] = {}
    for x in phase["kills"]:
        counts[x["slot"]] = counts.get(x["slot"], 0) + 1
    return max(counts.values(), default=0)
