"""Long rows on the host, on CPU: what grows with a row's length, per step and held.

A row of 1x, 4x and 16x the base length (--base-s seconds of audio), measured twice:

worker  the tiny model's VibeVoiceEngine in this process, driven by a StepHost
        and a HostSink whose messages are pickled as the worker's pipe pickles
        them: the wall time of a decode step over the row's last tenth (the
        model's forward included: its attention reads the whole KV cache), the
        time to pickle a step's messages, the Python calls per step, and the
        bytes the row's host state holds (held audio, its trail) at its end;
        the calls and the attention's share (cProfile) over 20 steps just before
        the last tenth, which is timed without the profiler.
parent  the parent's side of the same row, fed synthetic chunks as the
        dispatcher feeds them (a Chunk of one audio token, 3,200 samples, with
        its history piece, VibeVoice-1.5B's width): a streamed answer read by
        speech.encoded (wav) and a durable job read as jobs/runner.py reads it
        (the handle read letting go, into a JobAudio, Progress.tick every second
        of audio into a temporary folder, then its wav result written from the
        file and the tail). The same job read as the runner read it before
        ("job_kept": the handle keeps every chunk, the result encoded from the
        whole audio in one array), in the same run. An answer sent whole read as
        speech.run_to_response reads it ("whole": past a minute in a temporary
        file, api/whole.py) and as it read it before ("whole_kept"). The host time per chunk over
        the row's last tenth, the bytes a progress tick reads and writes, the
        audio and history bytes the parent holds at the row's end (before the
        result is written), and the bytes (tracemalloc) still held once the
        reader is done and the peak, per second of audio.

    python -m bench.longrow.run --out longrow.json [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pickle
import pstats
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench import common

HOP = 3200  # samples per audio token (7.5 tokens a second at 24 kHz)
WIDTH = 192  # VibeVoice-1.5B's feedback values per step (64 acoustic + 128 semantic)
LENGTHS = (1, 4, 16)
# job_kept: a job read as the runner read it before; whole: an answer sent whole (api/whole.py),
# whole_kept: as it was answered before (the handle keeps every chunk, encoded as one array)
MODES = ("stream", "job", "job_kept", "whole", "whole_kept")
KV_OPS = ("scaled_dot_product_attention", "index_select")


# ---- the worker ---------------------------------------------------------------------


def worker_row(engine, audio_s: float) -> dict:
    from workers.host.sink import HostSink
    from workers.host.step_host import StepHost
    from workers.wire import messages as m

    pickled = {"s": 0.0, "bytes": 0}

    def send(msg) -> None:
        t = time.perf_counter()
        pickled["bytes"] += len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        pickled["s"] += time.perf_counter() - t

    host = StepHost(engine, HostSink(send))
    req = m.Request(
        id=f"row-{audio_s:g}",
        turns=(m.Turn(0, "a" * 10),),
        stream=True,
        est_audio_s=audio_s,
        max_audio_s=audio_s,
        seed=1,
    )
    host.sink.track(req)
    host.submit(req)
    total = round(audio_s * 7.5)
    tail = max(20, total // 10)
    assert total > tail + 20, "a row of at least 60 steps (8 s)"
    times, held = [], 0
    prof = cProfile.Profile()
    window = 20  # steps profiled just before the last tenth (timed without the profiler)
    while not host.idle:
        n = len(times)
        if n == total - tail - window:
            prof.enable()
        if n == total - tail:
            prof.disable()
            pickled.update(s=0.0, bytes=0)
        t = time.perf_counter()
        host.run_step()
        times.append(time.perf_counter() - t)
        if n == total - 2:  # the row's host state at its end
            held = sum(_row_bytes(r) for r in host.running.values())
    stats = pstats.Stats(prof)
    calls = stats.total_calls
    last = times[-tail:]
    kv_s = sum(  # the attention over the KV cache and its gather: grows with the row
        v[2] for k, v in stats.stats.items() if any(n in k[2] for n in KV_OPS)
    )
    return {
        "audio_s": audio_s,
        "steps": len(times),
        "first_step_ms": 1e3 * statistics.median(times[:tail]),
        "step_ms": 1e3 * statistics.median(last),
        "kv_ms": 1e3 * kv_s / window,
        "pickle_us": 1e6 * pickled["s"] / len(last),
        "sent_bytes_per_step": pickled["bytes"] / len(last),
        "calls_per_step": calls / window,
        "row_host_bytes": held,
    }


def _row_bytes(row) -> int:
    n = sum(p.nbytes for p in row.held)
    if row.trail is not None:
        n += 28 * len(row.trail.tokens) + sum(v.nbytes for v in row.trail.fed.values())
    return n


def worker_part(model_dir: str, base_s: float, lengths) -> list[dict]:
    import torch

    from workers.engines.contract import EngineSpec
    from workers.engines.vibevoice.engine import VibeVoiceEngine

    torch.set_num_threads(1)
    spec = EngineSpec(engine="vibevoice", model_path=model_dir, max_batch_size=4, torch_threads=1)
    engine = VibeVoiceEngine(spec)
    engine.load()
    worker_row(engine, base_s)  # warm-up
    return [worker_row(engine, base_s * k) for k in lengths]


# ---- the parent ---------------------------------------------------------------------


def _chunks(steps: int):
    from workers.wire import messages as m
    from workers.wire.history import HistoryDelta

    rng = np.random.default_rng(0)
    pcm = rng.standard_normal(HOP).astype(np.float32) * 0.1
    fed = rng.standard_normal(WIDTH).astype(np.float32).tobytes()
    for k in range(steps):
        delta = HistoryDelta(k, np.int32(7).tobytes(), fed, WIDTH, (k + 1) * HOP)
        yield m.Chunk("r", k, pcm.copy(), delta)


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _parent_row(steps: int, mode: str, folder: Path) -> dict:
    """One row's chunks into a RequestHandle as the dispatcher pushes them, read as a
    stream (`mode` "stream") or as a job (Progress.tick per chunk, a second of audio
    a second; "job_kept": the handle keeps its audio, as the runner read it before)."""
    from vibevoice_pool import encoders
    from vibevoice_pool.api import speech
    from vibevoice_pool.encoders import StreamEncoder
    from vibevoice_pool.jobs.job_audio import JobAudio
    from vibevoice_pool.jobs.progress import Progress
    from vibevoice_pool.pool.handle import RequestHandle
    from workers.wire import messages as m

    handle = RequestHandle(m.Request(id="r", turns=(m.Turn(0, "a"),)), lambda rid: None)
    clock = _Clock()
    progress = Progress(folder, clock=clock)
    io = {"ticks": 0, "tick_s": [], "written": 0, "held": 0}
    audio = JobAudio(progress._paths("job")[0])

    async def read() -> None:
        if mode == "stream":
            async for _ in speech.encoded(handle, StreamEncoder("wav")):
                pass
            return
        if mode.startswith("whole"):
            await _read_whole(handle, mode, io)
            return
        async for pcm in handle.stream(release=mode == "job"):
            audio.add(pcm)
            t = time.perf_counter()
            before = _disk(folder)
            progress.tick("job", handle.history, audio)
            after = _disk(folder)
            if after != before:
                io["tick_s"].append(time.perf_counter() - t)
                io["written"] = after
        io["held"] = _held(handle, audio)  # at the row's end, its result not written yet
        with open(folder / "result.wav", "wb") as f:
            if mode == "job":  # from the file and the tail (disk.write_result)
                encoders.write_whole(f, audio.pieces(), audio.made, "wav")
            else:  # the whole audio as one array, encoded whole (the runner before)
                f.write(encoders.encode(np.concatenate([handle.audio()]), "wav")[0])
        progress.drop("job")

    reader = asyncio.create_task(read())
    times = []
    for chunk in _chunks(steps):
        t = time.perf_counter()
        handle.history.extend(chunk.history)
        handle.push(m.Chunk(chunk.id, chunk.seq, chunk.pcm))
        clock.now += HOP / m.SAMPLE_RATE
        await asyncio.sleep(0)  # the reader takes it
        times.append(time.perf_counter() - t)
    handle.push(m.Done("r", steps * HOP / m.SAMPLE_RATE, 1.0))
    await reader
    held = io["held"] if mode != "stream" else _held(handle)
    tail = max(20, steps // 10)
    ticks = io["tick_s"][-max(2, len(io["tick_s"]) // 10) :]
    return {
        "chunk_us": 1e6 * statistics.median(times[-tail:]),
        "tick_ms": 1e3 * statistics.median(ticks) if ticks else 0.0,
        "held": held,
        "handle": handle,
    }


async def _read_whole(handle, mode: str, io: dict) -> None:
    """An answer sent whole: its audio kept as run_to_response keeps it ("whole": past
    a minute in a temporary file) or as it kept it before ("whole_kept": the handle
    keeps every chunk, then one array encoded); held at its end, then encoded."""
    from vibevoice_pool import encoders
    from vibevoice_pool.api import whole

    if mode == "whole":
        kept = whole.AnswerAudio()
        async for pcm in handle.stream(release=True):
            kept.add(pcm)
        io["held"] = _held(handle, kept)
        body = whole.encoded(kept, "wav")[0]
        if not isinstance(body, bytes):
            body.close()
        return
    async for _ in handle.stream():
        pass
    io["held"] = _held(handle)
    encoders.encode(handle.audio(), "wav")


def _disk(folder: Path) -> int:
    d = folder / "progress"
    return sum(p.stat().st_size for p in d.iterdir()) if d.exists() else 0


def _held(handle, audio=None) -> int:
    """The audio and history bytes the handle (and a job's JobAudio: its tail) still
    references; an array both hold counts once."""
    arrays = {id(c): c for c in getattr(handle, "_chunks", [])}
    arrays |= {id(c): c for c in getattr(audio, "_tail", getattr(audio, "_mem", []))}
    pcm = sum(c.nbytes for c in arrays.values())
    return pcm + len(handle.history.tokens) + len(handle.history.feedback)


def parent_part(base_s: float, lengths) -> dict:
    out: dict = {mode: [] for mode in MODES}
    for mode in MODES:
        for k in lengths:
            steps = round(base_s * k * 7.5)
            with tempfile.TemporaryDirectory() as tmp:
                res = asyncio.run(_parent_row(steps, mode, Path(tmp)))
            res.pop("handle")
            res["audio_s"] = steps * HOP / 24000
            out[mode].append(res)
    # tracemalloc: every byte a streamed row still holds once its client has it all
    steps = round(base_s * lengths[-1] * 7.5)
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            res = asyncio.run(_parent_row(steps, mode, Path(tmp)))
            held = tracemalloc.get_traced_memory()[0] - base
            peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            del res
        out[f"{mode}_traced"] = {
            "audio_s": steps * HOP / 24000,
            "held_bytes": held,
            "peak_bytes": peak,
        }
    return out


def _revision() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=common.ROOT
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true", help="1x and 4x only")
    p.add_argument("--base-s", type=float, default=30.0, help="the 1x row's audio seconds")
    p.add_argument("--model-dir", help="the tiny model (default: built in a temp folder)")
    p.add_argument("--before", help="a run's JSON on the code before, shown beside this one")
    p.add_argument("--parent-only", action="store_true", help="skip the worker's rows")
    args = p.parse_args(argv)
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model_dir = args.model_dir
    if model_dir is None:
        from workers.checkpoints.tiny import ensure_tiny_model

        model_dir = ensure_tiny_model(Path(tempfile.gettempdir()) / "longrow-tiny")
    t0 = time.monotonic()
    res = {
        "base_s": args.base_s,
        "lengths": list(lengths),
        "hop": HOP,
        "width": WIDTH,
        "machine": common.machine(),
        "load_before": common.load_average(),
        "revision": _revision(),
        "parent": parent_part(args.base_s, lengths),
        "worker": [] if args.parent_only else worker_part(str(model_dir), args.base_s, lengths),
    }
    if args.before:
        res["before"] = common.load_json(args.before)
    res["load_after"] = common.load_average()
    res["seconds"] = time.monotonic() - t0
    for w in res["worker"]:
        print(
            f"worker {w['audio_s']:>5g} s: {w['first_step_ms']:.1f} -> {w['step_ms']:.1f} ms/step "
            f"(attention {w['kv_ms']:.1f}), "
            f"{w['calls_per_step']:.0f} calls/step, pickle {w['pickle_us']:.0f} us, "
            f"row host state {w['row_host_bytes']} B"
        )
    for mode in MODES:
        for r in res["parent"][mode]:
            print(
                f"parent {mode} {r['audio_s']:>5g} s: {r['chunk_us']:.0f} us/chunk, "
                f"tick {r['tick_ms']:.2f} ms, holds {r['held'] / r['audio_s']:.0f} B/s"
            )
        tr = res["parent"][f"{mode}_traced"]
        print(f"parent {mode} traced: {tr}")
    if args.out:
        common.save_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
