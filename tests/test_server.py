"""The real `vibevoice-pool launch` process: readiness, parent death,
graceful SIGTERM, a full queue, an engine that cannot boot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ROOT, pid_alive, wait_until

pytestmark = pytest.mark.slow

SIM = ("--engine", "sim")


def synth(url, text="Speaker 1: hello there, how are you today?", **extra):
    return httpx.post(f"{url}/v1/synthesize", json={"script": text, **extra}, timeout=120)


def test_three_cpu_workers_are_ready_with_distinct_pids(server):
    t0 = time.monotonic()
    s = server(*SIM, "--gpus", "cpu:3")
    # The issue asks for 15 s on an idle machine (docs/PERFORMANCE.md records it); a
    # test only guards against a gross regression, since the suite shares two cores.
    assert time.monotonic() - t0 < 60
    workers = s.get("/v1/pool").json()["workers"]
    assert [w["state"] for w in workers] == ["ready"] * 3
    pids = {w["pid"] for w in workers}
    assert len(pids) == 3 and s.proc.pid not in pids
    r = synth(s.url)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert {"x-request-id", "x-seed", "x-worker", "x-audio-seconds"} <= set(r.headers)


def test_no_worker_outlives_a_sigkilled_parent(server):
    s = server(*SIM, "--gpus", "cpu:3")
    pids = s.worker_pids()
    assert len(pids) == 3
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(10)
    time.sleep(5)
    assert [p for p in pids if pid_alive(p)] == []


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(server):
    s = server(*SIM, "--gpus", "cpu:2", "--sim-rtf", "0.4", "--grace-s", "30")
    results = []

    def call(i):
        results.append(synth(s.url, f"Speaker 1: request number {i} " + "is fairly long " * 3))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(
        lambda: sum(w["inflight"] for w in s.get("/v1/pool").json()["workers"]) >= 2,
        20,
        what="requests in flight",
    )
    pids = s.worker_pids()
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert s.proc.wait(40) == 0
    assert [r.status_code for r in results] == [200] * 4
    assert all(len(r.content) > 10000 for r in results)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, what="workers to exit")
    assert "Stopped." in s.log()


def test_a_full_queue_refuses_at_once_with_429_and_loses_nothing(server):
    s = server(*SIM, "--gpus", "cpu:1", "--max-queue", "2", "--sim-rtf", "0.3")
    results = []
    lock = threading.Lock()

    def call(i):
        t0 = time.monotonic()
        r = synth(s.url, f"Speaker 1: number {i} speaks for a while now")
        with lock:
            results.append((r, time.monotonic() - t0))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [(r, dt) for r, dt in results if r.status_code == 429]
    served = [(r, dt) for r, dt in results if r.status_code == 200]
    assert len(refused) + len(served) == 8
    assert refused and len(served) >= 3  # one running + two queued at least
    for r, dt in refused:
        assert int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "overloaded"
        assert dt < 2.0  # refused at once, not after waiting
    pool = s.get("/v1/pool").json()
    assert pool["workers"][0]["completed"] == len(served)
    assert pool["queue"]["length"] == 0


def test_an_engine_that_cannot_boot_exits_nonzero_naming_the_cause(tmp_path):
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", *SIM, "--gpus", "cpu:2", "--port", "0"]
    cmd += ["--sim-boot-error", "weights file model.safetensors is corrupt"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "weights file model.safetensors is corrupt" in p.stderr
    assert "No worker could start" in p.stderr


def test_a_missing_model_is_a_clear_config_error(tmp_path):
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", "--gpus", "cpu:1", "--port", "0"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--model_path" in p.stderr


def test_unknown_gpu_ids_are_a_clear_error():
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", *SIM, "--gpus", "0,1,3", "--port", "0"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "GPUs found" in p.stderr
