"""The Ray Serve peer section's record against saved figures
(tests/data/bench/ray_peer.json, written by `python -m bench.ray_peer.run --out ...`
on this kind of machine), and the readings of where a request's time goes
(bench/ray_peer/cost.py). No Ray runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common
from bench.ray_peer import cost, record
from bench.ray_peer.run import SYSTEMS

DATA = Path(__file__).parent / "data" / "bench" / "ray_peer.json"


def text_of(data: dict) -> str:
    return "\n".join(record.section({"name": "ray", "rc": 0, "data": data}))


def test_the_section_says_where_a_requests_time_goes_from_the_saved_figures():
    data = json.loads(DATA.read_text())
    text = text_of(data)
    zero = data["results"]["zero"]
    assert data["table"].strip() in text
    assert f"Run {data['date']} on" in text and f"commit {data['revision']}" in text
    assert f"`{data['command']}`" in text
    for s in SYSTEMS:  # each system's CPU per request, the sum of its processes'
        assert f"**{sum(zero[s]['cpu_ms'].values()):.2f}**" in text
    ray, local = zero["pool_ray"], zero["pool"]
    for hop in cost.HOPS:
        assert f"| {hop} | {local['hops'][hop]:.2f} | {ray['hops'][hop]:.2f} |" in text
    little = 8 / ray["rps"] * 1e3  # 8 clients in a closed loop
    assert f"= {little:.0f} ms (Little's law), measured {ray['p50_s'] * 1e3:.0f} ms" in text
    busy = cost.cores_used(ray["cpu_ms"], ray["rps"])
    assert f"{busy:.2f} of {data['machine']['cores']} cores busy" in text


def test_a_record_without_the_cost_readings_shows_the_table_alone():
    data = json.loads(DATA.read_text())
    for r in data["results"]["zero"].values():
        r.pop("cpu_ms")
    del data["date"]
    text = text_of(data)
    assert data["table"].strip() in text
    assert "Where a zero-work request" not in text and "Run " not in text


def test_hops_are_the_medians_of_each_step_from_the_pools_events():
    rec = common.Recorder()
    # two requests on slot 0, one after the other; one on slot 1, sent twice (requeued)
    for what, rid, t, slot in (
        ("dispatched", "a", 1.000, 0),
        ("started", "a", 1.006, 0),
        ("finished", "a", 1.010, 0),
        ("dispatched", "b", 1.012, 0),
        ("started", "b", 1.020, 0),
        ("finished", "b", 1.030, 0),
        ("dispatched", "c", 1.000, 1),
        ("requeued", "c", 1.001, 1),
        ("dispatched", "c", 1.002, 1),
        ("finished", "c", 1.050, 1),
    ):
        rec.events.append((what, rid, t, slot))
    rec.started_at.update(a=1.004, b=1.015, c=1.003)
    h = cost.hops(rec)
    assert h["send -> the replica starts the row"] == pytest.approx((4 + 3) / 2)
    assert h["the replica starts -> Started in the parent"] == pytest.approx((2 + 5) / 2)
    assert h["Started -> Done in the parent"] == pytest.approx((4 + 10) / 2)
    assert h["send -> Done (one round trip)"] == pytest.approx((10 + 18) / 2)
    assert h["Done -> the next send on the same worker"] == pytest.approx(2)


def test_cpu_by_role_is_per_request_and_counts_a_new_process_from_zero():
    before = {1: (cost.DRIVER, 10.0), 2: ("replicas", 4.0)}
    after = {1: (cost.DRIVER, 10.4), 2: ("replicas", 4.3), 3: ("replicas", 0.1)}
    ms = cost.by_role(before, after, 100)
    assert ms == pytest.approx({cost.DRIVER: 4.0, "replicas": 4.0})
    assert cost.cores_used(ms, 50.0) == pytest.approx(0.4)
