"""SimEngine: a stand-in for a GPU running VibeVoice, for tests and benchmarks.

It loads nothing. A batch advances in steps of `sim_chunk_s` audio seconds;
a step takes `sim_chunk_s * sim_rtf / sim_speed` wall seconds, times
`1 + sim_batch_cost * (rows - 1)`, so batching pays as on a GPU. Each row
gets a tone of its scripted length (workers.estimate), deterministic in the
seed and the sample index, so a replay with the same seed is bit-identical.

Fault markers in the script text, honoured by this engine only:
    [[crash]]  the process dies with SIGKILL (a segfault, a driver reset)
    [[hang]]   the generation step never returns (a stuck kernel)
    [[oom]]    the row fails with out_of_memory; the worker lives on
    [[error]]  the row fails with engine_error; the worker lives on
The sim engine is never the default; it must be asked for by name.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Sequence

from workers.engine import BatchSink, EngineSpec
from workers.estimate import audio_seconds_for
from workers.messages import SAMPLE_RATE, DeviceInfo, ErrorKind, PoolError, Request

CRASH, HANG, OOM, ERROR = "[[crash]]", "[[hang]]", "[[oom]]", "[[error]]"


def tone(seed: int, start: int, count: int):
    """`count` samples of the request's tone from sample index `start`."""
    import numpy as np

    freq = 110.0 + (seed % 24) * 20.0
    t = (np.arange(start, start + count, dtype=np.float64)) / SAMPLE_RATE
    return (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


class SimEngine:
    def __init__(self, spec: EngineSpec):
        if spec.sim_speed <= 0 or spec.sim_rtf < 0 or spec.sim_chunk_s <= 0:
            raise ValueError("sim_speed and sim_chunk_s must be > 0, sim_rtf >= 0")
        self.spec = spec

    def load(self) -> DeviceInfo:
        if self.spec.sim_boot_s:
            time.sleep(self.spec.sim_boot_s)
        if self.spec.sim_boot_error:
            raise PoolError(ErrorKind.ENGINE_ERROR, self.spec.sim_boot_error)
        return DeviceInfo(
            device="sim",
            name=f"SimEngine x{self.spec.sim_speed:g}",
            mem_total_bytes=0,
            max_batch_size=self.spec.max_batch_size,
            engine="sim",
            note="simulated engine: tones, no model",
        )

    def synthesize(self, batch: Sequence[Request], sink: BatchSink) -> None:
        rows = {}
        for req in batch:
            text = req.text
            if OOM in text:
                sink.fail(req.id, PoolError(ErrorKind.OUT_OF_MEMORY, "simulated out of memory"))
                continue
            if ERROR in text:
                sink.fail(req.id, PoolError(ErrorKind.ENGINE_ERROR, "simulated engine error"))
                continue
            total = int(round(audio_seconds_for(text, req.max_audio_s) * SAMPLE_RATE))
            rows[req.id] = [req, 0, total]
        faults = " ".join(r[0].text for r in rows.values())
        if CRASH in faults:
            os.kill(os.getpid(), signal.SIGKILL)
        if HANG in faults:
            threading.Event().wait()  # never returns: the stall detector ends us
        step = int(self.spec.sim_chunk_s * SAMPLE_RATE)
        while rows:
            sink.step()
            for rid in [rid for rid in rows if sink.cancelled(rid)]:
                del rows[rid]
                sink.fail(rid, PoolError(ErrorKind.CANCELLED, "cancelled"))
            if not rows:
                break
            wall = (
                self.spec.sim_chunk_s
                * self.spec.sim_rtf
                / self.spec.sim_speed
                * (1 + self.spec.sim_batch_cost * (len(rows) - 1))
            )
            if wall > 0:
                time.sleep(wall)
            for rid in list(rows):
                req, done, total = rows[rid]
                n = min(step, total - done)
                sink.chunk(rid, tone(req.seed, done, n))
                rows[rid][1] = done + n
                if done + n >= total:
                    del rows[rid]
                    sink.finish(rid)
