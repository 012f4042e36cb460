"""The contract between an engine host (workers/host/step_host.py StepHost, which the
worker process and the Ray replica both run) and a model.

An Engine is a plain class: it knows nothing of processes, queues or the board,
so a test can run it in-process. It runs the rows the host gives it (continuous
batching: they join and leave at every step). It decides nothing about who runs:
the host owns every queue (waiting, running, restarting) and every policy (the
live row limit, out-of-memory, replays, preemption). The host calls:

    info = engine.load()              once, in the worker process
    row = engine.prepare(request)     a Row (workers/engines/row.py) for a request, its
                                      model state fresh (a request.resume row: at the
                                      end of its history); raises PoolError: BAD_INPUT, or
                                      OUT_OF_MEMORY when it could never fit
    engine.fits(row) -> bool          memory-aware admission: room beside the rows it holds?
    engine.admit(row)                 it joins the running set at the next step
    engine.execute() -> StepOutput    one decode step for every row it holds: what it made
    engine.cancel(request_id)         free a row's place at once (-> Row | None)
    engine.reset() -> [Row]           forget every row (after an error, out-of-memory)
    engine.live, engine.max_rows      rows held now; the most rows it can hold (its slots)

`execute` returns what the step made (StepOutput): each row's new audio, in order
(float32 mono at 24 kHz; a request's audio is its chunks in order), each with the
row's history since its last piece (workers/wire/history.py), the rows that
ended on their own with their messages.StopReason value, and the rows that failed
alone with a PoolError (the others go on). The engine has already let go of every
row that ended or failed.

When the device runs out of memory during the step, `execute` still returns what
the step handed out before (its audio must reach the listener) with
`out_of_memory` set to what a row alone is told; the step's state is lost, and the
host applies its policy (workers/host/step_host.py: reset, halve the live row limit,
restart the rows skipping what was sent; a row alone fails). An exception escaping
`execute` fails every open row (a PoolError with its own kind, anything else
ENGINE_ERROR) and the engine is reset. The worker lives on
after either; only a process death loses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from workers.engines.row import Row
from workers.wire.history import HistoryDelta
from workers.wire.messages import DeviceInfo, PoolError, Request


@dataclass
class StepOutput:
    """What one step made. An engine fills it through the row sink methods (Row.add_audio,
    Row.finish and Row.fail write here), so `chunk`/`finish`/`fail` keep the names of the
    sink a row reports to; the host reads the fields."""

    audio: dict[str, list] = field(default_factory=dict)  # request id -> pcm pieces, in order
    # request id -> the history piece (wire HistoryDelta or None) of each audio piece
    history: dict[str, list] = field(default_factory=dict)
    ended: list[tuple[str, str]] = field(default_factory=list)  # (request id, stop reason)
    failed: list[tuple[str, PoolError]] = field(default_factory=list)
    stepped: bool = False  # a decode step ran (progress, for the hang detector)
    out_of_memory: str = ""  # set: the device ran out of memory; what a row alone is told

    def chunk(self, request_id: str, pcm, history: HistoryDelta | None = None) -> None:
        self.audio.setdefault(request_id, []).append(pcm)
        self.history.setdefault(request_id, []).append(history)

    def finish(self, request_id: str, stop_reason: str = "eos") -> None:
        self.ended.append((request_id, stop_reason))

    def fail(self, request_id: str, error: PoolError) -> None:
        self.failed.append((request_id, error))

    def step(self) -> None:
        self.stepped = True


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
    # workers on its GPU (workers_per_gpu): without a budget, a worker grows into its
    # share of the free memory, so two on one card do not both count all of it
    gpu_share: int = 1
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


class HostSink(Protocol):
    """Where the host reports each row (workers/host/sink.py HostSink): its start, its
    audio, its end, and each step as progress for the hang detector."""

    def started(self, request_id: str, at: float) -> None: ...
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
    def execute(self) -> StepOutput: ...
    def cancel(self, request_id: str) -> Row | None: ...
    def reset(self) -> list[Row]: ...
