"""Real servers for the front-end tests (conftest's `server` starts one per test).

Starting a server costs seconds (Gradio's import, the workers), so the API, OpenAI,
bad-input and gradio_client modules share one: `shared_server(request, factory)`
starts it on first use and stops it when the session ends. Modules that need other
settings start their own: `with running_server(tmp, *args) as s`.
"""

from __future__ import annotations

import contextlib
import io
import wave

import numpy as np
from conftest import Server, pid_alive, wait_until

SIM = ("--engine", "sim", "--gpus", "cpu:2")
SHARED_ARGS = ("--sim-rtf", "0.02", "--max-text-chars", "500")
MAX_TEXT_CHARS = 500
_shared: dict[str, Server] = {}


def worker_pids(s: Server, api_key: str = "") -> list[int]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    workers = s.get("/v1/pool", headers=headers).json()["workers"]
    return [w["pid"] for w in workers if w["pid"]]


@contextlib.contextmanager
def running_server(tmp_path, *args: str, env: dict | None = None, api_key: str = ""):
    """A started, ready server; stopped at the end, and none of its workers left."""
    s = Server([*SIM, *args, *(("--api-key", api_key) if api_key else ())], tmp_path, env)
    pids: list[int] = []
    try:
        s.wait_ready()
        pids = worker_pids(s, api_key)
        yield s
    finally:
        try:
            if s.proc.poll() is None:
                pids = sorted(set(pids) | set(worker_pids(s, api_key)))
        except Exception:  # the server is already gone: its workers must be too
            pass
        s.stop()
        for pid in pids:
            wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")


ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"


@contextlib.contextmanager
def named_keys_server(tmp_path):
    """A sim server with two named user keys (--api-keys): alice's and bob's."""
    keys = tmp_path / "keys"
    keys.write_text(f"# who may call\nalice: {ALICE}\nbob: {BOB}\n")
    s = Server(["--engine", "sim", "--gpus", "cpu:1", "--api-keys", str(keys)], tmp_path)
    pids: list[int] = []
    try:
        s.wait_ready()
        pids = worker_pids(s, BOB)
        yield s
    finally:
        s.stop()
        for pid in pids:
            wait_until(lambda p=pid: not pid_alive(p), 15, what=f"worker {pid} to exit")


def wav_bytes(seconds: float = 1.0, rate: int = 24000, freq: float = 220.0) -> bytes:
    """A short mono 16-bit WAV: a valid voice sample."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def shared_server(request, tmp_path_factory) -> Server:
    """The session's shared sim server (2 workers, --max-text-chars 500)."""
    if "server" not in _shared:
        running = running_server(tmp_path_factory.mktemp("shared"), *SHARED_ARGS)
        _shared["server"] = running.__enter__()

        def stop() -> None:
            _shared.pop("server", None)
            running.__exit__(None, None, None)

        request.config.add_cleanup(stop)
    return _shared["server"]
