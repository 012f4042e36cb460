"""A launch that is PID 1 of its PID namespace, as a container whose command replaced
the image's entry point (tini) runs it: orphans come to it and nothing reaps them, so
it says so. The namespace is made for real (unshare), which needs root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from conftest import ROOT, free_port, wait_until

from vibevoice_pool.pool.stopping import NO_INIT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace of its own needs root and unshare (util-linux)",
)


def launch(tmp_path, pid_namespace: bool):
    port = free_port()
    cmd = [sys.executable, "-m", "vibevoice_pool", "launch", "--engine", "sim"]
    cmd += ["--gpus", "cpu:1", "--port", str(port), "--cache-dir", str(tmp_path / "cache")]
    if pid_namespace:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
    log_path = tmp_path / f"launch-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TMPDIR=str(tmp_path)),
        )

    def ready():
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 120, 0.1, "the server to be ready")
        (server,) = (
            psutil.Process(proc.pid).children() if pid_namespace else [psutil.Process(proc.pid)]
        )
        server.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children():
                child.kill()  # the namespace's PID 1: the rest go with it
            proc.kill()
            proc.wait(30)
    return log_path.read_text()


def test_a_launch_that_is_pid_1_says_nothing_reaps_its_orphans(tmp_path):
    text = launch(tmp_path, pid_namespace=True)
    assert NO_INIT in text and "Stopped." in text


def test_a_launch_under_an_init_says_nothing_of_it(tmp_path):
    text = launch(tmp_path, pid_namespace=False)
    assert "Running as PID 1" not in text and "Stopped." in text
