"""Long rows that survive: a worker SIGKILLed at 80% of a streamed row, the row
resumed from its history against replayed from its start, side by side.

One pool of two tiny-model CPU workers (one row each). For each row length, in
alternating rounds:

    clean     the row uninterrupted: its audio (the reference) and its longest gap
    resume    its worker SIGKILLed once 80% of its audio has reached the parent;
              the row resumes on the other worker from its history
    replay    the same kill, the history withheld (the parent's copy is dropped in
              this process only), so the row is replayed from its start and the
              audio already sent is skipped: what the pool did before issue 23

Measured from the parent, as a listener hears it:
    stall       the longest gap between chunks after the kill
    first new   kill -> the first chunk of audio the listener had not heard
    splice err  max |resumed - clean| over the 5 s after the kill, / the clean peak
    length      the row's samples against the clean row's (must be equal)
    recomputed  decode steps run again: the history's steps (resume: 0)

Then preemption: one worker with room for two rows, both held by long jobs (batch
rows), and an interactive request arriving once the jobs have made 5 s of audio
each, with preemption and without (the parent never sends it over capacity, in this
process only): its first audio, and each job's length and splice error against the
same job run without the interruption.

    python -m bench.resume.run --out resume.json [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import numpy as np

from bench import common

LENGTHS_S = (25.0, 50.0)  # rows of about this much audio
ROUNDS = 2
KILL_AT = 0.8
SEED = 7
JOB_S = 40.0  # the two jobs of the preemption part


class Arrivals:
    def __init__(self, handle):
        self.lock = threading.Lock()
        self.times: list[tuple[float, int]] = []
        push = handle.push

        def timed(event):
            from workers.wire import messages as m

            if isinstance(event, m.Chunk):
                with self.lock:
                    self.times.append((time.monotonic(), len(event.pcm)))
            push(event)

        handle.push = timed

    def samples(self) -> int:
        with self.lock:
            return sum(n for _, n in self.times)

    def after(self, t0: float) -> list[float]:
        with self.lock:
            return [t for t, _ in self.times if t >= t0]


def one_row(pool, text: str, kill: bool, resume: bool, want=None) -> dict:
    from vibevoice_pool.script import parse_script
    from workers.wire import history
    from workers.wire import messages as m
    from workers.wire.board import Col

    common.wait_for(lambda: pool.ready_workers() == 2, 120, "both workers ready")
    snapshot = history.HistoryLog.snapshot
    if not resume:  # the replay arm: the parent keeps no history to send
        history.HistoryLog.snapshot = lambda self: None
    try:
        handle = pool.submit(pool.make_request(parse_script(text), seed=SEED, stream=True))
        arrivals = Arrivals(handle)
        t0 = time.monotonic()
        out: dict = {}
        if kill:
            total = len(want)
            common.wait_for(
                lambda: arrivals.samples() >= KILL_AT * total, 600, "80% of the row", 0.002
            )
            cut = arrivals.samples()
            pid = int(pool.board.get(handle.worker, Col.PID))
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        got = handle.result(timeout=600)
        out["wall_s"] = time.monotonic() - t0
        out["samples"] = len(got)
        if kill:
            stamps = [killed, *arrivals.after(killed)]
            out["stall_s"] = max(b - a for a, b in zip(stamps, stamps[1:], strict=False))
            out["first_new_s"] = stamps[1] - killed if len(stamps) > 1 else None
            out["cut_s"] = cut / m.SAMPLE_RATE
            splice = slice(cut, cut + 5 * m.SAMPLE_RATE)
            out["splice_err"] = float(np.abs(got[splice] - want[splice]).max() / np.abs(want).max())
            out["equal_length"] = len(got) == len(want)
        else:
            stamps = [t0, *arrivals.after(t0)]
            out["longest_gap_s"] = max(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))
            out["audio"] = got
        return out
    finally:
        history.HistoryLog.snapshot = snapshot


def script(length_s: float) -> str:
    """Plain English words, as many as the estimator sizes at `length_s` seconds."""
    from workers.wire.estimate import audio_seconds_for

    words = "a long read of many words for the listener "
    n = 1
    while audio_seconds_for(words * n, 3600.0) < length_s:
        n += 1
    return "Speaker 1: " + words * n


def measure(pool, length_s: float, rounds: int) -> dict:
    from workers.wire import messages as m

    text = script(length_s)
    res: dict = {"length_s": length_s, "clean": [], "resume": [], "replay": []}
    counters = pool.dispatcher.counters
    for k in range(rounds):
        clean = one_row(pool, text, kill=False, resume=True)
        want = clean.pop("audio")
        res["clean"].append(clean)
        res["audio_s"] = len(want) / m.SAMPLE_RATE
        arms = ("resume", "replay") if k % 2 == 0 else ("replay", "resume")
        for arm in arms:
            before = dict(counters)
            r = one_row(pool, text, kill=True, resume=arm == "resume", want=want)
            r["resumed_steps"] = counters["resumed_steps"] - before.get("resumed_steps", 0)
            r["resumed"] = counters["resumed"] - before.get("resumed", 0)
            res[arm].append(r)
            print(
                f"{length_s:.0f} s row, {arm}: stall {r['stall_s']:.2f} s, "
                f"splice err {r['splice_err']:.1e}, equal length {r['equal_length']}",
                flush=True,
            )
    return res


def preemption_round(pool, text: str, preempt: bool, want: list) -> dict:
    from dataclasses import replace

    from vibevoice_pool.pool import dispatcher
    from vibevoice_pool.script import parse_script
    from workers.wire import messages as m

    saved = dispatcher.Dispatcher._preempt_locked
    if not preempt:
        dispatcher.Dispatcher._preempt_locked = lambda self, sends: False
    try:
        reqs = [pool.make_request(parse_script(text), seed=s, stream=True) for s in (31, 32)]
        held = [pool.submit(replace(r, priority=m.Priority.BATCH.value)) for r in reqs]
        common.wait_for(lambda: all(h.samples >= 5 * m.SAMPLE_RATE for h in held), 300, "jobs")
        chat = pool.submit(pool.make_request(parse_script("Speaker 1: Hello there."), stream=True))
        first = Arrivals(chat)
        asked = time.monotonic()
        common.wait_for(lambda: first.samples() > 0, 300, "the first audio", 0.002)
        out = {"first_audio_s": first.after(asked)[0] - asked}
        chat.result(timeout=300)
        errs, equal = [], True
        for h, w in zip(held, want, strict=True):
            got = h.result(timeout=600)
            equal = equal and len(got) == len(w)
            errs.append(float(np.abs(got[: len(w)] - w[: len(got)]).max() / np.abs(w).max()))
        out["jobs_equal_length"] = equal
        out["jobs_err"] = max(errs)
        return out
    finally:
        dispatcher.Dispatcher._preempt_locked = saved


def preemption(pool, length_s: float, rounds: int) -> dict:
    from dataclasses import replace

    from vibevoice_pool.script import parse_script
    from workers.wire import messages as m

    text = script(length_s)
    reqs = [pool.make_request(parse_script(text), seed=s, stream=True) for s in (31, 32)]
    handles = [pool.submit(replace(r, priority=m.Priority.BATCH.value)) for r in reqs]
    want = [h.result(timeout=600) for h in handles]
    res: dict = {"job_s": len(want[0]) / m.SAMPLE_RATE, "with": [], "without": []}
    for k in range(rounds):
        for arm in ("with", "without") if k % 2 == 0 else ("without", "with"):
            r = preemption_round(pool, text, arm == "with", want)
            res[arm].append(r)
            print(f"preemption {arm}: first audio {r['first_audio_s']:.2f} s", flush=True)
    return res


def summary(runs: list[dict]) -> dict:
    out = {}
    for res in runs:
        rs, rp = res["resume"], res["replay"]
        out[f"{res['length_s']:.0f}"] = {
            "audio_s": res["audio_s"],
            "clean_wall_s": common.stats([r["wall_s"] for r in res["clean"]])["p50"],
            "clean_gap_s": max(r["longest_gap_s"] for r in res["clean"]),
            "resume_stall_s": common.stats([r["stall_s"] for r in rs])["p50"],
            "resume_stall_max_s": max(r["stall_s"] for r in rs),
            "replay_stall_s": common.stats([r["stall_s"] for r in rp])["p50"],
            "resume_first_new_s": common.stats([r["first_new_s"] for r in rs])["p50"],
            "splice_err_max": max(r["splice_err"] for r in rs),
            "equal_length": all(r["equal_length"] for r in rs + rp),
            "steps_kept": common.stats([r["resumed_steps"] for r in rs])["p50"],
            "resumed_all": all(r["resumed"] == 1 for r in rs),
            "rounds": len(rs),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    from workers.checkpoints.tiny import ensure_tiny_model

    cache = common.ROOT / ".cache" / "bench-resume"
    model = ensure_tiny_model(cache / "tiny-model")
    pool = common.start_pool(
        engine="vibevoice",
        model_path=str(model),
        gpus="cpu:2",
        max_batch_size=1,
        cache_dir=str(cache),
    )
    try:
        lengths = LENGTHS_S[:1] if args.quick else LENGTHS_S
        rounds = 1 if args.quick else ROUNDS
        runs = [measure(pool, length, rounds) for length in lengths]
    finally:
        pool.shutdown(grace_s=0)
    pool = common.start_pool(
        engine="vibevoice",
        model_path=str(model),
        gpus="cpu:1",
        max_batch_size=2,
        cache_dir=str(cache),
    )
    try:
        pre = preemption(pool, JOB_S, rounds)
    finally:
        pool.shutdown(grace_s=0)
    common.save_json(
        args.out,
        {
            "machine": common.machine(),
            "kill_at": KILL_AT,
            "runs": runs,
            "summary": summary(runs),
            "preemption": pre,
            "preemption_summary": {
                arm: {
                    "first_audio_s": common.stats([r["first_audio_s"] for r in pre[arm]])["p50"],
                    "first_audio_max_s": max(r["first_audio_s"] for r in pre[arm]),
                    "jobs_err": max(r["jobs_err"] for r in pre[arm]),
                    "jobs_equal_length": all(r["jobs_equal_length"] for r in pre[arm]),
                    "rounds": len(pre[arm]),
                }
                for arm in ("with", "without")
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
