"""Faults of the host the server shares, caused for real: /dev/shm full at start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, free_port

SIM_ONE = ("--engine", "sim", "--gpus", "cpu:1")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a mount namespace of its own (a full /dev/shm) needs root and unshare",
)
def test_a_full_dev_shm_is_refused_at_start_with_a_message(tmp_path):
    """A full /dev/shm used to kill the launch with SIGBUS at the status board's first
    write (its file is made and sized in a full tmpfs all the same): no message,
    exit -7. Now the launch says what is full and exits 2."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m refused)")
    fill = (
        "mount -t tmpfs -o size=64k tmpfs /dev/shm"
        ' && dd if=/dev/zero of=/dev/shm/fill bs=4k count=16 2>/dev/null; exec "$@"'
    )
    launch = [sys.executable, "-m", "vibevoice_pool", "launch", *SIM_ONE]
    launch += ["--port", str(free_port()), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", fill, "sh", *launch],
        cwd=ROOT,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "no room in shared memory (/dev/shm) for the status board" in out
    assert "--shm-size" in out
