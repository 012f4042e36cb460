"""What every benchmark shares: the machine, a quiet pool, an event recorder,
open-loop workloads, the SimEngine's service-time model, statistics and tables.

    start_pool(**settings)   a Pool of sim workers with its logs turned down
    Recorder                 a dispatcher listener: one tuple per event, cheap
    Workload                 Poisson arrivals + lognormal sizes, from one seed
    drive(pool, workload)    submit each request at its arrival time (open loop)
    Rendezvous               files through which side-by-side pools (one process
                             each) agree on one schedule and one start instant
    calibrate(...)           each worker's compute time = a * steps + b, measured
    capacity / service_time  what that model says a size mix costs
    stats(values)            mean, p50, p90, p99, max of a list of numbers

Spawned workers re-import the benchmark's main module, so this module keeps
its top-level imports light and every benchmark keeps its work under
`if __name__ == "__main__"`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from vibevoice_pool.pool.dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parent.parent
# workers.wire.estimate sizes one long word of n letters at n / (LETTERS_PER_WORD * WORDS_PER_S)
# seconds: 17.5 letters of script = 1 s of audio
CHARS_PER_S = 7.0 * 2.5
SAMPLE_RATE = 24_000


# ---- the machine -----------------------------------------------------------


def machine() -> dict:
    """What the record says about the machine the figures come from."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        mem_gib = psutil.virtual_memory().total / 2**30
    except ImportError:
        mem_gib = float("nan")

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "numpy": version("numpy"),
        "fastapi": version("fastapi"),
        "uvicorn": version("uvicorn"),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---- the pool --------------------------------------------------------------


def start_pool(**settings):
    """A started Pool of sim workers (every worker ready), logging warnings only."""
    from vibevoice_pool.config import build
    from vibevoice_pool.pool.facade import Pool

    logging.getLogger("vibevoice_pool").setLevel(logging.WARNING)
    values = {"engine": "sim", "log_level": "WARNING", "max_queue": 100_000} | settings
    pool = Pool.start(build(values))
    n = len(pool.live_slots()) if hasattr(pool, "live_slots") else len(pool.placements)
    wait_for(lambda: pool.ready_workers() >= n, 180, "every worker ready")
    return pool


def wait_for(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def drain(pool, timeout: float = 120.0) -> None:
    """Wait until the pool holds no request."""
    wait_for(lambda: pool.dispatcher.pending() == 0, timeout, "the pool to drain", 0.005)


def script_for(audio_s: float) -> str:
    """A script the estimator sizes at `audio_s` seconds (to 1/17.5 s, at least 0.4 s):
    one word of that many letters."""
    return "a" * max(7, int(round(audio_s * CHARS_PER_S)))


def make_request(pool, audio_s: float, seed: int):
    from workers.wire import messages as m

    return pool.make_request([m.Turn(0, script_for(audio_s))], seed=seed)


class Recorder:
    """A pool listener (Pool.subscribe) that appends (what, request id, time, slot) and
    nothing more: it runs under the dispatcher's lock, so it must be cheap."""

    def __init__(self):
        self.events: list[tuple[str, str, float, int | None]] = []
        self.started_at: dict[str, float] = {}  # the worker's clock, from Started
        self.outcomes: dict[str, object] = {}

    def __call__(self, e) -> None:
        now = time.monotonic()
        rid = e.request.id
        if e.kind == "dispatched":
            self.events.append((e.kind, rid, now, e.slot))
        elif e.kind == "started":
            self.started_at[rid] = e.at
            self.events.append((e.kind, rid, now, e.slot))
        elif e.kind == "requeued":
            self.events.append((e.kind, rid, now, e.slot))
        elif e.kind == "finished":
            self.outcomes[rid] = e.outcome
            self.events.append((e.kind, rid, now, e.handle.worker))

    def clear(self) -> None:
        self.events, self.started_at, self.outcomes = [], {}, {}

    def by_request(self) -> dict[str, dict]:
        """Per request: first dispatch, start (worker clock), finish, slot, counts."""
        out: dict[str, dict] = {}
        for what, rid, t, slot in self.events:
            r = out.setdefault(rid, {"dispatched": [], "requeued": [], "finished": []})
            if what == "dispatched":
                r["dispatched"].append((t, slot))
            elif what == "requeued":
                r["requeued"].append((t, slot))
            elif what == "finished":
                r["finished"].append((t, slot))
        for rid, r in out.items():
            r["started_at"] = self.started_at.get(rid)
        return out


# ---- workloads -------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """n requests: arrival times (s from the start), sizes (audio seconds), seeds,
    and optionally how far off the dispatcher's estimate of each size is (a factor
    on est_audio_s; the engine still makes the scripted length)."""

    arrivals: list[float]
    sizes: list[float]
    seeds: list[int]
    misestimate: list[float] | None = None

    @property
    def n(self) -> int:
        return len(self.sizes)


def lognormal_sizes(n: int, mean_s: float, cv: float, seed: int) -> list[float]:
    """Lognormal sizes with coefficient of variation `cv`, rescaled so that the
    sample mean is `mean_s`, then made real: at least 0.5 s (the estimator's
    floor) and rounded to what a script of whole characters asks for."""
    import numpy as np

    z = np.random.default_rng(seed).standard_normal(n)
    sigma = math.sqrt(math.log(1 + cv * cv))
    x = np.exp(sigma * z - sigma * sigma / 2)
    x *= mean_s / x.mean()
    chars = np.maximum(np.rint(x * CHARS_PER_S), 0.5 * CHARS_PER_S)
    return [float(c / CHARS_PER_S) for c in chars]


def misestimates(n: int, cv: float, seed: int) -> list[float]:
    """Factors with mean 1 and coefficient of variation `cv` (lognormal): how far a
    script-length estimate is from the audio the model really makes."""
    import numpy as np

    sigma = math.sqrt(math.log(1 + cv * cv))
    z = np.random.default_rng(seed).standard_normal(n)
    return [float(x) for x in np.exp(sigma * z - sigma * sigma / 2)]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrival times, rescaled so that the n-th arrives at n / rate:
    the offered load over the run is exactly the nominal one."""
    import numpy as np

    gaps = np.random.default_rng(seed).exponential(1.0, n)
    t = np.cumsum(gaps)
    t *= (n / rate) / t[-1]
    return [float(x) for x in t - t[0]]


def drive(
    pool, workload: Workload, *, on_submit=None, start_at: float | None = None
) -> tuple[float, list[float]]:
    """Submit each request at its arrival time, open loop, from `start_at` (a
    time.monotonic() value, shared by every process) or now. Returns the start
    time and each request's submit lag behind its schedule."""
    reqs = [
        make_request(pool, s, seed) for s, seed in zip(workload.sizes, workload.seeds, strict=True)
    ]
    if workload.misestimate is not None:
        from dataclasses import replace

        reqs = [
            replace(r, est_audio_s=r.est_audio_s * f)
            for r, f in zip(reqs, workload.misestimate, strict=True)
        ]
    lags = []
    t0 = start_at if start_at is not None else time.monotonic() + 0.05
    for i, (req, at) in enumerate(zip(reqs, workload.arrivals, strict=True)):
        target = t0 + at
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        lags.append(time.monotonic() - target)
        pool.submit(req)
        if on_submit is not None:
            on_submit(i, req, target)
    return t0, lags


# ---- side by side: several pools, one schedule ---------------------------------


class Rendezvous:
    """Files in one folder through which the processes of a side-by-side run meet:
    each child `post`s what it measured and `wait`s for the conductor's answer, so
    that every pool starts the same arrivals at the same monotonic instant and
    whatever else the machine does at that moment hits them all alike."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def post(self, name: str, data) -> None:
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.folder / f"{name}.json")

    def wait(self, name: str, timeout: float = 300.0, alive=None):
        path = self.folder / f"{name}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} after {timeout:g} s")
            if alive is not None and not alive():
                raise RuntimeError(f"a process of the run exited before {name}")
            time.sleep(0.02)
        return json.loads(path.read_text())


def mean_model(models: list[dict]) -> dict:
    """Per worker (an int slot), the mean of several fitted compute-time models."""
    out = {}
    for s in models[0]:  # keys may have come back from JSON as strings
        out[int(s)] = {k: sum(m[s][k] for m in models) / len(models) for k in models[0][s]}
    return out


def stop_children(procs, ok: bool) -> None:
    """Wait for the side-by-side children; on a failure end them (by their own
    pid) at once: their workers follow through the pool's death pipe."""
    import subprocess

    for p in procs:
        if not ok and p.poll() is None:
            p.terminate()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---- the SimEngine's service time -------------------------------------------


def steps(size_s: float, chunk_s: float) -> int:
    """Generation steps the SimEngine takes for a request of `size_s` audio seconds."""
    total = int(round(size_s * SAMPLE_RATE))
    return max(1, -(-total // int(chunk_s * SAMPLE_RATE)))


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a*x + b."""
    n = len(points)
    sx = sum(x for x, _ in points)
    sy = sum(y for _, y in points)
    sxx = sum(x * x for x, _ in points)
    sxy = sum(x * y for x, y in points)
    a = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return a, (sy - a * sx) / n


def fit_model(points: dict, speeds, rtf: float, chunk_s: float) -> dict:
    """Each worker's compute time per request = a * steps + b, from (steps, seconds).
    `nominal_a` is the engine's sleep per step alone."""
    model = {}
    for s, pts in points.items():
        if len({x for x, _ in pts}) < 2:
            raise RuntimeError(f"worker {s} ran too few sizes to fit its service time ({pts})")
        a, b = fit_line(pts)
        model[s] = {"a": a, "b": max(0.0, b), "nominal_a": chunk_s * rtf / speeds[s]}
    return model


def calibrate(
    pool, rec: Recorder, speeds, rtf: float, chunk_s: float, sizes=(1.0, 4.0, 10.0), rounds: int = 3
):
    """Rounds of one request per worker, all at once (late-bound, so each idle
    worker takes one): each worker's compute-time model, and the median time an
    answer takes from the worker's end to the parent. Warms the speed column too."""
    slots = list(range(len(speeds)))
    points: dict[int, list[tuple[float, float]]] = {s: [] for s in slots}
    transit: list[float] = []
    seed = 1
    for size in sizes:
        for _ in range(rounds):
            rec.clear()
            for _ in slots:
                pool.submit(make_request(pool, size, seed))
                seed += 1
            drain(pool)
            for rid, r in rec.by_request().items():
                t_end, slot = r["finished"][-1]
                compute = rec.outcomes[rid].compute_s
                points[slot].append((steps(size, chunk_s), compute))
                transit.append(t_end - r["started_at"] - compute)
    return fit_model(points, speeds, rtf, chunk_s), stats(transit)["p50"]


def service_time(model: dict, slot, size_s: float, chunk_s: float) -> float:
    m = model[slot]
    return m["a"] * steps(size_s, chunk_s) + m["b"]


def capacity(model: dict, sizes: list[float], chunk_s: float) -> float:
    """Requests per second the workers finish together, for this size mix."""
    return sum(len(sizes) / sum(service_time(model, s, x, chunk_s) for x in sizes) for s in model)


# ---- statistics and tables -------------------------------------------------


def stats(values) -> dict:
    import numpy as np

    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        return {
            "n": 0,
            "mean": float("nan"),
            "p50": float("nan"),
            "p90": float("nan"),
            "p99": float("nan"),
            "max": float("nan"),
        }
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; numbers are written as they come (format them first)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def ms(x: float, digits: int = 1) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.{digits}f}"
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def save_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=1))


def load_json(path: str | Path):
    return json.loads(Path(path).read_text())


class ArrivalBinding(Dispatcher):
    """The pool's dispatcher without late binding: each request goes to a worker's
    own queue on arrival, room or not, as systems without late binding do."""

    def has_room(self, inflight: int, capacity: int) -> bool:
        return True


def bind_at_arrival(dispatcher: Dispatcher, on: bool) -> None:
    """Turn late binding off (on=True) or back on for a running pool's dispatcher: the
    comparison of what late binding buys. A benchmark's mode, so it lives here."""
    dispatcher.__class__ = ArrivalBinding if on else Dispatcher


# ---- the record's pieces every section uses ----------------------------------


def failed(name: str, section) -> list[str]:
    """A section that did not run (None) or failed, as the record says it."""
    if section is None:
        return ["Not run in this run (`--only`).", ""]
    return [
        f"**This section failed** (exit code {section['rc']}):",
        "",
        "```",
        section.get("error", ""),
        "```",
        "",
    ]


def pct(ratio: float) -> str:
    return f"{(1 - ratio) * 100:.0f}% below" if ratio <= 1 else f"{(ratio - 1) * 100:.0f}% above"


def plotted(plot, res: dict, img_dir) -> list[str]:
    """The files a section's `plot` drew; none where matplotlib (the bench extra,
    which `make bench` installs) is missing, so the record is still written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    return plot(res, img_dir)


def rows(*targets: tuple[str, str, bool]) -> list[list[str]]:
    """Rows of the targets table: (what, measured, met) -> [what, measured, verdict]."""
    return [[what, got, verdict(ok)] for what, got, ok in targets]


def opening(title: str, name: str, section, render, plot, img_dir, rel: str):
    """A section's heading, its tables and plots; (lines, figures), or the failure and
    None where the section did not run or failed."""
    out = [title, ""]
    if not section or "data" not in section:
        return out + failed(name, section), None
    res = section["data"]
    out += [render(res), ""]
    for file in plotted(plot, res, img_dir):
        out += [f"![{file}]({rel}/{file})", ""]
    return out, res


def save_plot(plt, fig, img_dir, name: str) -> str:
    """Lay out, write and close a section's figure; its file name."""
    fig.tight_layout()
    fig.savefig(Path(img_dir) / name, dpi=110)
    plt.close(fig)
    return name
