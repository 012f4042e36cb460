"""A SIGKILLed Ray backend server, run by tests/test_ray.py INSIDE a private
network namespace, as tests/ray_scenario.py (whose Scenario it builds on).

    python tests/ray_parent_death.py --kill-server --workdir DIR

SIGSTOPs one replica (a process that cannot notice anything) and SIGKILLs the
server itself once both replicas are ready, and reports which of the processes
it started (Ray's, by pid) are still alive and whether its Ray's session folder
is still there, for up to KILL_WAIT_S; then starts the server again on the same
port and temp dir and reports how that one boots, serves and stops.

    python tests/ray_parent_death.py --kill-joined --workdir DIR

starts a Ray of its own (a cluster the servers do not own), two servers joined
to it (`--address`), SIGKILLs the first, and reports how long its Serve
applications and its warden outlive it (up to ORPHAN_WAIT_S), whether the
second's applications and replicas are untouched and it still serves, and
whether that Ray's own processes and session folder are still there.

Each prints one JSON object on its last line, and only ends processes it
started, by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from ray_scenario import Descendants, Scenario

from vibevoice_pool.ray.cluster import SHORT_TEMP_DIR, only_loopback

KILL_WAIT_S = 15.0  # what a SIGKILLed server's Ray left is ended within a few seconds
POOLS = "vibevoice-pool-"  # our applications' and wardens' names start with it
ORPHAN_WAIT_S = 30.0  # a SIGKILLed joined server's applications go within seconds
# A Ray that is not the servers': it prints its GCS address and session folder,
# then for each line on its stdin the Serve applications and named actors of
# that Ray (a JSON line), and shuts down when its stdin closes.
CLUSTER = """
import json, sys, ray
from ray import serve
ctx = ray.init(address="local", num_cpus=2, include_dashboard=False,
               _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1],
               object_store_memory=256 * 2**20)
info = ctx.address_info
print(json.dumps({"gcs": info["gcs_address"], "session_dir": info["session_dir"]}), flush=True)
for _ in sys.stdin:
    actors = ray.util.list_named_actors(all_namespaces=True)
    apps = sorted(serve.status().applications)
    print(json.dumps({"apps": apps, "actors": sorted(a["name"] for a in actors)}), flush=True)
ray.shutdown()
"""


class ParentDeath(Scenario):
    def session_dir(self) -> str:
        """The session folder of the server's local Ray (from its GCS's command line)."""
        self.procs.refresh()
        for cmd in self.procs.cmds.values():
            if cmd.split(" ", 1)[0].endswith("/gcs_server"):
                for arg in cmd.split():
                    if arg.startswith("--session-dir="):
                        return arg.split("=", 1)[1]
        return ""

    def kill_server(self) -> dict:
        """SIGKILL the server: nothing its Ray started may outlive it by more than a
        few seconds, nor its session folder; a second start then works."""
        left: list[psutil.Process] = []
        try:
            self.boot()
            self.procs.sample()
            first, session = self.procs, self.session_dir()
            latest = Path(session).parent / "session_latest"
            started = {pid: cmd[:120] for pid, cmd in first.cmds.items()}
            stopped = self.pool()["workers"][0]["pid"]
            os.kill(stopped, signal.SIGSTOP)  # a replica the server started
            os.kill(self.server.pid, signal.SIGKILL)  # the server this scenario started
            killed_at = time.monotonic()
            self.server.wait(10)
            first.stop()
            gone_s = folder_s = None
            while time.monotonic() - killed_at < KILL_WAIT_S:
                now = round(time.monotonic() - killed_at, 1)
                if gone_s is None and not first.alive():
                    gone_s = now
                if folder_s is None and not os.path.exists(session):
                    folder_s = now
                if gone_s is not None and folder_s is not None:
                    break
                time.sleep(0.1)
            left = first.alive()
            self.result["phases"]["killed"] = {
                "started": started,
                "session_dir": session,
                "stopped_replica": stopped,
                "pids_gone_s": gone_s,
                "folder_gone_s": folder_s,
                "left": [{"pid": p.pid, "cmd": first.cmds[p.pid][:120]} for p in left],
                "folder_left": os.path.exists(session),
                "latest_is_ours": os.path.islink(latest)
                and os.path.realpath(latest) == os.path.realpath(session),
            }
            self._log.close()
            # again, on the same port and temp dir, with whatever the first left
            self.boot("server2.log")
            self.procs.sample()
            self.result["phases"]["again"] = {
                "session_dir": self.session_dir(),
                "answer": self.synth("After the kill.", 5),
            }
        except Exception as e:
            self.result["error"] = f"{type(e).__name__}: {e}"
        for p in left:  # leave nothing behind: what the first server left, reported above
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.server is not None and self.server.poll() is None:
            self.shutdown()
        killed, again = (self.result["phases"].get(k, {}) for k in ("killed", "again"))
        for folder in (killed.get("session_dir"), again.get("session_dir")):
            if folder:  # the Rays this scenario had started (a clean stop leaves its folder)
                shutil.rmtree(folder, ignore_errors=True)
        self._log.close()
        self.result["log_tail"] = self.log_path.read_text()[-3000:]
        return self.result

    def kill_joined(self) -> dict:
        """Two servers joined to a Ray they did not start; SIGKILL the first: its
        applications (and their replicas) and its warden go, the second's stay and
        it serves, and that Ray's own processes and folder are left alone."""
        os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        owner = subprocess.Popen(
            [sys.executable, "-c", CLUSTER, SHORT_TEMP_DIR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

        def look() -> dict:  # the cluster's Serve applications and named actors
            owner.stdin.write("?\n")
            owner.stdin.flush()
            return json.loads(owner.stdout.readline())

        cluster = Descendants(owner.pid)
        (self.workdir / "other").mkdir(exist_ok=True)
        other = Scenario(self.engine, self.workdir / "other")
        info: dict = {}
        try:
            info = json.loads(owner.stdout.readline())
            self.boot("server.log", "--address", info["gcs"])
            first = look()
            other.boot("server.log", "--address", info["gcs"])
            both = look()
            cluster.sample()
            cluster.refresh()
            before = {p.pid: cluster.cmds[p.pid][:120] for p in cluster.alive()}
            victim = [w["pid"] for w in self.pool()["workers"]]
            kept = [w["pid"] for w in other.pool()["workers"]]
            os.kill(self.server.pid, signal.SIGKILL)  # the server this scenario started
            killed_at = time.monotonic()
            self.server.wait(10)
            mine = {name for name in first["apps"] + first["actors"] if name.startswith(POOLS)}
            gone_s, now = None, look()
            while time.monotonic() - killed_at < ORPHAN_WAIT_S:
                if not mine & (set(now["apps"]) | set(now["actors"])):
                    gone_s = round(time.monotonic() - killed_at, 1)
                    break
                time.sleep(0.2)
                now = look()
            alive = {p.pid for p in cluster.alive()}
            self.result["phases"]["joined"] = {
                "session_dir": info["session_dir"],
                "first": first,
                "both": both,
                "after": now,
                "orphans_gone_s": gone_s,
                "victim_replicas_alive": [pid for pid in victim if pid in alive],
                "kept_replicas": kept,
                "kept_replicas_alive": [pid for pid in kept if pid in alive],
                "cluster_pids": before,
                "gone": {pid: cmd for pid, cmd in before.items() if pid not in alive},
                "folder_left": os.path.isdir(info["session_dir"]),
                "owner_alive": owner.poll() is None,
                "other_answer": other.synth("The other pool still serves.", 3),
            }
            other.shutdown()
            self.result["phases"]["other_stopped"] = {
                "exit_code": other.result["phases"]["shutdown"]["exit_code"],
                "after": look(),
            }
        except Exception as e:
            self.result["error"] = f"{type(e).__name__}: {e}"
        for scenario in (self, other):
            if scenario.server is not None and scenario.server.poll() is None:
                scenario.shutdown()
        owner.stdin.close()  # its Ray shuts down
        try:
            owner.wait(60)
        except subprocess.TimeoutExpired:
            owner.kill()
        cluster.stop()
        for p in cluster.alive():  # leave nothing behind: that Ray was ours
            try:
                p.kill()
            except psutil.Error:
                pass
        if info.get("session_dir"):
            folder = Path(info["session_dir"])
            shutil.rmtree(folder, ignore_errors=True)
            latest = folder.parent / "session_latest"  # Ray's link to it, if still to it
            if latest.is_symlink() and os.readlink(latest) == str(folder):
                latest.unlink()
        logs = []
        for scenario in (self, other):
            if scenario.server is not None:
                scenario._log.close()
                logs.append(scenario.log_path.read_text()[-1500:])
        self.result["log_tail"] = "\n----\n".join(logs)
        return self.result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--engine", choices=("sim",), default="sim")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--kill-server", action="store_true")
    mode.add_argument("--kill-joined", action="store_true")
    ns = ap.parse_args()
    if not only_loopback():
        print(json.dumps({"error": "not inside a private network namespace"}))
        return 2
    workdir = Path(ns.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scenario = ParentDeath(ns.engine, workdir)
    result = scenario.kill_server() if ns.kill_server else scenario.kill_joined()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
