"""The benchmarks' record code against saved figures (tests/data/bench/*.json, written
by `python -m bench.<section>.run --quick --out ...` on this kind of machine): each
section's targets, tables and reading, and the whole record assembled from them. No
benchmark runs here; the figures are fixed, so every number the record shows is checked
against the one computed here from the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, gpu_record, report
from bench.chaos import record as chaos
from bench.overhead import record as overhead
from bench.recovery import record as recovery
from bench.scheduling import record as scheduling
from bench.soak import record as soak

DATA = Path(__file__).parent / "data" / "bench"


def figures(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def section(name: str) -> dict:
    return {"name": name, "seconds": 60.0, "rc": 0, "stdout": "", "data": figures(name)}


def test_scheduling_targets_are_the_ratios_of_the_saved_p99s():
    res = figures("scheduling")
    config = next(c for c in res["configs"] if c["load"] == 0.9)
    runs = config["runs"]
    lw = runs["least_work"]["stats"]["p99"]
    bound = runs["least_work"]["bound"]["p99"]
    seed = runs["seed (stale), bound"]["stats"]["p99"]
    (t,) = scheduling.targets(res)
    assert t["vs_bound"] == pytest.approx(lw / bound)
    assert t["vs_seed"] == pytest.approx(lw / seed)
    assert t["ok_bound"] == (lw <= 1.10 * bound)
    rows = scheduling.target_rows(res)
    assert rows[0] == [
        f"least_work p99 within 10% of the bound (CV {config['cv']:g}, load 0.9)",
        f"{lw / bound:.2f}x the bound",
        common.verdict(lw <= 1.10 * bound),
    ]
    assert rows[1][1] == common.pct(lw / seed)


def test_scheduling_tables_show_every_run_and_say_why():
    res = figures("scheduling")
    text = scheduling.render(res)
    config = next(c for c in res["configs"] if c["load"] == 0.9)
    for label in config["runs"]:
        if label != scheduling.BOUND:
            assert label in text
    lw = config["runs"]["least_work"]["stats"]["p99"]
    assert f"{lw * 1e3:.0f}" in text or f"{lw * 1e3:,.0f}" in text  # its p99 in ms
    why = "\n".join(scheduling._scheduling_why(res))
    assert why.startswith("### Reading the figures") and "CV 1" in why


def test_pct_says_below_or_above():
    assert common.pct(0.8) == "20% below" and common.pct(1.25) == "25% above"


def test_a_failed_or_missing_section_is_said_so():
    failed = {"rc": 3, "error": "Traceback: boom"}
    assert common.failed("x", failed)[0] == "**This section failed** (exit code 3):"
    assert "Traceback: boom" in common.failed("x", failed)
    assert common.failed("x", None) == ["Not run in this run (`--only`).", ""]


def test_the_record_assembles_every_section_from_the_saved_figures(tmp_path):
    sections = {
        n: section(n)
        for n in ("scheduling", "overhead", "recovery")
        if (DATA / f"{n}.json").exists()
    }
    sections["respawn"] = {"name": "respawn", "seconds": 1.0, "rc": 1, "error": "no model"}
    info = {
        "machine": {
            "cpu": "test CPU",
            "cores": 2,
            "mem_gib": 24,
            "os": "Linux",
            "python": "3.11",
            "torch": "2.13.0",
            "numpy": "2",
            "fastapi": "0",
            "uvicorn": "0",
        },
        "date": "2026-12-04 18:00 UTC",
        "revision": "abc1234",
        "load_before": [1.0, 1.0, 1.0],
        "load_after": [2.0, 2.0, 2.0],
        "quick": True,
        "only": list(sections),
        "seconds": 300.0,
    }
    doc = report.render(info, sections, tmp_path / "img", tmp_path / "PERFORMANCE.md")
    assert doc.startswith("# Performance record")
    assert "commit abc1234" in doc and "within the 15 min budget" in doc
    assert "## 1. Scheduling quality" in doc
    for row in scheduling.target_rows(sections["scheduling"]["data"]):
        assert f"| {row[0]} | {row[1]} | {row[2]} |" in doc
    assert "| section `respawn` | failed | **not measured** |" in doc
    assert "**This section failed** (exit code 1):" in doc
    assert "Not run in this run (`--only`)." in doc  # tiny and ray were not asked for


def test_overhead_targets_and_tables_come_from_the_saved_latencies():
    res = figures("overhead")
    t = overhead.targets(res)
    total = res["latency"]["total"]
    assert (t["p50"], t["p99"]) == (total["p50"], total["p99"])
    assert t["ok_p50"] == (total["p50"] < 0.3e-3) and t["ok_http"] == (res["http"]["ratio"] <= 1.5)
    rows = overhead.target_rows(res)
    assert rows[0] == [
        "enqueue-to-worker p50 under 0.3 ms",
        f"{total['p50'] * 1e3:.3f} ms",
        common.verdict(total["p50"] < 0.3e-3),
    ]
    assert rows[2][1] == f"bare / pool = {res['http']['ratio']:.2f}x"
    assert "submit() -> dispatched" in overhead.render(res)


def test_recovery_targets_count_the_saved_kills_and_losses(tmp_path):
    res = figures("recovery")
    k = res["phases"]["kills"]
    t = recovery.targets(res)
    assert t["kills"] == len(k["kills"]) and t["ok_count"] == (len(k["kills"]) >= 20)
    assert t["lost"] == k["lost"] + k["bad_audio_count"] and t["ok_lost"] == (t["lost"] == 0)
    rows = {row[0]: row[1:] for row in recovery.target_rows(res)}
    assert rows["at least 20 kills"] == [str(len(k["kills"])), common.verdict(t["ok_count"])]
    detect = rows["detection (kill -> dead) median under 100 ms"]
    assert detect == [
        f"{k['detect']['p50'] * 1e3:.1f} ms",
        common.verdict(k["detect"]["p50"] < 0.1),
    ]
    text = "\n".join(recovery.section({"data": res, "rc": 0}, tmp_path, "img"))
    assert text.startswith("## 3. Recovery under fire")
    assert f"-> dispatched p50 {k['redispatch']['p50'] * 1e3:.1f} ms" in text
    most = max(
        sum(1 for x in k["kills"] if x["slot"] == s) for s in {x["slot"] for x in k["kills"]}
    )
    assert f"dies up to {most} times" in text


def test_the_gpu_section_is_written_from_the_newest_saved_gpu_run():
    path = gpu_record.newest()
    assert path is not None and path.parent.name == "gpu"
    run = json.loads(path.read_text())
    text = "\n".join(gpu_record.section(path))
    assert text.startswith("## 6. On a GPU")
    assert f"| date | {run['date']} |" in text and f"({run['run_wall_s']:.0f} s, " in text
    doc = report._not_run(peer_ran=True)
    assert doc[: len(gpu_record.section(path))] == gpu_record.section(path)


def test_the_gpu_section_keeps_every_saved_run_beside_the_newest():
    paths = gpu_record.runs()
    assert len(paths) >= 2
    text = "\n".join(gpu_record.section(paths[-1]))
    for i, path in enumerate(paths):
        run = json.loads(path.read_text())
        assert f"### Run {i + 1}: {run['date']}" in text and f"`docs/gpu/{path.name}`" in text
        for r in run["a_eager"]["rows"]:  # each run's engine rows stay, under its label
            mode = r.get("engine_mode", "eager")
            cells = f"| Run {i + 1} | {r['rows']} | {r['lengths']} | {mode} | {r['compile']} | "
            assert f"{cells}{r['ms_per_step']:.0f} |" in text
    head = next(ln for ln in text.splitlines() if ln.startswith("| target (issue 26)"))
    assert head.count(": measured") == len(paths)


def _target(text: str, name: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_gpu_targets_follow_the_saved_kill_and_holder_figures(tmp_path):
    newest = gpu_record.newest()
    run = json.loads(newest.read_text())
    pool = [r for r in run["c_pool"]["runs"] if "kill" in r][0]
    want = pool["kill"]["kill_to_ready_s"]
    text = "\n".join(gpu_record.section(newest))
    cells = _target(text, "kill-to-ready under 5 s")
    verdict = "met" if want < 5 else f"**missed** by {want - 5:.1f} s"
    assert cells[-2].startswith(f"{want:.2f} s") and cells[-1] == verdict
    # the same run with a fast respawn and a parent that holds GPU memory
    pool["kill"]["kill_to_ready_s"] = 3.0
    pool["memory"]["only_workers"] = False
    (tmp_path / newest.name).write_text(json.dumps(run))
    text = "\n".join(gpu_record.section(tmp_path / newest.name))
    assert _target(text, "kill-to-ready under 5 s")[-2:] == [
        "3.00 s (a spawned worker; "
        f"{len(pool['kill']['requests'])} requests in flight, all done: "
        f"{pool['kill']['all_done']})",
        "met",
    ]
    assert _target(text, "no GPU memory held by the parent or the zygote")[-1] == "**missed**"


def test_not_measured_names_what_the_newest_gpu_run_skipped():
    newest = gpu_record.newest()
    run = json.loads(newest.read_text())
    lines = "\n".join(gpu_record.not_measured(newest))
    for label in run["a_eager"]["skipped"]:
        assert label in lines
    forked = run["b_respawn"].get("worker_forked")
    assert ("a respawn forked from the zygote" in lines) == (forked is False)


def test_resume_record_reads_the_saved_figures():
    from bench.resume import record as resume

    res = figures("resume")
    longest = max(res["summary"].values(), key=lambda r: r["audio_s"])
    (stall, splice, first, jobs) = resume.target_rows(res)
    p = res["preemption_summary"]
    assert first[1].startswith(f"{p['with']['first_audio_max_s']:.2f} s")
    assert first[2] == common.verdict(p["with"]["first_audio_max_s"] < 2.5)
    assert jobs[2] == common.verdict(
        p["with"]["jobs_equal_length"] and p["with"]["jobs_err"] < 2e-2
    )
    assert stall[1].startswith(f"{longest['resume_stall_max_s']:.2f} s")
    assert stall[2] == common.verdict(longest["resume_stall_max_s"] < resume.STALL_TARGET_S)
    assert splice[2] == common.verdict(
        longest["equal_length"] and longest["splice_err_max"] < resume.SPLICE_TARGET
    )
    text = "\n".join(resume.section({"data": res, "rc": 0}))
    assert f"{longest['replay_stall_s']:.2f} s" in text
    assert "failed" in "\n".join(resume.section({"rc": 2, "error": "boom"}))


def test_shape_targets_and_tables_come_from_the_saved_figures():
    from bench.shape import record as shape

    d = figures("shape")
    by_rows = {c["rows"]: c["dispatches_per_step"] for c in d["dispatches"]}
    got = {what: (measured, ok) for what, measured, ok in shape.targets(d)}
    n16 = [v for k, v in got.items() if "dispatches per step at 16 rows" in k][0]
    assert n16 == (f"{by_rows[16]:,.0f}", by_rows[16] <= 3000)
    gen = [v for k, v in got.items() if "generate at batch 1" in k][0]
    ratio = d["ratios"]["CB 1 / generate 1"]
    assert gen[0].startswith(f"{ratio:.2f}x") and gen[1] == (ratio >= 1.3)
    text = shape.render(d)
    for mode in d["modes"]:  # each mode's row shows its median and every repeat
        each = ", ".join(f"{x:.2f}" for x in d["audio_s_per_s"][mode])
        assert f"| {mode} | {d['median_audio_s_per_s'][mode]:.2f} | {each} |" in text
    assert d["lm_host"] and {c["rows"] for c in d["lm_host"]} == set(by_rows)
    for c in d["lm_host"]:  # the LM forward both ways, and their ratio
        t, ours = c["transformers_ms"], c["decode_lm_ms"]
        assert f"| {c['rows']} | {t:.1f} | {ours:.1f} | {c['ratio']:.2f}x |" in text
        assert abs(c["ratio"] - t / ours) < 0.02  # from the unrounded times
    reading = "\n".join(shape.reading(d))
    runs = d["audio_s_per_s"]
    each = [a / b for a, b in zip(runs["CB 4"], runs["CB 1"], strict=True)]
    under = sum(1 for r in each if round(r, 2) < 2.0)
    assert (f"{under} of {len(each)} repeats fall below 2.0x" in reading) == (under > 0)


def test_the_launch_table_and_its_reading_come_from_the_saved_figures():
    from bench.shape import record as shape

    d = figures("shape")
    by: dict[str, dict[int, float]] = {}
    for c in d["launches"]:
        by.setdefault(c["engine_mode"], {})[c["rows"]] = c["launches_per_step"]
    assert list(by) == ["eager", "graphs", "graphs-lm"]
    text = shape.render(d)
    for r, lean in by["graphs-lm"].items():
        cells = " | ".join(f"{by[m][r]:,.0f}" for m in by)
        assert f"| {r} | {cells} | {by['eager'][r] / lean:.0f}x |" in text
    top = max(by["graphs-lm"])
    reading = "\n".join(shape.reading(d))
    e, g, lean = by["eager"][top], by["graphs"][top], by["graphs-lm"][top]
    assert f"at {top} rows: {e:,.0f} eager, {g:,.0f} with the diffusion loop" in reading
    assert f"{lean:,.0f} with the LM's decode step captured too" in reading
    assert f"{e / lean:.0f}x fewer than eager" in reading
    # a record without the launch table (an older run) renders without it
    older = {k: v for k, v in d.items() if k != "launches"}
    assert "| rows | eager | graphs |" not in shape.render(older)
    assert "Launches per step on a GPU" not in "\n".join(shape.reading(older))


def test_the_shape_record_rewrites_only_its_own_section():
    from bench.shape import record as shape

    d = figures("shape")
    doc = "# Performance record\n\n## 4. Tiny\n\ntiny text\n\n## 5. Ray\n\nray text\n"
    once = shape.rewrite(doc, d, "test CPU", "2026-12-05 08:00 UTC", "python -m bench.shape.run")
    assert once.index("## 4. Tiny") < once.index(shape.TITLE) < once.index("## 5. Ray")
    assert "tiny text" in once and "ray text" in once and "Measured on test CPU" in once
    d2 = {**d, "median_audio_s_per_s": {**d["median_audio_s_per_s"], "CB 1": 123.45}}
    twice = shape.rewrite(once, d2, "test CPU", "later", "python -m bench.shape.run")
    assert twice.count(shape.TITLE) == 1 and "| CB 1 | 123.45 |" in twice
    assert "| CB 1 | 123.45 |" not in once and twice.endswith("ray text\n")


def test_the_shape_reading_takes_cb4_apart_from_the_saved_figures():
    from bench.shape import record as shape
    from bench.shape.run import arrival_order_rows

    d = figures("shape")
    one, four = d["step_ms_by_rows"]["CB 1"]["1"], d["step_ms_by_rows"]["CB 4"]["4"]
    text = "\n".join(shape.reading(d))
    assert f"a step with 4 rows costs {four} ms against {one} ms with 1" in text
    assert f"makes {4 * one / four:.2f}x the audio" in text
    assert f"({d['arrival_order_rows']['CB 4']} by `arrival_order_rows`" in text
    # arrival order on four places: the long one last runs alone; longest first fills them
    assert arrival_order_rows([1.0, 1.0, 1.0, 1.0, 8.0], 4) == 12.0 / 9.0
    assert arrival_order_rows([8.0, 1.0, 1.0, 1.0, 1.0], 4) == 12.0 / 8.0
    assert arrival_order_rows([2.0, 2.0], 1) == 1.0


def test_the_shape_reading_sets_the_cpu_operators_against_the_conv_kernels():
    """CB 1 and CB 4 on the conv kernels a GPU runs, in the same repeats: each mode's
    medians both ways and their ratio taken within each repeat, and CB 4 / CB 1 on the
    conv kernels; a record without them (an older run) reads without the bullet."""
    import statistics

    from bench.shape import record as shape

    d = figures("shape")
    runs, conv = d["audio_s_per_s"], d["conv_kernels_audio_s_per_s"]
    text = "\n".join(shape.reading(d))
    for m in ("CB 1", "CB 4"):
        ratio = statistics.median(a / b for a, b in zip(runs[m], conv[m], strict=True))
        mine, theirs = statistics.median(runs[m]), statistics.median(conv[m])
        assert f"{m} {mine:.2f} against {theirs:.2f} audio s/s ({ratio:.2f}x)" in text
    theirs = statistics.median(a / b for a, b in zip(conv["CB 4"], conv["CB 1"], strict=True))
    assert f"On the conv kernels CB 4 / CB 1 is {theirs:.2f}x" in text
    older = {k: v for k, v in d.items() if k != "conv_kernels_audio_s_per_s"}
    assert "CPU_KERNELS" not in "\n".join(shape.reading(older))


def test_the_upsample_record_comes_from_the_saved_figures():
    from bench.rewrite import rewrite_section
    from bench.upsample import record as upsample

    d = figures("upsample")
    text = "\n".join(upsample.body(d))
    for s in d["stages"]:  # every stage at every row count, with its ratio
        t, u = s["transformers_ms"], s["upsample_ms"]
        assert f"| {s['rows']} | {s['stage']} | {t:.2f} | {u:.2f} | {t / u:.2f}x |" in text
    first = [s for s in d["stages"] if s["rows"] == 1]
    t, u = sum(s["transformers_ms"] for s in first), sum(s["upsample_ms"] for s in first)
    assert f"{t / u:.1f}x at 1 row," in text
    doc = "# r\n\n## 4b. x\n\nold\n\n## 5. Ray\n"
    once = rewrite_section(doc, upsample.TITLE, [upsample.TITLE, "", "new"])
    assert once.index("## 4b") < once.index(upsample.TITLE) < once.index("## 5. Ray")
    again = rewrite_section(once, upsample.TITLE, [upsample.TITLE, "", "newer"])
    assert "newer" in again and "\nnew\n" not in again and again.count(upsample.TITLE) == 1


def test_the_tempo_record_comes_from_the_saved_figures():
    from bench.tempo import record as tempo

    d = figures("tempo")
    text = "\n".join(tempo.body(d))
    for s in d["speeds"]:  # every speed, whole and streamed, and the cost of one push
        push = s["stream_ms_per_s"] * d["hop"] / 24000
        w, st = s["whole_ms_per_s"], s["stream_ms_per_s"]
        assert f"| {s['speed']:g} | {w:.2f} | {st:.2f} | {push:.3f} |" in text
    worst = max(max(s["whole_ms_per_s"], s["stream_ms_per_s"]) for s in d["speeds"])
    assert f"At most {worst:.2f} ms per second of audio" in text
    assert f"medians of {d['repeats']} runs" in text
    section = tempo.section({"name": "tempo", "rc": 0, "data": d})
    assert section[0] == tempo.TITLE and "\n".join(section[2:]) == text


def test_the_longrow_record_comes_from_the_saved_figures():
    from bench.longrow import record as longrow

    d = figures("longrow")
    text = "\n".join(longrow.body(d))
    for w in d["worker"]:  # each length's step time and Python calls a step
        assert f"| {w['step_ms']:.1f} | {w['kv_ms']:.1f} | {w['calls_per_step']:.0f} |" in text
    for mode in ("stream", "job"):
        for r in d["parent"][mode] + d["before"]["parent"][mode]:
            assert f"{r['chunk_us']:.0f}" in text
    job, old = d["parent"]["job"], d["before"]["parent"]["job"]
    assert f"at {job[-1]['audio_s']:g} s costs {job[-1]['tick_ms']:.1f} ms" in text
    assert f"{old[-1]['tick_ms']:.1f} ms at {old[-1]['audio_s']:g} s" in text
    section = longrow.section({"name": "longrow", "rc": 0, "data": d})
    assert section[0] == longrow.TITLE and "\n".join(section[2:]) == text


def test_the_soak_section_reads_the_saved_rounds(tmp_path):
    """Per-round figures from a saved soak file; RSS growth per 1,000 requests counted
    from the first round past the warm-up (the page keeps 5 min of streams)."""

    def row(n, t, requests, rss_kb, fds):
        kinds = {"socket": fds - 3, "pipe": 2, "file": 1, "memfd": 0}
        worker = {"pid": 9, "fds": {"pipe": 14}, "threads": 5, "rss_kb": 400 << 10}
        return {
            "round": n,
            "fault": "none",
            "requests": requests,
            "errors": [],
            "t": t,
            "parent_fds": kinds,
            "parent_threads": 17,
            "parent_rss_kb": rss_kb,
            "workers": [worker],
            "children": 5,
            "shm_mapped": ["/dev/shm/psm_x"],
            "tmp_entries": 12,
            "data_entries": 8,
            "restarts": n,
        }

    info = {
        "date": "2026-12-07 17:38 UTC",
        "machine": "test CPU, 2 cores, 24 GiB",
        "revision": "abc1234",
        "command": "python -m bench.soak.run --minutes 10",
        "minutes": 10,
    }
    rows = [
        row(0, 0, 60, 480 << 10, 58),
        row(1, 200, 120, 490 << 10, 58),
        row(2, 400, 1120, 491 << 10, 59),
        row(3, 600, 2120, 493 << 10, 58),
    ]
    path = tmp_path / "soak-2026-12-07.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [{"info": info}, *rows]))
    assert soak.newest(tmp_path) == path
    text = "\n".join(soak.section(path))
    assert "## 7. Soak" in text and "commit abc1234" in text and "test CPU" in text
    assert "| 3 | none | 2120 | 58 (55/2/1/0) | 17 | 493 | 14/5 | 400 |" in text
    assert "After round 2" in text and "parent descriptors 58-59" in text
    assert "2048 KiB per 1,000 requests" in text  # (493 - 491) MiB over 1,000 requests


def test_the_chaos_section_counts_outcomes_and_lists_wrong_answers(tmp_path):
    """Requests by kind and outcome, faults by kind, the longest wait and each answer
    that was neither right nor meant, from a saved chaos file."""

    def req(kind, outcome, wait, detail=""):
        key = ["synth", "one", "demo-Alice_woman", 11, "pcm"]
        return {"kind": kind, "key": key, "outcome": outcome, "wait_s": wait, "detail": detail}

    info = {
        "date": "2026-12-07 20:23 UTC",
        "machine": "test CPU, 2 cores, 24 GiB",
        "revision": "abc1234",
        "command": "python -m bench.chaos.run --minutes 3 --seed 2",
        "minutes": 3,
        "seed": 2,
        "keys": 24,
        "hang_s": 4.0,
    }
    end = {"workers": 2, "states": ["ready", "ready"], "ready_workers": 2, "pool_agrees": True}
    end |= {"restarts": 3, "rows": {"preempted": 5}, "queue": 0, "quarantined": ["r9"]}
    end["pool_finished"] = {"completed": 4, "cancelled": 1, "worker_lost": 1}
    lines = [
        {"info": info},
        {"references": 1, "seconds": 8.0},
        req("synth", "ok", 1.0),
        req("synth_stream", "broken", 3.0) | {"request_id": "r9"},  # the log: quarantined
        req("synth", "ok_rounding", 2.5, "70 samples off by 1"),
        req("job", "mismatch", 7.25, "100 samples, the reference 200"),
        req("leave", "left", 0.1),
        {"fault": "sigkill", "worker": 0},
        {"fault": "preempt", "jobs": 4, "preempted": 5},
        {"fault": "restart", "skipped": "no serving worker"},
        {"end": end},
    ]
    path = tmp_path / "chaos-2026-12-07-2.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    assert chaos.newest(tmp_path) == path
    text = "\n".join(chaos.section(path))
    assert "## 8. Chaos" in text and "--seed 2" in text and "a 4 s hang timeout" in text
    assert "| requests | ok | ok_rounding | left | quarantined | mismatch |" in text
    assert "| synth | 1 | 1 | 0 | 0 | 0 |" in text and "| **all** | 1 | 1 | 1 | 1 | 1 |" in text
    assert "| synth_stream | 0 | 0 | 0 | 1 | 0 |" in text
    assert "6 requests finished (cancelled 1, completed 4, worker_lost 1) for 6 sent" in text
    assert "| sigkill | 1 |" in text and "| skipped (no worker to take) | 1 |" in text
    assert "Mismatched answers: 1" in text and "The longest wait: 7.2 s (job, mismatch)" in text
    assert "preempted for interactive requests: 5 in all, 5 within 3 s" in text
    assert "agrees: True" in text
    assert "100 samples, the reference 200" in text
