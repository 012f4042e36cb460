"""The contract between an engine host (the worker loop, a Ray replica) and a model.

An Engine is a plain class: it knows nothing of processes, queues or the
board, so a test can run it in-process. It runs a set of rows that join and
leave at every step (continuous batching). The host (workers/host/step_host.py
StepHost) calls:

    info = engine.load()              once, in the worker process
    row = engine.prepare(request)     a Row (workers/engines/row.py) for a request;
                                      raises PoolError: BAD_INPUT, or
                                      OUT_OF_MEMORY when it could never fit
    engine.fits(row) -> bool          memory-aware admission: room for it now?
    engine.admit(row)                 it joins the running set at the next step
    engine.step(sink)                 one decode step for every live row
    engine.cancel(request_id)         free a row's place at once (-> Row | None)
    engine.reset() -> [Row]           forget every row (after an engine error)
    engine.live, engine.max_rows      rows held now; the live row limit

`step` reports through the sink:

    sink.chunk(request_id, pcm)   a piece of float32 mono audio at 24 kHz;
                                  a request's audio is its chunks in order
    sink.finish(request_id, stop_reason="eos")
                                  this row is complete (rows end on their own);
                                  stop_reason is a messages.StopReason value
    sink.fail(request_id, err)    this row failed with a PoolError; others go on
    sink.step()                   once per step; it proves progress to the hang
                                  detector

An exception escaping `step` fails every open row (a PoolError with its own
kind, anything else ENGINE_ERROR) and the engine is reset. The worker lives on
after either; only a process death loses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from workers.engines.row import Row
from workers.wire.messages import DeviceInfo, PoolError, Request


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker needs to build its engine. Crosses to the child."""

    engine: str = "sim"  # "sim" | "vibevoice"
    model_path: str = ""
    device: str = "cpu"  # "cpu" or "cuda" (the worker sees its GPU as cuda:0)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn_implementation: str = "auto"  # auto: flash_attention_2 where installed, else sdpa
    max_batch_size: int = 1  # the live row limit of the step engine
    # Memory-aware admission (VibeVoice): the KV budget of the running set in MiB
    # (0: on CUDA, free memory minus the headroom; on CPU, no limit)
    mem_budget_mb: float = 0.0
    mem_headroom_mb: float = 1024.0
    # opt-in, unmeasured: torch.compile mode of the diffusion head ("reduce-overhead":
    # CUDA graphs per row count); "" = off (workers/engines/vibevoice/audio.py)
    head_compile: str = ""
    # "eager", "graphs" (captured CUDA graphs per row bucket for the diffusion loop and
    # the audio decode/encode), "auto": graphs on CUDA, eager on CPU (vibevoice/audio.py)
    engine_mode: str = "auto"
    torch_threads: int = 1
    inference_steps: int = 10
    runaway_factor: float = 2.0  # a row stops at this x its estimated length (VibeVoice)
    # SimEngine only
    sim_speed: float = 1.0  # relative speed of this worker
    sim_rtf: float = 0.05  # wall seconds per audio second at speed 1
    sim_chunk_s: float = 0.5  # audio seconds per generation step
    sim_batch_cost: float = 0.1  # each extra row makes a step this much slower
    sim_boot_s: float = 0.0  # extra time load() takes
    sim_boot_error: str = ""  # when set, load() fails with this message


class StepSink(Protocol):
    def chunk(self, request_id: str, pcm) -> None: ...
    def finish(self, request_id: str, stop_reason: str = "eos") -> None: ...
    def fail(self, request_id: str, error: PoolError) -> None: ...
    def step(self) -> None: ...


class Engine(Protocol):
    live: int
    max_rows: int

    def load(self) -> DeviceInfo: ...
    def prepare(self, request: Request) -> Row: ...
    def fits(self, row: Row) -> bool: ...
    def admit(self, row: Row) -> None: ...
    def step(self, sink: StepSink) -> None: ...
    def cancel(self, request_id: str) -> Row | None: ...
    def reset(self) -> list[Row]: ...
