"""The soak: a real server on the tiny model with 2 CPU workers, rounds of the same
mixed traffic (traffic.py) with real faults between them, and after each round what
the server holds, read from /proc (probe.py). After the warm-up round every count
must stay flat; RSS is reported as growth per 1,000 requests.

    python -m bench.soak.run [--minutes 10] [--out rounds.jsonl] [--no-page]

Faults, in turn between rounds: none, SIGKILL a worker, SIGSTOP a worker past the
hang timeout (the supervisor kills it) and SIGCONT it. Each round waits for every
worker to be ready and the pool to be idle before it is read.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.soak import record
from bench.soak.probe import snapshot
from bench.soak.traffic import one_round

ROOT = Path(__file__).resolve().parents[2]
HANG_S = 4.0
FAULTS = ("none", "sigkill", "sigstop")
SERVER = ["-m", "vibevoice_pool"]  # what the server's python runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False")
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, *SERVER, "launch", "--port", str(port)]
    cmd += ["--tiny-model", "--engine", "vibevoice", "--gpus", "cpu:2"]
    cmd += ["--max-batch-size", "2", "--max-audio-s", "3", "--hang-timeout-s", str(HANG_S)]
    cmd += ["--cache-dir", str(work / "cache"), "--max-text-chars", "2000"]
    log = open(work / "server.log", "w")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def pool(url: str) -> dict:
    return httpx.get(url + "/v1/pool", timeout=10).json()


def settled(url: str, proc: subprocess.Popen, timeout: float = 180) -> dict:
    """The pool once every worker is ready, nothing is queued and nothing runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}")
        try:
            p = pool(url)
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        ws = p["workers"]
        if (
            ws
            and p["queue"]["length"] == 0
            and all(w["state"] == "ready" and not w["inflight"] for w in ws)
        ):
            return p
        time.sleep(0.5)
    raise SystemExit(f"the pool did not settle in {timeout} s: {pool(url)}")


def fault(kind: str, url: str, proc: subprocess.Popen) -> None:
    pid = settled(url, proc)["workers"][0]["pid"]
    if kind == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif kind == "sigstop":
        os.kill(pid, signal.SIGSTOP)
        time.sleep(HANG_S + 3)  # past the hang timeout: the supervisor kills it
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--out", type=Path, default=Path("soak-rounds.jsonl"), help="one line a round")
    ap.add_argument("--no-page", action="store_true", help="skip the page's Generate")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vvp-soak-"))
    proc, url = start(work)
    total = 0
    try:
        settled(url, proc)
        end = time.monotonic() + args.minutes * 60
        n = 0
        with args.out.open("w") as out:
            out.write(json.dumps({"info": facts(args)}) + "\n")
            while time.monotonic() < end:
                kind = FAULTS[n % len(FAULTS)] if n else "none"
                if kind != "none":
                    fault(kind, url, proc)
                traffic = one_round(url, work, page=not args.no_page)
                total += traffic["requests"]
                p = settled(url, proc)
                time.sleep(2)  # let finished streams and threads wind down
                workers = [w["pid"] for w in pool(url)["workers"]]
                row = {"round": n, "fault": kind, "round_requests": traffic["requests"]}
                row |= {"requests": total, "errors": traffic["errors"], "t": time.time()}
                row |= snapshot(proc.pid, workers, work / "tmp", work / "cache" / "data")
                row["restarts"] = sum(w["restarts"] for w in p["workers"])
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(line(row), flush=True)
                n += 1
        if n > 1:
            f = record.figures(record.load(args.out)[1])
            print(
                f"after round {f['warm_round']}: parent RSS {f['rss_kib_per_1000']:.0f} KiB "
                "per 1,000 requests; python -m bench.soak.record FILE prints the section"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"server folder: {work}")
    return 0


def facts(args, command: str = "") -> dict:
    """What the record says of the run: machine, date, command, code."""
    cpu = next(
        (x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")),
        "?",
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB",
        "revision": rev.stdout.decode().strip() or "?",
        "command": command or f"python -m bench.soak.run --minutes {args.minutes:g}",
        "minutes": args.minutes,
    }


def line(row: dict) -> str:
    fds = row["parent_fds"]
    wk = " ".join(f"{sum(w['fds'].values())}/{w['threads']}" for w in row["workers"])
    return (
        f"round {row['round']:3d} {row['fault']:8s} req {row['requests']:5d} "
        f"parent fds {sum(fds.values())} (sock {fds.get('socket')} pipe {fds.get('pipe')} "
        f"file {fds.get('file')} memfd {fds.get('memfd')} shm {fds.get('shm')} "
        f"anon {fds.get('anon')}) thr {row['parent_threads']} "
        f"rss {row['parent_rss_kb'] // 1024} MiB | workers fds/thr {wk} | "
        f"children {row['children']} shm {len(row['shm_mapped'])} tmp {row['tmp_entries']} "
        f"data {row['data_entries']} restarts {row['restarts']} errors {len(row['errors'])}"
    )


if __name__ == "__main__":
    sys.exit(main())
