"""No client locks the others out (issue 25's first acceptance), through a real
sim server with the default limits.

One address (127.0.0.1) holds 1,050 never-read Gradio heartbeat streams, then
1,050 slow bodies (flood.py, a process of its own that keeps them topped up);
meanwhile, every second for 20 s, /ready from that same address and a synthesis
from another one (127.0.0.2: loopback too) must answer 200 within 2 s. Then 40
bodies of 50 MB, sent fast and left 100 bytes short, must raise the server's
memory by less than 200 MB and be closed within a minute.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, Server, wait_until

pytestmark = pytest.mark.slow

FLOOD = 1050
PROBE_S = 20
WITHIN_S = 2.0
MB = 1024 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(["--engine", "sim", "--gpus", "cpu:2", "--sim-rtf", "0.02"],
               tmp_path_factory.mktemp("lockout"))  # fmt: skip
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as the server does
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def established_from(port: int, address: str) -> int:
    """Connections to the server's port from `address` that the server has not closed
    (its side ESTABLISHED, accepted or waiting to be), read from /proc/net/tcp."""
    local = f":{port:04X}"
    remote = "".join(f"{int(b):02X}" for b in reversed(address.split(".")))
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        n += f[1].endswith(local) and f[2].startswith(remote + ":") and f[3] == "01"
    return n


def probe_while_flooded(srv, mode: str) -> list[tuple[float, float]]:
    """Start the flood, let it open its connections, then probe every second."""
    flood = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "flood.py"), mode, str(srv.port), str(FLOOD),
         str(PROBE_S + 4)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection at every probe
    same = httpx.Client(base_url=srv.url, timeout=10, limits=fresh)  # the flood's address
    other = httpx.Client(
        base_url=srv.url,
        timeout=10,
        limits=fresh,
        transport=httpx.HTTPTransport(local_address="127.0.0.2", limits=fresh),
    )
    waits, held = [], []
    try:
        up = flood.stdout.readline()  # its first connections are opened
        assert up.startswith('{"up": '), up + flood.communicate(timeout=30)[0][-2000:]
        # the server has taken in the first burst and refused what is over its share:
        # the steady flood is what the probes measure (the burst of 1,050 connects in one
        # go held the first probe 4 s on a machine at load 8)
        wait_until(
            lambda: established_from(srv.port, "127.0.0.1") <= 64,
            30,
            0.05,
            "the server to refuse the flood's first burst over its share",
        )
        end = time.monotonic() + PROBE_S
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = same.get("/ready")
            t1 = time.monotonic()
            assert r.status_code == 200, (mode, r.status_code, r.text[:200])
            s = other.post("/v1/synthesize", json={"script": "Speaker 1: still here"})
            t2 = time.monotonic()
            assert s.status_code == 200 and s.content[:4] == b"RIFF", (mode, s.status_code)
            waits.append((t1 - t0, t2 - t1))
            held.append(established_from(srv.port, "127.0.0.1"))
            time.sleep(max(0.0, 1.0 - (t2 - t0)))
        out, _ = flood.communicate(timeout=30)
    finally:
        same.close()
        other.close()
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    assert flood.returncode == 0, out[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    print(f"{mode}: flood {report}; the server held {min(held)}-{max(held)} of its "
          f"connections; slowest "
          f"/ready {max(w[0] for w in waits):.3f} s, synthesis {max(w[1] for w in waits):.3f} s "
          f"over {len(waits)} probes")  # fmt: skip
    assert report["opened"] >= FLOOD  # it did open them all
    # the server held the flood's address to its share, not to the 1,050 it tried (a
    # sample may fall in a top-up, while the new ones wait to be accepted and refused)
    assert sorted(held)[len(held) // 2] <= 64, held
    # and the flood was there while the probes ran (the server held its share of it)
    assert sorted(held)[len(held) // 2] >= 16, held
    return waits


@pytest.mark.parametrize("mode", ["streams", "bodies"])
def test_a_flood_from_one_address_leaves_ready_and_others_served(srv, mode):
    waits = probe_while_flooded(srv, mode)
    assert len(waits) >= PROBE_S * 0.75
    slowest = max(max(w) for w in waits)
    assert slowest < WITHIN_S, waits
    # thousands of refusals, a line a minute in the log (not a line each)
    log = srv.log()
    assert "Invalid HTTP request" not in log
    assert log.count("Connections in the last") <= 3


def test_stalled_large_bodies_stay_off_memory_and_are_closed(srv):
    n, size = 40, 50 * MB
    pid = srv.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = vm(pid, "VmRSS")
    block = b" " * MB
    socks: list[socket.socket] = []
    stalled_at: list[float] = []
    closed_after: dict[int, float] = {}

    def send_one(i: int) -> None:
        s = socket.socket()
        s.bind((f"127.0.0.{10 + i % 4}", 0))  # four addresses, ten bodies each
        s.connect(("127.0.0.1", srv.port))
        s.sendall(
            b"POST /v1/synthesize HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
        )
        left = size - 100
        while left:
            left -= s.send(block[: min(left, MB)])
        socks.append(s)

    threads = [threading.Thread(target=send_one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(socks) == n, "every body was taken in up to its last 100 bytes"
    stalled_at.append(time.monotonic())
    time.sleep(2)
    held = vm(pid, "VmRSS") - before
    answers: dict[int, bytes] = {}
    for s in socks:
        s.settimeout(0.2)
    while len(closed_after) < n and time.monotonic() - stalled_at[0] < 75:
        for i, s in enumerate(socks):
            if i in closed_after:
                continue
            try:
                part = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                part = b""
            answers[i] = answers.get(i, b"") + part
            if not part:
                closed_after[i] = time.monotonic() - stalled_at[0]
    peak = vm(pid, "VmHWM") - before
    for s in socks:
        s.close()
    print(f"40 stalled 50 MB bodies: server RSS +{held / MB:.0f} MB held, peak "
          f"+{peak / MB:.0f} MB; closed after {min(closed_after.values(), default=-1):.1f}-"
          f"{max(closed_after.values(), default=-1):.1f} s")  # fmt: skip
    assert peak < 200 * MB, f"the server grew {peak / MB:.0f} MB"
    assert len(closed_after) == n and max(closed_after.values()) < 60, closed_after
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values()), set(answers.values())
    r = httpx.get(srv.url + "/ready", timeout=10)
    assert r.status_code == 200
