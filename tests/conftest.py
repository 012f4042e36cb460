"""Shared fixtures: free ports, an in-process Pool with real spawned workers,
and a real `vibevoice-pool launch` server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between the two looks
        return False


@pytest.fixture
def sim_pool(tmp_path):
    """Start an in-process Pool of sim workers: `with sim_pool(gpus="cpu:2", ...) as pool`."""
    from vibevoice_pool.config import build
    from vibevoice_pool.pool.facade import Pool

    pools = []

    @contextmanager
    def make(**settings):
        values = {"engine": "sim", "gpus": "cpu:2", "sim_rtf": 0.05, "cache_dir": str(tmp_path)}
        values.update(settings)
        pool = Pool.start(build(values))
        pools.append(pool)
        n = len(pool.live_slots())
        wait_until(lambda: pool.ready_workers() == n, 60, what="every worker to be ready")
        try:
            yield pool
        finally:
            pool.shutdown(grace_s=0)
            pools.remove(pool)

    yield make
    for pool in pools:
        pool.shutdown(grace_s=0)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A --cache-dir that already holds the tiny model, so servers skip building it."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache):
    """The tiny random VibeVoice, built once per test session, where --tiny-model looks."""
    from workers.checkpoints.tiny import ensure_tiny_model

    return ensure_tiny_model(tiny_cache / "tiny-model")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The tiny model in a VibeVoiceEngine of up to 4 rows, loaded in this process, one
    per test module (an engine keeps its running set between the module's tests)."""
    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice.engine import VibeVoiceEngine

    eng = VibeVoiceEngine(
        EngineSpec(engine="vibevoice", model_path=tiny_model_dir, max_batch_size=4)
    )
    eng.load()
    return eng


class Server:
    """A `vibevoice-pool launch` child process on a free port."""

    def __init__(
        self, args: list[str], tmp_path: Path, env: dict | None = None, group: bool = False
    ):
        """`group`: in a process group of its own, as a terminal starts it (a signal to
        the group reaches every process the launch started, and not pytest)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        full_env = dict(os.environ, TMPDIR=str(tmp_path), **(env or {}))
        cmd = [sys.executable, "-m", "vibevoice_pool", "launch", "--port", str(self.port)]
        cmd += ["--cache-dir", str(tmp_path / "cache"), *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=group,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def wait_ready(self, timeout: float = 120) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                r = self.get("/ready", timeout=2)
            except httpx.HTTPError:
                return False
            body = r.json() if r.status_code == 200 else {}
            return body.get("ready_workers") == body.get("workers")  # every worker up

        wait_until(ready, timeout, 0.1, "every worker of the server to be ready")

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.get("/v1/pool").json()["workers"] if w["pid"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def server(tmp_path):
    """`server(args...)` starts a real server process; all are stopped at the end."""
    started: list[Server] = []

    def start(*args: str, env: dict | None = None, wait: bool = True, group=False) -> Server:
        s = Server(list(args), tmp_path, env, group)
        started.append(s)
        if wait:
            s.wait_ready()
        return s

    yield start
    for s in started:
        pids = []
        try:
            if s.proc.poll() is None:
                pids = s.worker_pids()
        except Exception:
            pass
        s.stop()
        for pid in pids:  # no worker may outlive its server
            wait_until(lambda p=pid: not pid_alive(p), 10, what=f"worker {pid} to exit")


def pytest_collection_modifyitems(config, items):
    """The container image test builds an image for minutes as root: it runs only when
    its marker is asked for (`make test-image`, which .ci/run calls after `make test`)."""
    if "container" in (config.getoption("markexpr") or ""):
        return
    kept = [i for i in items if i.get_closest_marker("container") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
