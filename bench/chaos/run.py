"""Chaos: a real server on the tiny model with 2 CPU workers (bench/soak's server), mixed
traffic from a few clients, and faults at random on a seeded schedule; every answer is
checked against the same request's answer on the quiet server (traffic.py).

    python -m bench.chaos.run [--minutes 3] [--seed S] [--out docs/chaos/chaos-DATE.jsonl]

The seed (printed, and the record's first line) draws the clients' requests and the
faults: their kinds, their workers and the pauses between them, so a failing run can be
replayed (the timings between threads are the machine's). Faults, from FAULT_THREADS
threads at once (a kill can hit a worker that drains, or the other one while one hangs);
a victim is any worker with a process (ready, busy or draining):

    sigkill     SIGKILL a worker
    sigstop     SIGSTOP a worker past the hang timeout (the supervisor kills
                it), then SIGCONT
    restart     POST /v1/pool/workers/{id}/restart
    remove_add  DELETE /v1/pool/workers/{id} (its rows move), then POST /v1/pool/workers
    preempt     enough jobs to fill every worker's batch, then interactive requests:
                the pool gives a job's place to them (the `preempted` count says whether
                it did)

A request running on two workers that died is answered worker_lost (quarantined) by
design: random kills can hit one twice; the record counts those apart. At the end, with
the pool quiet: every accepted request had exactly one answer (none hung), each completed answer's samples equal the reference (TOLERANCE_LSB), every
worker is ready, and /v1/pool agrees with /ready. One JSON line a request and a fault,
the last line the end's checks; `python -m bench.chaos.record FILE` prints the section.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.chaos import record
from bench.chaos.traffic import KINDS, WEIGHTS, Client, keys, references
from bench.soak.run import HANG_S, facts, pool, settled, start

CLIENTS = 4
FAULTS = ("sigkill", "sigstop", "restart", "remove_add", "preempt")
FAULT_WEIGHTS = (3, 1, 1, 1, 1)
PAUSE_S = (2.0, 6.0)  # between two faults, drawn
WORKERS = 2
FAULT_THREADS = 2  # faults overlap: a kill while another worker drains, hangs or restarts
ALIVE = ("ready", "busy", "draining")


class Log:
    """The run's lines, written as they come (threads share it)."""

    def __init__(self, path: Path):
        self.out = path.open("w")
        self.lock = threading.Lock()

    def write(self, row: dict) -> None:
        with self.lock:
            self.out.write(json.dumps(row) + "\n")
            self.out.flush()


def alive(url: str) -> list[dict]:
    """Workers with a process: serving, or draining for a removal."""
    return [w for w in pool(url)["workers"] if w["state"] in ALIVE and w["pid"]]


class Faults:
    """The fault thread: one fault, a drawn pause, the next, until `stop`."""

    def __init__(self, url: str, rng: random.Random, log: Log, refs: dict):
        self.url, self.rng, self.log, self.refs = url, rng, log, refs
        self.stop = threading.Event()
        self.extra: list = []  # the preempt fault's requests (futures of rows)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="preempt")

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(*PAUSE_S)):
            kind = self.rng.choices(FAULTS, FAULT_WEIGHTS)[0]
            row = {"fault": kind, "t": time.time()}
            try:
                row |= getattr(self, kind)()
            except (httpx.HTTPError, OSError, KeyError) as e:
                row |= {"error": f"{type(e).__name__}: {e}"[:200]}
            self.log.write(row)

    def _victim(self) -> dict | None:
        ws = alive(self.url)
        return self.rng.choice(ws) if ws else None

    def sigkill(self) -> dict:
        w = self._victim()
        if w is None:
            return {"skipped": "no worker alive"}
        os.kill(w["pid"], signal.SIGKILL)
        return {"worker": w["id"], "pid": w["pid"], "inflight": w["inflight"]}

    def sigstop(self) -> dict:
        w = self._victim()
        if w is None:
            return {"skipped": "no worker alive"}
        os.kill(w["pid"], signal.SIGSTOP)
        self.stop.wait(HANG_S + 3)  # past the hang timeout: the supervisor kills it
        try:
            os.kill(w["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
        return {"worker": w["id"], "pid": w["pid"], "inflight": w["inflight"]}

    def restart(self) -> dict:
        w = self._victim()
        if w is None:
            return {"skipped": "no worker alive"}
        # a worker route needs a JSON body without a key (api/origin.py: no web page can)
        r = httpx.post(f"{self.url}/v1/pool/workers/{w['id']}/restart", json={}, timeout=30)
        return {"worker": w["id"], "status": r.status_code, "inflight": w["inflight"]}

    def remove_add(self) -> dict:
        ws = pool(self.url)["workers"]
        if len(ws) < WORKERS or any(w["state"] == "draining" for w in ws):
            return {"skipped": f"{len(ws)} workers, or one draining"}
        w = self.rng.choice(ws)
        r = httpx.request("DELETE", f"{self.url}/v1/pool/workers/{w['id']}", json={}, timeout=30)
        out = {"worker": w["id"], "status": r.status_code, "inflight": w["inflight"]}
        if r.status_code != 202:
            return out | {"error": r.text[:200]}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
            x["id"] == w["id"] for x in pool(self.url)["workers"]
        ):
            time.sleep(0.2)
        out["drained_s"] = round(120 - (deadline - time.monotonic()), 2)
        r = httpx.post(f"{self.url}/v1/pool/workers", json={"device": "cpu"}, timeout=30)
        return out | {"added": r.json().get("id"), "add_status": r.status_code}

    def preempt(self) -> dict:
        """Jobs to fill every batch place, then interactive requests once they run."""
        before = pool(self.url)["rows"]["preempted"]
        places = sum(w["capacity"] for w in pool(self.url)["workers"]) or 2 * WORKERS
        jobs = [
            Client(self.url, self.refs, random.Random(self.rng.random())) for _ in range(places)
        ]
        self.extra += [self.pool.submit(c.one, "job") for c in jobs]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sum(w["batch_rows"] for w in pool(self.url)["workers"]) >= places:
                break
            time.sleep(0.05)
        for _ in range(WORKERS):
            c = Client(self.url, self.refs, random.Random(self.rng.random()))
            self.extra.append(self.pool.submit(c.one, self.rng.choice(["synth", "speech"])))
        self.stop.wait(3)
        return {"jobs": places, "preempted": pool(self.url)["rows"]["preempted"] - before}


def clients(url: str, refs: dict, seed: int, end: float, log: Log) -> None:
    def loop(i: int) -> None:
        c = Client(url, refs, random.Random(f"{seed}-{i}"))
        while time.monotonic() < end:
            log.write(c.one(c.rng.choices(KINDS, WEIGHTS)[0]))

    with ThreadPoolExecutor(CLIENTS) as ex:
        for f in [ex.submit(loop, i) for i in range(CLIENTS)]:
            f.result()


def end_checks(url: str, proc, work: Path) -> dict:
    """With the pool quiet: every worker ready, and /v1/pool, /ready and the board agree;
    the requests the server's log says it quarantined (a stream so ended is `broken`
    to its client)."""
    p = settled(url, proc)
    said = (work / "server.log").read_text(errors="replace")
    metrics = httpx.get(url + "/metrics", timeout=10).text
    finished = {  # what the pool answered, by outcome (its own count)
        m[1]: int(float(m[2]))
        for m in re.finditer(
            r'^vibevoice_pool_requests_total\{outcome="(\w+)"\} (\S+)', metrics, re.M
        )
    }
    ready = httpx.get(url + "/ready", timeout=10).json()
    ws = p["workers"]
    return {
        "workers": len(ws),
        "states": [w["state"] for w in ws],
        "ready_workers": ready["ready_workers"],
        "pool_agrees": ready["ready_workers"] == len(ws) == WORKERS
        and all(w["pid"] and not w["inflight"] and not w["batch_rows"] for w in ws),
        "rows": p["rows"],
        "restarts": sum(w["restarts"] for w in ws),
        "queue": p["queue"]["length"],
        "pool_finished": finished,
        "quarantined": re.findall(r"request (\w+) quarantined", said),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3)
    ap.add_argument("--seed", type=int, default=None, help="default: drawn, and printed")
    ap.add_argument("--out", type=Path, default=None, help="one JSON line a request and a fault")
    args = ap.parse_args(argv)
    seed = random.SystemRandom().randrange(1 << 31) if args.seed is None else args.seed
    out = args.out or Path(f"chaos-{time.strftime('%Y-%m-%d')}-{seed}.jsonl")
    print(f"chaos seed {seed} (replay: --seed {seed}), lines to {out}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vvp-chaos-"))
    proc, url = start(work)
    log = Log(out)
    try:
        settled(url, proc)
        command = f"python -m bench.chaos.run --minutes {args.minutes:g} --seed {seed}"
        more = {"seed": seed, "keys": len(keys()), "hang_s": HANG_S}
        log.write({"info": facts(args, command) | more | {"fault_threads": FAULT_THREADS}})
        t0 = time.monotonic()
        refs = references(url)
        log.write({"references": len(refs), "seconds": round(time.monotonic() - t0, 1)})
        faults = [
            Faults(url, random.Random(f"{seed}-faults-{i}"), log, refs)
            for i in range(FAULT_THREADS)
        ]
        threads = [threading.Thread(target=f.run, daemon=True) for f in faults]
        for t in threads:
            t.start()
        clients(url, refs, seed, time.monotonic() + args.minutes * 60, log)
        for f, t in zip(faults, threads, strict=True):
            f.stop.set()
            t.join(timeout=150)
        for f in faults:
            for done in f.extra:
                log.write(done.result())
            f.pool.shutdown()
        log.write({"end": end_checks(url, proc, work)})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001 - still up: it is ours to end
            proc.kill()
        log.out.close()
    print("\n".join(record.section(out)))
    print(f"server folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
