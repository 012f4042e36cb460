"""The terminal commands find the server this user runs here without --url (and the
image's health check finds it whatever --port it was given): vibevoice_pool/api/address.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import ROOT, Server, pid_alive, wait_until
from serving import worker_pids

from vibevoice_pool.api import address as running


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A private runtime folder of this test's own, and no URL or port variables."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    for name in (running.URL_ENV, running.PORT_ENV):
        monkeypatch.delenv(name, raising=False)
    return run / "vibevoice-pool"


def command(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vibevoice_pool", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_published_server_is_the_default_and_a_dead_ones_file_is_dropped(here, monkeypatch):
    assert running.default_url() == running.FALLBACK_URL  # none runs: as before
    monkeypatch.setenv(running.PORT_ENV, "8123")  # the launch's variable, where it is shared
    assert running.default_url() == "http://127.0.0.1:8123"
    path = running.publish("0.0.0.0", 8765)
    assert path == here / f"{os.getpid()}.json" and here.stat().st_mode & 0o777 == 0o700
    assert running.servers() == [running.Server("http://127.0.0.1:8765", os.getpid())]
    assert running.default_url() == "http://127.0.0.1:8765"
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = here / f"{gone.pid}.json"
    stale.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": gone.pid, "created": 0}))
    reused = here / f"{os.getppid()}.json"  # a live pid, but not the process that wrote it
    reused.write_text(json.dumps({"url": "http://127.0.0.1:2", "pid": os.getppid(), "created": 1}))
    (here / "torn.json").write_text("{")
    assert [s.url for s in running.servers()] == ["http://127.0.0.1:8765"]
    assert not stale.exists() and not reused.exists()
    monkeypatch.setenv(running.URL_ENV, "http://127.0.0.1:9000/")  # said outright: it wins
    assert running.default_url() == "http://127.0.0.1:9000"
    monkeypatch.delenv(running.URL_ENV)
    parent = psutil.Process(os.getppid())
    other = {"url": "http://[::1]:7861", "pid": parent.pid, "created": parent.create_time()}
    (here / f"{parent.pid}.json").write_text(json.dumps(other))
    with pytest.raises(running.NoDefaultUrl) as e:  # two: the command must be told which
        running.default_url()
    assert "http://127.0.0.1:8765" in str(e.value) and "http://[::1]:7861" in str(e.value)
    running.withdraw(path)
    assert running.default_url() == "http://[::1]:7861"


def test_a_folder_others_can_write_is_not_trusted(here, tmp_path, monkeypatch):
    """A file in it could send the commands (and their API key) to another address."""
    here.mkdir(mode=0o700)
    here.chmod(0o777)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert running.folder() == tmp_path / "tmp" / f"vibevoice-pool-{os.getuid()}"
    assert running.client_url("::", 80) == "http://[::1]:80"
    assert running.client_url("10.0.0.5", 80) == "http://10.0.0.5:80"


def test_status_and_health_find_a_server_on_another_port_without_url(here, tmp_path):
    """`vibevoice-pool status` asked 127.0.0.1:7860 whatever port the server was launched
    on, and so did the image's health check for `docker run IMAGE --port 8000`."""
    env = dict(os.environ)
    s = Server(
        ["--engine", "sim", "--gpus", "cpu:1"],
        tmp_path,
        env={"XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"]},
    )
    pids: list[int] = []
    try:
        s.wait_ready()
        pids = worker_pids(s)
        assert s.port != 7860
        health = command("health", env=env)
        assert health.returncode == 0, health.stderr
        assert health.stdout.strip() == f"{s.url}: ready, 1 of 1 worker(s) ready"
        status = command("status", "--json", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["workers"], status.stderr
        refused = command("health", "--url", "http://127.0.0.1:9", env=env)
        assert refused.returncode == 1 and "not serving" in refused.stderr
        s.proc.send_signal(signal.SIGKILL)  # its file stays, but names a dead process
        s.proc.wait(30)
        assert (here / f"{s.proc.pid}.json").exists()
        assert running.servers() == [] and not (here / f"{s.proc.pid}.json").exists()
    finally:
        s.stop()
        for pid in pids:  # the dead parent's workers end themselves (its death pipe)
            wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")


def test_a_stopping_server_withdraws_its_address_first(here, tmp_path):
    s = Server(
        ["--engine", "sim", "--gpus", "cpu:1"],
        tmp_path,
        env={"XDG_RUNTIME_DIR": os.environ["XDG_RUNTIME_DIR"]},
    )
    try:
        s.wait_ready()
        assert running.servers() == [running.Server(s.url, s.proc.pid)]
        # the page's files are the server's own (server.private_page_files), gone with it
        page_files = tmp_path / f"vibevoice-pool-{os.getuid()}" / f"gradio-{s.port}"
        page_files.mkdir(parents=True, exist_ok=True)
        (page_files / "cached.wav").write_bytes(b"RIFF")
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        assert running.servers() == [] and list(here.iterdir()) == []
        assert not page_files.exists()
    finally:
        s.stop()


def test_a_live_launchs_file_of_another_layout_is_passed_over(here):
    """A file another version's live launch wrote, without the url this one reads: the
    commands pass it over (and leave it to its launch) instead of a KeyError."""
    here.mkdir(mode=0o700)
    me = psutil.Process()
    other = here / f"{me.pid}.json"
    other.write_text(json.dumps({"pid": me.pid, "created": me.create_time(), "urls": ["x"]}))
    assert running.servers() == []
    assert running.default_url() == running.FALLBACK_URL
    assert other.exists()
