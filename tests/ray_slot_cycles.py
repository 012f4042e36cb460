"""Adding and removing replicas again and again on a Ray backend server, run by
tests/test_ray.py INSIDE a private network namespace, as tests/ray_scenario.py
(whose Scenario it builds on).

    python tests/ray_slot_cycles.py --workdir DIR [--cycles N]

Starts `launch --backend ray --gpus cpu:2` with the sim engine (its status board
has room for the two workers and 16 more), removes both replicas, then N times:
adds a replica (POST /v1/pool/workers), waits for it to be ready, notes its
row (id, completed, restarts), sends it a request (the only replica: it serves
it), removes it (DELETE) and waits for it to leave /v1/pool. Then it reports
which of the processes the server started are Serve replicas still alive, the
Serve applications it made and the warnings and errors in its log, stops the server with SIGTERM, and prints
one JSON object on its last line. It only ends processes it started, by pid.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from ray_scenario import BOOT_TIMEOUT_S, Scenario

from vibevoice_pool.ray.cluster import only_loopback

CYCLES = 4  # each add a removed slot's: a new slot (the old code) shows at the first
REPLICA_GONE_S = 30.0


class SlotCycles(Scenario):
    def ids(self) -> list[int]:
        return [w["id"] for w in self.pool()["workers"]]

    def worker(self, index: int) -> dict | None:
        return next((w for w in self.pool()["workers"] if w["id"] == index), None)

    def remove(self, index: int) -> int:
        status = self.client.request("DELETE", f"/v1/pool/workers/{index}", json={}).status_code
        self.wait(lambda: index not in self.ids(), 60, f"worker {index} to be removed")
        return status

    def one_cycle(self) -> dict:
        r = self.client.post("/v1/pool/workers", json={"device": "cpu"})
        out: dict = {"status": r.status_code}
        if r.status_code != 201:
            out["error"] = r.json().get("error", {}).get("message", r.text)
            return out
        index = out["id"] = r.json()["id"]

        def ready():
            w = self.worker(index)
            return w if w and w["state"] == "ready" else None

        w = self.wait(ready, BOOT_TIMEOUT_S, f"added replica {index} to be ready")
        out.update(completed=w["completed"], restarts=w["restarts"], device=w["device"])
        out["answer"] = self.synth("A request for the added replica.", 5)
        out["removed"] = self.remove(index)
        return out

    def replicas_alive(self) -> list[str]:
        self.procs.sample()
        self.procs.refresh()
        return sorted(
            self.procs.cmds[p.pid]
            for p in self.procs.alive()
            if "ServeReplica" in self.procs.cmds[p.pid]
        )

    def cycles(self, n: int) -> dict:
        t0 = time.monotonic()
        try:
            self.boot()
            self.result["phases"]["first_removed"] = [self.remove(0), self.remove(1)]
            rounds = self.result["phases"]["cycles"] = []
            for _ in range(n):
                rounds.append(self.one_cycle())
                if rounds[-1]["status"] != 201:
                    break
            deadline = time.monotonic() + REPLICA_GONE_S
            while (alive := self.replicas_alive()) and time.monotonic() < deadline:
                time.sleep(0.5)
            self.result["phases"]["replicas_left"] = alive
            text = self.log_path.read_text()  # before the SIGTERM, which warns
            self.result["apps"] = re.findall(r"as Serve application (\S+)", text)
            self.result["warnings"] = [
                line for line in text.splitlines() if " WARNING " in line or " ERROR " in line
            ]
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
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--engine", choices=("sim",), default="sim")
    ap.add_argument("--cycles", type=int, default=CYCLES)
    ns = ap.parse_args()
    if not only_loopback():
        print(json.dumps({"error": "not inside a private network namespace"}))
        return 2
    workdir = Path(ns.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(SlotCycles(ns.engine, workdir).cycles(ns.cycles)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
