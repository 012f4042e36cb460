"""The Ray backend end to end, run by tests/test_ray.py INSIDE a private network
namespace (only loopback: most of Ray's processes listen on every interface).

    python tests/ray_scenario.py --engine sim|tiny --workdir DIR

It starts `vibevoice-pool launch --backend ray --gpus cpu:2` (a local Ray with
two CPU replicas), and through the HTTP API on 127.0.0.1:
  served     requests come back 200 with audio
  kill       SIGKILL one replica's process (its pid from /v1/pool) while requests
             run: every request still completes, with all its audio
  recovered  Ray Serve replaces the replica; the slot is ready again
  quarantine (sim) a [[crash]] request takes down two replicas and is answered
             502 worker_lost, never retried a third time
  remove     (sim) two requests run, one replica is removed: its row moves to the
             other by resume (HandBack), and both come back whole
  shutdown   SIGTERM the server: it exits 0 and no process it started (Ray's
             gcs_server, raylet, replicas, ...) is alive, checked by pid
and prints one JSON object on its last line for the test to assert on. It only
ends processes it started, by pid.

    python tests/ray_scenario.py --signal-while-starting --workdir DIR

instead SIGTERMs the server while its local Ray is starting (ray.init): it
reports the exit code, the log and what it started that is still alive.

    python tests/ray_scenario.py --kill-raylet --workdir DIR

SIGKILLs the raylet of the server's local Ray once both replicas are ready (the
OOM killer's choice, say) and reports how the server ends, as above.
tests/ray_parent_death.py builds on this for a SIGKILLed server.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vibevoice_pool.ray.cluster import only_loopback  # noqa: E402

BOOT_TIMEOUT_S = 300.0  # Ray's start is 3 s on an idle machine, 30 s on a busy one
RECOVER_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_seconds(body: bytes) -> float:
    with wave.open(io.BytesIO(body)) as w:
        return w.getnframes() / w.getframerate()


class Descendants:
    """Every process the server has started, remembered by pid (with its start
    time, so a reused pid is never mistaken for ours), sampled every 0.2 s."""

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[int, psutil.Process] = {}
        self.cmds: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        try:
            children = psutil.Process(self.root).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in children:
            if p.pid in self.seen:
                continue
            try:
                self.cmds[p.pid] = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                continue
            self.seen[p.pid] = p

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def refresh(self) -> None:
        """Read again the command lines of those alive: one first seen between its
        fork and its exec had the server's (a raylet or a log monitor, say)."""
        for p in self.alive():
            try:
                self.cmds[p.pid] = " ".join(p.cmdline()) or p.name()
            except psutil.Error:
                pass

    def ray_pids(self) -> list[int]:
        """The ones that are Ray's (not uvicorn's helpers or the resource tracker)."""
        return sorted(pid for pid, cmd in self.cmds.items() if "ray" in cmd or "gcs_server" in cmd)


class Scenario:
    def __init__(self, engine: str, workdir: Path):
        self.engine = engine
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120, trust_env=False)
        self.result: dict = {"engine": engine, "only_loopback": only_loopback(), "phases": {}}
        self.server: subprocess.Popen | None = None
        self.procs: Descendants | None = None

    # ---- helpers -------------------------------------------------------

    def launch(self, log_name: str = "server.log", *extra: str) -> None:
        args = [sys.executable, "-m", "vibevoice_pool", "launch", "--backend", "ray", *extra]
        args += ["--gpus", "cpu:2", "--port", str(self.port), "--grace-s", "10"]
        args += [
            "--cache-dir",
            str(self.workdir / "cache"),
            "--data-dir",
            str(self.workdir / "data"),
        ]
        if self.engine == "sim":
            # two rows a replica: a removed replica's row moves only into a free place
            args += ["--engine", "sim", "--sim-rtf", "0.3", "--max-batch-size", "2"]
        else:
            args += ["--engine", "vibevoice", "--tiny-model", "--inference-steps", "4"]
        env = dict(os.environ, TMPDIR=str(self.workdir), HF_HUB_OFFLINE="1")
        env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
        self.log_path = self.workdir / log_name
        self._log = open(self.log_path, "w")
        self.server = subprocess.Popen(
            args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        self.procs = Descendants(self.server.pid)

    def pool(self) -> dict:
        return self.client.get("/v1/pool", timeout=10).json()

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"the server exited with {self.server.returncode} ({what})")
            try:
                value = predicate()
            except httpx.HTTPError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")

    def synth(self, text: str, seed: int) -> dict:
        body = {"script": f"Speaker 1: {text}", "seed": seed}
        r = self.client.post("/v1/synthesize", json=body)
        out = {"status": r.status_code, "worker": r.headers.get("x-worker")}
        if r.status_code == 200:
            out["audio_s"] = wav_seconds(r.content)
        else:
            out["code"] = r.json().get("error", {}).get("code")
        return out

    # ---- phases --------------------------------------------------------

    def boot(self, log_name: str = "server.log", *extra: str) -> None:
        t0 = time.monotonic()
        self.launch(log_name, *extra)

        def both_ready():
            workers = self.pool()["workers"]
            return len(workers) == 2 and all(w["state"] == "ready" for w in workers)

        self.wait(both_ready, BOOT_TIMEOUT_S, "two ready replicas")
        workers = self.pool()["workers"]
        self.result["phases"]["boot"] = {
            "seconds": round(time.monotonic() - t0, 1),
            "workers": [{k: w[k] for k in ("id", "state", "pid", "name")} for w in workers],
        }

    def served(self) -> None:
        text = "Hello from the Ray backend, this is a short test."
        answers = [self.synth(text, seed) for seed in (1, 2)]
        self.result["phases"]["served"] = {"answers": answers}

    def kill(self) -> None:
        """Six requests on two replicas; SIGKILL the first busy replica."""
        if self.engine == "sim":
            text = "a" * 60  # 3.4 s of audio, 1 s of work at sim_rtf 0.3
        else:
            text = "This request runs on the tiny model while its replica is killed."
        with ThreadPoolExecutor(6) as ex:
            futures = [ex.submit(self.synth, text, 10 + i) for i in range(6)]

            def busy():
                for w in self.pool()["workers"]:
                    if w["state"] == "busy" and w["pid"] and w["inflight"]:
                        return w
                return None

            victim = self.wait(busy, 60, "a busy replica")
            os.kill(victim["pid"], signal.SIGKILL)  # a replica the server started
            killed_at = time.monotonic()
            answers = [f.result() for f in futures]
        self.result["phases"]["kill"] = {
            "victim": victim["id"],
            "victim_pid": victim["pid"],
            "victim_inflight": victim["inflight"],
            "answers": answers,
            "victim_alive": psutil.pid_exists(victim["pid"])
            and psutil.Process(victim["pid"]).status() != psutil.STATUS_ZOMBIE,
        }

        def replaced():
            w = self.pool()["workers"][victim["id"]]
            ok = w["state"] == "ready" and w["pid"] not in (None, victim["pid"])
            return w if ok else None

        w = self.wait(replaced, RECOVER_TIMEOUT_S, "Ray Serve to replace the replica")
        again = self.synth("After the replacement.", 99)
        self.result["phases"]["recovered"] = {
            "seconds": round(time.monotonic() - killed_at, 1),
            "pid": w["pid"],
            "restarts": w["restarts"],
            "answer": again,
        }

    def quarantine(self) -> None:
        t0 = time.monotonic()
        answer = self.synth("[[crash]] this request kills every replica it runs on", 7)
        self.result["phases"]["quarantine"] = {
            "answer": answer,
            "seconds": round(time.monotonic() - t0, 1),
        }

    def remove(self) -> None:
        """Two requests on two replicas; remove one replica while both run."""

        def both_ready():
            return all(w["state"] == "ready" for w in self.pool()["workers"])

        self.wait(both_ready, RECOVER_TIMEOUT_S, "two ready replicas")
        text = "a" * 120  # 6.9 s of audio, 2 s of work at sim_rtf 0.3
        with ThreadPoolExecutor(2) as ex:
            futures = [ex.submit(self.synth, text, 30 + i) for i in range(2)]

            def both_busy():
                return all(w["batch_rows"] for w in self.pool()["workers"])

            self.wait(both_busy, 60, "both replicas running a row")
            r = self.client.request("DELETE", "/v1/pool/workers/1", json={})
            answers = [f.result() for f in futures]

        def removed():
            return [w["id"] for w in self.pool()["workers"]] == [0]

        self.wait(removed, 30, "the replica to be removed")
        self.result["phases"]["remove"] = {
            "status": r.status_code,
            "answers": answers,
            "rows": self.pool()["rows"],
        }

    def shutdown(self) -> None:
        self.procs.sample()
        ray_pids = self.procs.ray_pids()
        all_pids = sorted(self.procs.seen)
        t0 = time.monotonic()
        self.server.send_signal(signal.SIGTERM)
        try:
            code = self.server.wait(90)
        except subprocess.TimeoutExpired:
            self.server.kill()
            code = self.server.wait(10)
        self.procs.stop()
        exited = round(time.monotonic() - t0, 1)
        deadline = time.monotonic() + 20
        while self.procs.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = self.procs.alive()
        for p in survivors:  # leave nothing behind, and say so
            try:
                p.kill()
            except psutil.Error:
                pass
        self.result["phases"]["shutdown"] = {
            "exit_code": code,
            "seconds": exited,
            "ray_pids": ray_pids,
            "pids_checked": len(all_pids),
            "survivors": [{"pid": p.pid, "cmd": self.procs.cmds[p.pid][:120]} for p in survivors],
        }

    def signal_while_starting(self) -> dict:
        """SIGTERM while ray.init runs (it puts its own SIGTERM handler in)."""
        self.launch()

        def ray_starting():
            return "Starting a local Ray" in self.log_path.read_text()

        self.wait(ray_starting, BOOT_TIMEOUT_S, "Ray to start")
        time.sleep(0.5)  # into ray.init, which takes seconds
        self.procs.sample()
        self.result["ray_still_starting"] = "Initialising" not in self.log_path.read_text()
        self.shutdown()
        self._log.close()
        self.result["log_tail"] = self.log_path.read_text()[-3000:]
        return self.result

    def kill_raylet(self) -> dict:
        """Ray cannot come back from a dead raylet: the server must end, not serve nothing."""
        try:
            self.boot()
            self.procs.sample()
            self.procs.refresh()
            cmds = self.procs.cmds.items()
            (raylet,) = [pid for pid, cmd in cmds if cmd.split(" ", 1)[0].endswith("/raylet")]
            os.kill(raylet, signal.SIGKILL)  # a process the server started
            try:
                self.result["exit_code"] = self.server.wait(RECOVER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.result["exit_code"] = None  # still up: shutdown() stops it
        except Exception as e:
            self.result["error"] = f"{type(e).__name__}: {e}"
        self.shutdown()
        self._log.close()
        text = self.log_path.read_text()  # Ray prints its raylet's last lines too
        self.result["errors"] = [line for line in text.splitlines() if " ERROR " in line]
        self.result["log_tail"] = text[-3000:]
        return self.result

    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            self.boot()
            self.served()
            self.kill()
            if self.engine == "sim":
                self.quarantine()
                self.remove()
        except Exception as e:  # reported, not raised: the test asserts on the JSON
            self.result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if self.server is not None:
                self.shutdown()
                self._log.close()
                self.result["log_tail"] = self.log_path.read_text()[-3000:]
        self.result["seconds"] = round(time.monotonic() - t0, 1)
        return self.result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=("sim", "tiny"), default="sim")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--signal-while-starting", action="store_true")
    ap.add_argument("--kill-raylet", action="store_true")
    ns = ap.parse_args()
    if not only_loopback():
        print(json.dumps({"error": "not inside a private network namespace"}))
        return 2
    workdir = Path(ns.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(ns.engine, workdir)
    if ns.signal_while_starting:
        print(json.dumps(scenario.signal_while_starting()))
    elif ns.kill_raylet:
        print(json.dumps(scenario.kill_raylet()))
    else:
        print(json.dumps(scenario.run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
