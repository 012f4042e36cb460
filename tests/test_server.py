"""The real `vibevoice-pool launch` process: readiness, parent death,
graceful SIGTERM, a full queue, an engine that cannot boot."""

from __future__ import annotations

import os
import signal
import socket
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
    # each worker's death pipe closes with the parent: it exits within moments
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, what="every worker to exit")


def test_running_workers_leave_by_themselves_with_the_watchdog_stopped(server):
    """The watchdog only backs up a worker that cannot run: one that runs leaves by
    itself when its parent is gone (its death pipe, or its request pipe's end). With
    the watchdog SIGSTOPped nothing else can end them; the test above would pass on
    the watchdog alone."""
    import psutil

    s = server(*SIM, "--gpus", "cpu:2")
    pids = s.worker_pids()
    (dog,) = [
        p for p in psutil.Process(s.proc.pid).children() if "watchdog.main" in " ".join(p.cmdline())
    ]
    dog.send_signal(signal.SIGSTOP)
    try:
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, what="every worker to exit")
    finally:
        dog.send_signal(signal.SIGCONT)  # it reads the end of its pipe, finds none, exits
    dog.wait(15)


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(server):
    s = server(*SIM, "--gpus", "cpu:2", "--sim-rtf", "0.4", "--grace-s", "30")
    results = []

    def call(i):
        results.append(synth(s.url, f"Speaker 1: request number {i} " + "is fairly long " * 3))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def all_in() -> bool:  # two running, and all four in the pool (a late one was refused)
        status = s.get("/v1/pool").json()
        running = sum(w["inflight"] for w in status["workers"])
        return running >= 2 and running + status["queue"]["length"] == 4

    wait_until(all_in, 20, what="requests in flight")
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


def _group_left(pgid: int) -> list[str]:
    """The processes still in the launch's process group (it led its own)."""
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return out.split()


def _long_synth(url: str, results: list, sentences: int = 20) -> threading.Thread:
    def call():
        try:
            r = synth(url, "Speaker 1: " + "a sentence that takes a while to say " * sentences)
            results.append((r.status_code, r.headers.get("content-type"), r.text[:200]))
        except httpx.HTTPError as e:
            results.append(("error", repr(e), ""))

    t = threading.Thread(target=call)
    t.start()
    return t


def test_ctrl_c_three_times_to_the_group_stops_at_once_and_answers_the_request(server):
    s = server(*SIM, "--gpus", "cpu:1", "--sim-rtf", "0.5", group=True)
    results: list = []
    t = _long_synth(s.url, results)
    wait_until(lambda: s.get("/v1/pool").json()["workers"][0]["inflight"] == 1, 20, what="busy")
    t0 = time.monotonic()
    for _ in range(3):  # a terminal's Ctrl+C reaches the whole group; the third broke the stop
        os.killpg(s.proc.pid, signal.SIGINT)
        time.sleep(0.7)
    assert s.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15  # not the 30 s grace: the second Ctrl+C stops now
    t.join(10)
    assert results == [(503, "application/json", results[0][2])], results
    assert '"code":"unavailable"' in results[0][2]
    wait_until(lambda: not _group_left(s.proc.pid), 10, what="the group to be gone")
    log = s.log()
    assert "SIGINT again: stopping now" in log and "Stopped." in log
    assert "Traceback" not in log and "zygote" not in log.split("SIGINT: stopping")[1]


def test_one_grace_for_the_whole_stop_and_the_request_gets_a_json_answer(server):
    s = server(*SIM, "--gpus", "cpu:1", "--sim-rtf", "0.5", "--grace-s", "2", group=True)
    results: list = []
    t = _long_synth(s.url, results)
    wait_until(lambda: s.get("/v1/pool").json()["workers"][0]["inflight"] == 1, 20, what="busy")
    t0 = time.monotonic()
    os.killpg(s.proc.pid, signal.SIGTERM)  # systemd's stop: the whole group
    assert s.proc.wait(30) == 0
    took = time.monotonic() - t0
    assert 2 <= took < 2 + 3 + 6  # grace, then the pool's answer; not grace twice over
    t.join(10)
    assert results[0][:2] == (503, "application/json"), results  # not uvicorn's plain 500
    log = s.log()
    assert "Exception in ASGI application" not in log and "Traceback" not in log
    assert "zygote" not in log.split("SIGTERM: stopping")[1]  # the group's SIGTERM spares it


def test_a_signal_while_the_workers_start_stops_them_without_a_traceback(server):
    s = server(*SIM, "--gpus", "cpu:2", "--sim-boot-s", "30", wait=False, group=True)
    wait_until(lambda: "Initialising" in s.log(), 60, what="a worker to start booting")
    os.killpg(s.proc.pid, signal.SIGTERM)
    assert s.proc.wait(30) == 128 + signal.SIGTERM
    wait_until(lambda: not _group_left(s.proc.pid), 10, what="the group to be gone")
    log = s.log()
    assert "SIGTERM while starting" in log and "Traceback" not in log


def test_a_port_in_use_is_refused_before_any_worker_starts(server, tmp_path):
    first = server(*SIM, "--gpus", "cpu:1")
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", *SIM, "--gpus", "cpu:1"]
    cmd += ["--port", str(first.port), "--cache-dir", str(tmp_path / "second")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"cannot listen on 127.0.0.1:{first.port}: the port is in use" in p.stderr
    assert "Initialising" not in p.stderr and "Traceback" not in p.stderr


def test_a_port_taken_while_the_workers_start_is_refused_not_served(server):
    """The port is bound before the workers start but listened on only once they are up:
    another server (SO_REUSEADDR, as uvicorn binds) may take it meanwhile. That launch
    used to log `Serving on` and hang, answering nothing; it must exit 2 and say why."""
    s = server(*SIM, "--gpus", "cpu:1", "--sim-boot-s", "3", wait=False)
    wait_until(lambda: "Initialising" in s.log(), 60, what="a worker to start booting")
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        other.bind(("127.0.0.1", s.port))
        other.listen()
        assert s.proc.wait(60) == 2
    finally:
        other.close()
    log = s.log()
    assert f"cannot listen on 127.0.0.1:{s.port}: the port is in use" in log
    assert "Serving on" not in log and "Traceback" not in log


def test_the_ray_backend_without_ray_says_how_to_install_it_and_leaks_nothing(tmp_path):
    """RAY.md: without Ray, `--backend ray` stops at once and prints the install command.
    It did, after making the status board's shared memory, which it left behind (the
    resource tracker's "leaked shared_memory objects" warning at exit)."""
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError('no ray here', name='ray')\n")
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", *SIM, "--backend", "ray"]
    cmd += ["--gpus", "cpu:1", "--port", "0", "--cache-dir", str(tmp_path / "c")]
    path = os.pathsep.join([str(shim.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2, p.stderr
    assert "pip install 'vibevoice-pool[ray]'" in p.stderr
    assert "leaked" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_closed_terminal_sighup_stops_it_cleanly(server):
    s = server(*SIM, "--gpus", "cpu:1", group=True)
    os.killpg(s.proc.pid, signal.SIGHUP)  # the terminal's whole group, its resource tracker too
    assert s.proc.wait(30) == 0
    wait_until(lambda: not _group_left(s.proc.pid), 10, what="the group to be gone")
    log = s.log()
    assert "SIGHUP: stopping" in log and "Stopped." in log and "Traceback" not in log


@pytest.mark.parametrize(
    "env,words",
    [
        ({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}, "cannot be reached"),
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ],
)
def test_a_hub_model_that_cannot_be_downloaded_is_refused_before_any_worker(tmp_path, env, words):
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", "--gpus", "cpu:1", "--port", "0"]
    cmd += ["--model_path", "nosuch-org/nosuch-model", "--cache-dir", str(tmp_path / "c")]
    full = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), **env)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=full)
    assert p.returncode == 2 and words in p.stderr, p.stderr
    assert "Initialising" not in p.stderr and time.monotonic() - t0 < 30


def test_the_same_signal_twice_at_once_drains_rather_than_stops_now(server):
    """coreutils' `timeout` sends its SIGTERM to the command and then to the command's
    group: the server got it twice, a few milliseconds apart, and took the second as
    "stop now", so `timeout ... vibevoice-pool launch` answered every accepted request
    503 instead of letting it finish."""
    s = server(*SIM, "--gpus", "cpu:1", "--sim-rtf", "0.1")
    results: list = []
    t = _long_synth(s.url, results)
    wait_until(lambda: s.get("/v1/pool").json()["workers"][0]["inflight"] == 1, 20, what="busy")
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM: stopping" in s.log(), 10, 0.01, "the first SIGTERM")
    s.proc.send_signal(signal.SIGTERM)  # the group's copy, as timeout sends it
    assert s.proc.wait(60) == 0
    t.join(10)
    assert results and results[0][:2] == (200, "audio/wav"), results
    assert "stopping now" not in s.log()


def test_the_process_ends_soon_after_it_says_stopped(server):
    """After "Stopped." the interpreter's last garbage collection walked every object
    the server had made (Gradio, FastAPI, torch): 2-3 s more before the exit, on
    top of the drain, for a container's stop timeout to pay."""
    s = server(*SIM, "--gpus", "cpu:1")
    s.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "Stopped." in s.log(), 30, 0.01, "the stop")
    t0 = time.monotonic()
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t0 < 1.5  # 2-3 s before, on an idle machine


def test_no_queued_job_starts_once_the_server_is_stopping(server):
    """A job waiting its turn when the stop came was started during the drain, only
    to be cut at the deadline: wasted work that held the stop. It waits for the next
    start instead; what was accepted finishes."""
    s = server(*SIM, "--gpus", "cpu:1", "--sim-rtf", "0.1", "--max-batch-size", "2")
    results: list = []
    threads = [_long_synth(s.url, results, n) for n in (40, 4)]  # both rows: the drain's
    wait_until(lambda: s.get("/v1/pool").json()["workers"][0]["inflight"] == 2, 20, what="busy")
    first = s.post("/v1/jobs", json={"script": "Speaker 1: the job in the pool's queue."})
    second = s.post("/v1/jobs", json={"script": "Speaker 1: the job that waits its turn."})
    first, second = first.json()["id"], second.json()["id"]
    wait_until(lambda: f"job {first} running" in s.log(), 20, what="the first job handed over")
    assert f"job {second} running" not in s.log()  # the pool's queue is at its depth
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0
    for t in threads:
        t.join(10)
    log = s.log()
    assert [r[0] for r in results] == [200, 200], results
    assert f"job {first} done" in log and f"job {second} running" not in log, log


def test_the_logged_url_of_an_ipv6_bind_has_its_address_in_brackets():
    from vibevoice_pool.server import base_url

    assert base_url("::", 7860) == "http://[::]:7860"
    assert base_url("::1", 80) == "http://[::1]:80"
    assert base_url("127.0.0.1", 7860) == "http://127.0.0.1:7860"
