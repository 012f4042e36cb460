"""Dispatch overhead: what the pool costs a request that asks for no work.

Zero-work requests (sim_rtf 0: the SimEngine sleeps not at all and returns
0.73 s of tone) measure the pool's own path:

    latency      submit() call -> Started.at (the worker's clock when its batch
                 began; CLOCK_MONOTONIC is shared by every process), one request
                 at a time on an idle pool of 4 workers, split at the
                 dispatcher's "dispatched" event
    decisions/s  the Dispatcher alone (in-process, fake workers that take
                 everything), and zero-work requests/s through 4 real workers
    ASGI         the same, one request at a time through the pool's API app and the
                 bare app in this process (no socket, no uvicorn)
    HTTP         requests/s through the real server (`vibevoice-pool launch
                 --engine sim --sim-rtf 0`, default settings) against a bare
                 FastAPI handler that parses the same body and returns the same
                 bytes (the floor), driven by one httpx client with a few
                 concurrent connections, in turns, in the same run

    python -m bench.overhead.run --out overhead.json
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from bench import common
from workers.wire.estimate import audio_seconds_for

N_LATENCY = 1500
N_DECISIONS = 20_000
N_THROUGHPUT = 3000
HTTP_CLIENTS = 8
HTTP_ROUND_S = 6.0
HTTP_ROUNDS = 2  # per server, in turns: bare, pool, bare, pool
HTTP_SEQUENTIAL = 300  # requests one at a time, per server
BODY = {"script": "Speaker 1: hello there", "seed": 7}
ZERO_WORK_S = audio_seconds_for("hello there")  # 0.8 s of tone, as BODY asks


# ---- enqueue-to-worker latency ---------------------------------------------


def latency(pool, rec: common.Recorder, n: int) -> dict:
    """One zero-work request at a time: submit -> dispatched -> Started.at."""
    decide, transport, total, roundtrip = [], [], [], []
    for i in range(n):
        req = common.make_request(pool, ZERO_WORK_S, i)
        rec.clear()
        t = time.monotonic()
        handle = pool.submit(req)
        handle.result(10)
        roundtrip.append(time.monotonic() - t)
        t_disp = next(e[2] for e in rec.events if e[0] == "dispatched")
        at = rec.started_at[req.id]
        decide.append(t_disp - t)
        transport.append(at - t_disp)
        total.append(at - t)
        time.sleep(0.001)
    return {
        "total": common.stats(total),
        "decide": common.stats(decide),
        "transport": common.stats(transport),
        "roundtrip": common.stats(roundtrip),
        "samples": total,
    }


def dispatcher_alone(n: int) -> dict:
    """Decisions per second of the Dispatcher with fake workers that never fill."""
    from vibevoice_pool.pool.dispatcher import Dispatcher
    from workers.wire import messages as m
    from workers.wire.board import Col, SlotState, StatusBoard, WorkerState

    board = StatusBoard.create(4)
    try:
        for i in range(4):
            board.set(i, Col.SLOT_STATE, SlotState.RUNNING)
            board.set(i, Col.WORKER_STATE, WorkerState.IDLE)
            board.set(i, Col.CAPACITY, 1e9)
            board.set(i, Col.SPEED, 1.0 + i)
        d = Dispatcher(board, max_queue=n + 1)
        sent = []
        for i in range(4):
            d.attach(i, sent.append)
        reqs = [
            m.Request(id=f"r{i}", turns=(m.Turn(0, "hello there"),), est_audio_s=0.5)
            for i in range(n)
        ]
        t = time.perf_counter()
        for r in reqs:
            d.submit(r)
        dt = time.perf_counter() - t
        assert len(sent) == n
    finally:
        board.close()
    return {"n": n, "seconds": dt, "per_s": n / dt, "us_each": dt / n * 1e6}


def pool_throughput(pool, rec: common.Recorder, n: int) -> dict:
    """A burst of n zero-work requests; first submit to last answer."""
    rec.clear()
    reqs = [common.make_request(pool, ZERO_WORK_S, i) for i in range(n)]
    t = time.monotonic()
    for r in reqs:
        pool.submit(r)
    t_submitted = time.monotonic()
    common.drain(pool)
    last = max(e[2] for e in rec.events if e[0] == "finished")
    return {
        "n": n,
        "per_s": n / (last - t),
        "submit_per_s": n / (t_submitted - t),
    }


# ---- HTTP -------------------------------------------------------------------


async def _asgi_sequential(app, n: int) -> dict:
    """One request at a time through an ASGI app in this process: no socket, no uvicorn."""
    import httpx

    lat = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for _ in range(n):
            t = time.monotonic()
            r = await client.post("/v1/synthesize", json=BODY)
            if r.status_code == 200:
                lat.append(time.monotonic() - t)
    return common.stats(lat)


def asgi(pool, tmp: str) -> dict:
    """The pool's API app (without the page) and the bare app, in process, on the same pool."""
    import asyncio

    from bench.overhead import bare_server
    from vibevoice_pool.api.app import create_app
    from vibevoice_pool.server import build_front

    try:
        cfg = pool.cfg.replace(cache_dir=tmp, data_dir=os.path.join(tmp, "data-asgi"))
        front = build_front(cfg, pool, environ={})
        app = create_app(front)
        from vibevoice_pool.api.speech import SynthesizeBody

        req = front.build_request(SynthesizeBody(**BODY))
        voice_bytes = sum(getattr(v, "nbytes", 0) for v in req.voices)
        return {
            "bare": asyncio.run(_asgi_sequential(bare_server.app, HTTP_SEQUENTIAL)),
            "pool": asyncio.run(_asgi_sequential(app, HTTP_SEQUENTIAL)),
            "voice_bytes": voice_bytes,
        }
    except Exception as e:  # the front's wiring changed: say so, measure the rest
        return {"error": f"{type(e).__name__}: {e}"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready after {timeout} s")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def _sequential(url: str, n: int) -> dict:
    """One client, one request at a time on a kept-alive connection."""
    import httpx

    lat = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(n):
            t = time.monotonic()
            r = await client.post("/v1/synthesize", json=BODY)
            if r.status_code == 200:
                lat.append(time.monotonic() - t)
    return common.stats(lat)


async def _load(url: str, seconds: float, clients: int) -> dict:
    """`clients` tasks on one keep-alive connection pool, each posting in a loop."""
    import asyncio

    import httpx

    lat: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one():
            nonlocal errors
            while time.monotonic() < stop_at:
                t = time.monotonic()
                r = await client.post("/v1/synthesize", json=BODY)
                if r.status_code == 200 and len(r.content) > 44:
                    lat.append(time.monotonic() - t)
                else:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(clients)))
        wall = time.monotonic() - t0
    return {"rps": len(lat) / wall, "n": len(lat), "errors": errors, "latency": common.stats(lat)}


def http(tmp: str) -> dict:
    import asyncio

    env = os.environ | {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
    }
    p_pool, p_bare = _free_port(), _free_port()
    pool_cmd = [
        sys.executable,
        "-m",
        "vibevoice_pool",
        "launch",
        "--engine",
        "sim",
        "--gpus",
        "cpu:4",
        "--sim-rtf",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(p_pool),
        "--cache-dir",
        tmp,
    ]
    bare_cmd = [sys.executable, "-m", "bench.overhead.bare_server", str(p_bare)]
    servers = {}
    with (
        open(os.path.join(tmp, "pool.log"), "w") as log_pool,
        open(os.path.join(tmp, "bare.log"), "w") as log_bare,
    ):
        servers["pool"] = subprocess.Popen(
            pool_cmd, stdout=log_pool, stderr=log_pool, env=env, cwd=common.ROOT
        )
        servers["bare"] = subprocess.Popen(
            bare_cmd, stdout=log_bare, stderr=log_bare, env=env, cwd=common.ROOT
        )
        try:
            urls = {"pool": f"http://127.0.0.1:{p_pool}", "bare": f"http://127.0.0.1:{p_bare}"}
            for name, url in urls.items():
                _wait_ready(url, servers[name])
            rounds: dict[str, list[dict]] = {"bare": [], "pool": []}
            for url in urls.values():  # warm both up
                asyncio.run(_load(url, 1.0, HTTP_CLIENTS))
            sequential = {
                name: asyncio.run(_sequential(url, HTTP_SEQUENTIAL)) for name, url in urls.items()
            }
            for _ in range(HTTP_ROUNDS):
                for name in ("bare", "pool"):
                    rounds[name].append(asyncio.run(_load(urls[name], HTTP_ROUND_S, HTTP_CLIENTS)))
        finally:
            for proc in servers.values():
                _stop(proc)
    out = {
        "rounds": rounds,
        "clients": HTTP_CLIENTS,
        "round_s": HTTP_ROUND_S,
        "sequential": sequential,
    }
    for name in ("bare", "pool"):
        rps = sorted(r["rps"] for r in rounds[name])
        out[name] = {
            "rps_median": rps[len(rps) // 2]
            if len(rps) % 2
            else sum(rps[len(rps) // 2 - 1 : len(rps) // 2 + 1]) / 2,
            "rps_all": rps,
            "p50": common.stats([r["latency"]["p50"] for r in rounds[name]])["p50"],
            "p99": max(r["latency"]["p99"] for r in rounds[name]),
            "errors": sum(r["errors"] for r in rounds[name]),
        }
    out["ratio"] = out["bare"]["rps_median"] / out["pool"]["rps_median"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is required")
    scale = 5 if args.quick else 1
    t_start = time.monotonic()
    result: dict = {}
    result["dispatcher_alone"] = dispatcher_alone(N_DECISIONS // scale)
    print(
        "dispatcher alone:", round(result["dispatcher_alone"]["per_s"]), "decisions/s", flush=True
    )
    pool = common.start_pool(gpus="cpu:4", sim_rtf=0.0)
    rec = common.Recorder()
    pool.subscribe(rec)
    try:
        for i in range(50):  # warm up the path
            pool.submit(common.make_request(pool, ZERO_WORK_S, i)).result(10)
        result["latency"] = latency(pool, rec, N_LATENCY // scale)
        s = result["latency"]["total"]
        print(f"latency p50 {s['p50'] * 1e3:.3f} ms p99 {s['p99'] * 1e3:.3f} ms", flush=True)
        result["pool_throughput"] = pool_throughput(pool, rec, N_THROUGHPUT // scale)
        print(
            "zero-work through the pool:",
            round(result["pool_throughput"]["per_s"]),
            "req/s",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="vvp-bench-") as tmp:
            result["asgi"] = asgi(pool, tmp)
    finally:
        pool.shutdown(grace_s=2)
    with tempfile.TemporaryDirectory(prefix="vvp-bench-") as tmp:
        result["http"] = http(tmp)
    h = result["http"]
    print(
        f"http: bare {h['bare']['rps_median']:.0f} rps, pool {h['pool']['rps_median']:.0f} rps, "
        f"ratio {h['ratio']:.2f}",
        flush=True,
    )
    result["seconds"] = time.monotonic() - t_start
    common.save_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
