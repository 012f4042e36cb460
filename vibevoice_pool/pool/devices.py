"""Which devices exist, which worker slots the `--gpus` setting asks for, and
the engine spec each slot gets.

GPUs are counted through NVML (nvidia-ml-py) in the parent, which creates no
CUDA context. No driver, no GPUs: that is an answer, not an error.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from vibevoice_pool.config import ConfigError, PoolConfig
from workers.engines.contract import EngineSpec

log = logging.getLogger("vibevoice_pool")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    mem_total_bytes: int
    uuid: str = ""  # GPU-..., as CUDA_VISIBLE_DEVICES may name it


@dataclass(frozen=True)
class Placement:
    """Where one worker slot runs."""

    device: str  # "cuda:3", "cpu:0", "sim:1"
    cuda_index: int | None  # physical ordinal for CUDA_VISIBLE_DEVICES

    @property
    def is_gpu(self) -> bool:
        return self.cuda_index is not None


def find_gpus() -> list[Gpu]:
    """Every NVIDIA GPU NVML can see; [] when there is no driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            try:  # only CUDA_VISIBLE_DEVICES reads it: no reason to lose the GPU
                uuid = pynvml.nvmlDeviceGetUUID(h)
            except pynvml.NVMLError:
                uuid = ""
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            gpus.append(Gpu(i, name, int(pynvml.nvmlDeviceGetMemoryInfo(h).total), uuid))
        return gpus
    except pynvml.NVMLError as e:
        log.warning("NVML answered but could not list GPUs: %s", e)
        return []
    finally:
        pynvml.nvmlShutdown()


def default_cpu_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _per_gpu_unused(workers_per_gpu: int, count: int) -> None:
    if workers_per_gpu > 1:
        log.warning(
            "--workers-per-gpu %d applies to GPUs only; starting %d CPU worker(s). "
            "Use --gpus cpu:N for N CPU workers.",
            workers_per_gpu,
            count,
        )


def visible(found: list[Gpu], hidden: str | None) -> tuple[list[Gpu], str]:
    """The GPUs CUDA_VISIBLE_DEVICES (`hidden`, None: not set) leaves the pool, and a
    note saying so ("" when it leaves them all). Read as CUDA reads it: ids as nvidia-smi
    numbers them, or GPU UUIDs (a unique prefix); the list ends at an id that names no
    GPU (-1, say), so an empty one or -1 hides them all."""
    if hidden is None or not found:
        return found, ""
    kept: list[Gpu] = []
    for token in (t.strip() for t in hidden.split(",")):
        match = [g for g in found if token and token in (str(g.index), g.uuid)]
        match = match or [g for g in found if token and g.uuid.startswith(token)]
        if len(match) != 1:
            break
        if match[0] not in kept:
            kept.append(match[0])
    kept.sort(key=lambda g: g.index)
    if not kept:
        return [], f"CUDA_VISIBLE_DEVICES={hidden} hides every GPU"
    if kept == found:
        return found, ""
    return kept, f"CUDA_VISIBLE_DEVICES={hidden} leaves the pool only these"


def order_warning(found: list[Gpu], hidden: str | None, order: str | None) -> str:
    """What to warn when CUDA_VISIBLE_DEVICES (`hidden`) names GPUs by number on a
    machine of more than one kind of GPU and CUDA_DEVICE_ORDER (`order`) is not
    PCI_BUS_ID: the pool reads the numbers as nvidia-smi does (bus order), but the
    scheduler that set them, under CUDA's default order (fastest first), may have
    meant other GPUs. "" when there is no doubt."""
    if not hidden or (order or "").upper() == "PCI_BUS_ID" or len({g.name for g in found}) < 2:
        return ""
    if not any(t.strip().isdigit() for t in hidden.split(",")):
        return ""  # UUIDs name one GPU in any order
    return (
        f"CUDA_VISIBLE_DEVICES={hidden} is read in nvidia-smi's order (PCI bus), but with "
        f"GPUs of more than one kind and CUDA_DEVICE_ORDER={order or 'unset'} CUDA numbers "
        "them fastest first: if these are not the GPUs meant, set CUDA_DEVICE_ORDER=PCI_BUS_ID "
        "where the ids are chosen, or name the GPUs by UUID (nvidia-smi -L)"
    )


def plan(
    gpus_setting: str, workers_per_gpu: int, found: list[Gpu], note: str = ""
) -> list[Placement]:
    """The worker slots for a `--gpus` value, or a ConfigError naming the GPUs found
    (`note`: why there are only these, see visible())."""
    spec = (gpus_setting or "all").strip().lower()
    listing = ", ".join(f"{g.index} ({g.name})" for g in found)
    if found and note:
        listing += f" ({note})"
    elif not found:
        why = note or "no NVIDIA driver answered"
        listing = f"none ({why}); --gpus cpu:N runs N CPU workers instead"
    if spec.startswith("cpu"):
        head, _, n = spec.partition(":")
        try:
            if head != "cpu":  # cpu4: the colon left out
                raise ValueError(head)
            count = int(n) if n else default_cpu_workers()
        except ValueError:
            raise ConfigError(f"--gpus {gpus_setting!r}: write cpu:N, e.g. cpu:2") from None
        if count < 1:
            raise ConfigError(f"--gpus {gpus_setting!r}: need at least one CPU worker")
        _per_gpu_unused(workers_per_gpu, count)
        return [Placement(f"cpu:{i}", None) for i in range(count)]
    if spec == "all":
        if not found:
            count = default_cpu_workers()
            log.warning(
                "No GPU found (%s): starting %d CPU worker(s). "
                "Use --gpus cpu:N to choose how many.",
                note or "no NVIDIA driver answered",
                count,
            )
            _per_gpu_unused(workers_per_gpu, count)
            return [Placement(f"cpu:{i}", None) for i in range(count)]
        ids = [g.index for g in found]
    else:
        try:
            ids = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"--gpus {gpus_setting!r}: write GPU ids such as 0,1,3, 'all' or cpu:N. "
                f"GPUs found: {listing}"
            ) from None
        if not ids:
            raise ConfigError(f"--gpus is empty. GPUs found: {listing}")
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(
                f"--gpus {gpus_setting!r} names GPU {', '.join(map(str, dupes))} more than once; "
                f"use --workers-per-gpu for several workers on one GPU. GPUs found: {listing}"
            )
        known = {g.index for g in found}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(
                f"--gpus {gpus_setting!r}: no GPU {', '.join(map(str, unknown))} on this machine. "
                f"GPUs found: {listing}"
            )
    return [Placement(f"cuda:{i}", i) for i in ids for _ in range(workers_per_gpu)]


def engine_specs(cfg: PoolConfig, placements: list[Placement], model_path: str) -> list[EngineSpec]:
    """One EngineSpec per slot, from the config."""
    base = EngineSpec(
        engine=cfg.engine,
        model_path=model_path,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
        max_batch_size=cfg.max_batch_size,
        mem_budget_mb=cfg.mem_budget_mb,
        mem_headroom_mb=cfg.mem_headroom_mb,
        head_compile=cfg.head_compile,
        engine_mode=cfg.engine_mode,
        torch_threads=cfg.torch_threads,
        inference_steps=cfg.inference_steps,
        runaway_factor=cfg.runaway_factor,
        sim_rtf=cfg.sim_rtf,
        sim_chunk_s=cfg.sim_chunk_s,
        sim_boot_s=cfg.sim_boot_s,
        sim_boot_error=cfg.sim_boot_error,
    )
    out = []
    for i, p in enumerate(placements):
        speed = cfg.sim_speeds[i % len(cfg.sim_speeds)] if cfg.sim_speeds else 1.0
        share = cfg.workers_per_gpu if p.is_gpu else 1
        out.append(
            replace(base, device="cuda" if p.is_gpu else "cpu", sim_speed=speed, gpu_share=share)
        )
    return out
