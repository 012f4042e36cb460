"""SimEngine: a stand-in for a GPU running VibeVoice, for tests and benchmarks.

It loads nothing and keeps the step contract of workers/engines/contract.py, so
the host has one loop: rows join and leave a running set at every step. A step
makes `sim_chunk_s` audio seconds for every live row and takes
`sim_chunk_s * sim_rtf / sim_speed` wall seconds, times
`1 + sim_batch_cost * (rows - 1)`, so batching pays as on a GPU. Each row
gets a tone of its scripted length (workers.wire.estimate), deterministic in the
seed and the sample index, so a replay with the same seed is bit-identical. Its
history is a token a step and the samples made; a row that comes back with one
(request.resume) goes on from there.

Fault markers in the script text, honoured by this engine only:
    [[crash]]  the process dies with SIGKILL at the step the row joins
    [[hang]]   that step never returns (a stuck kernel)
    [[oom]]    the step the row joins runs out of memory, as a CUDA step would
               (StepOutput.out_of_memory); the host's policy follows: with
               other rows, the live row limit halves and every row restarts
               from its start (what was sent is skipped); alone, the row fails
               with out_of_memory. The worker lives on.
    [[error]]  the row fails with engine_error; the worker lives on
The sim engine is never the default; it must be asked for by name.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from workers.engines.contract import EngineSpec, StepOutput
from workers.engines.row import Row, send
from workers.engines.trail import Trail
from workers.wire.estimate import audio_seconds_for
from workers.wire.messages import (
    SAMPLE_RATE,
    DeviceInfo,
    ErrorKind,
    PoolError,
    Request,
    StopReason,
)

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
        self.max_rows = max(1, spec.max_batch_size)
        self.rows: list[Row] = []
        self.joining: list[Row] = []
        self.step_samples = int(spec.sim_chunk_s * SAMPLE_RATE)

    @property
    def live(self) -> int:
        return len(self.rows) + len(self.joining)

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

    def prepare(self, req: Request) -> Row:
        text = req.text
        if ERROR in text:
            raise PoolError(ErrorKind.ENGINE_ERROR, "simulated engine error")
        seconds = audio_seconds_for(text, req.max_audio_s)
        total = int(round(seconds * SAMPLE_RATE))
        steps = -(-total // self.step_samples)
        row = Row(req, steps, steps, state=total, trail=Trail(0))
        if seconds < audio_seconds_for(text):  # the request's cap cuts its script
            row.cap_reason = StopReason.MAX_AUDIO.value
        if req.resume is not None and 0 < req.resume.samples <= total:
            # resume: its tone goes on from the sample its history covers
            row.made_samples = row.sent_samples = req.resume.samples
            row.steps = row.audio_tokens = req.resume.steps
            row.trail = Trail.after(req.resume, None)
        return row

    def fits(self, row: Row) -> bool:
        return True

    def admit(self, row: Row) -> None:
        self.joining.append(row)

    def cancel(self, request_id: str) -> Row | None:
        for rows in (self.rows, self.joining):
            for row in rows:
                if row.id == request_id:
                    rows.remove(row)
                    return row
        return None

    def reset(self) -> list[Row]:
        rows = self.rows + self.joining
        self.rows, self.joining = [], []
        return rows

    def execute(self) -> StepOutput:
        out = StepOutput()
        faults = " ".join(r.request.text for r in self.joining)
        if OOM in faults:
            out.out_of_memory = "simulated out of memory"
            return out
        if CRASH in faults:
            os.kill(os.getpid(), signal.SIGKILL)
        if HANG in faults:
            threading.Event().wait()  # never returns: the stall detector ends us
        self.rows.extend(self.joining)
        self.joining = []
        out.step()
        s = self.spec
        wall = (
            s.sim_chunk_s * s.sim_rtf / s.sim_speed * (1 + s.sim_batch_cost * (len(self.rows) - 1))
        )
        if wall > 0:
            time.sleep(wall)
        for row in list(self.rows):
            n = min(self.step_samples, row.state - row.made_samples)
            pcm = tone(row.request.seed, row.made_samples, n)
            row.made_samples += n
            row.steps += 1
            row.audio_tokens += 1
            row.trail.token(0)
            drop = min(row.skip, n)  # a restarted row skips what the listener has
            row.skip -= drop
            if drop < n:
                send(out, row.id, pcm[drop:], row.trail, row.made_samples)
            if row.made_samples >= row.state:
                self.rows.remove(row)
                out.finish(row.id, row.cap_reason)
        return out
