"""The contract between the worker loop and a model.

An Engine is a plain class: it knows nothing of processes, queues or the
board, so a test can run it in-process. The worker loop (worker_main) owns it
and calls, in this order:

    info = engine.load()                      # once, in the worker process
    engine.synthesize(batch, sink)            # per batch, as often as needed

`synthesize` gets up to `info.max_batch_size` validated requests and reports
through the BatchSink:

    sink.chunk(request_id, pcm)   a piece of float32 mono audio at 24 kHz;
                                  a request's audio is its chunks in order
    sink.finish(request_id, stop_reason="eos")
                                  this row is complete (rows end on their own);
                                  stop_reason is a messages.StopReason value
    sink.fail(request_id, err)    this row failed with a PoolError; others go on
    sink.cancelled(request_id)    True once the parent cancelled the row: stop
                                  it within one step and `fail` it CANCELLED
    sink.step()                   called at least once per generation step; it
                                  proves progress to the hang detector

A row the engine neither finishes nor fails is failed ENGINE_ERROR by the
worker loop. An exception escaping `synthesize` fails every open row of the
batch: a PoolError with its own kind, anything else as ENGINE_ERROR. The
worker lives on after either; only a process death loses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from workers.messages import DeviceInfo, PoolError, Request


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker needs to build its engine. Crosses to the child."""

    engine: str = "sim"  # "sim" | "vibevoice"
    model_path: str = ""
    device: str = "cpu"  # "cpu" or "cuda" (the worker sees its GPU as cuda:0)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    attn_implementation: str = "sdpa"
    max_batch_size: int = 1
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


class BatchSink(Protocol):
    def chunk(self, request_id: str, pcm) -> None: ...
    def finish(self, request_id: str, stop_reason: str = "eos") -> None: ...
    def fail(self, request_id: str, error: PoolError) -> None: ...
    def cancelled(self, request_id: str) -> bool: ...
    def step(self) -> None: ...


class Engine(Protocol):
    def load(self) -> DeviceInfo: ...
    def synthesize(self, batch: Sequence[Request], sink: BatchSink) -> None: ...


def build_engine(spec: EngineSpec) -> Engine:
    """Construct (not load) the engine a spec names. Imports lazily, so a sim
    worker never imports torch."""
    if spec.engine == "sim":
        from workers.sim import SimEngine

        return SimEngine(spec)
    if spec.engine == "vibevoice":
        from workers.vibevoice import VibeVoiceEngine

        return VibeVoiceEngine(spec)
    raise ValueError(f"unknown engine {spec.engine!r}: choose sim or vibevoice")
