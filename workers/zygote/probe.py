"""Checks on the zygote, from a child forked from it (tests, benchmarks, the GPU script).

`probe` runs as the target of a process forked from the zygote and reports
what that child inherited at the fork, before it imports anything itself:
whether torch had initialised CUDA, whether the CUDA driver or a GPU device
file is mapped, which modules were preloaded and what their imports cost.
The zygote's own thread count is read from /proc by the caller (a forked
child always has one thread). Importing this module sets nothing.
"""

from __future__ import annotations

import os
import sys
import time

CUDA_MARKERS = ("libcuda.so", "/dev/nvidia")


def cuda_mappings(maps_text: str) -> list[str]:
    """The lines of a /proc/<pid>/maps text that show the CUDA driver loaded or a
    GPU device opened. The CUDA runtime libraries that a CUDA build of torch links
    (libcudart, libcublas) are harmless until the driver is initialised; the driver
    library and the /dev/nvidia* files are what initialising it maps."""
    hits = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        path = parts[5] if len(parts) == 6 else ""
        if any(marker in path for marker in CUDA_MARKERS):
            hits.append(path)
    return sorted(set(hits))


DEVICE_FILES = "/dev/nvidia"


def driver_initialised(mappings: list[str]) -> list[str]:
    """The GPU device files among a process's CUDA mappings: what initialising the
    driver opens, and what makes a fork unable to use CUDA. The driver library alone
    is harmless: on an H200 (2026-12-04) the zygote's imports left libcuda.so mapped
    with no device file open and torch's CUDA not initialised, and a child forked
    from it ran CUDA work (its first CUDA call took 0.53 s)."""
    return [p for p in mappings if DEVICE_FILES in p]


def thread_count(pid: int | str = "self") -> int:
    """Threads of a process, from /proc (a fork copies only the calling one)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def probe(results) -> None:
    """Run in a child just forked from the zygote: report what it inherited.

    Reads its own state before importing anything new, so the report is the
    zygote's state at the fork; the zygote's thread count is read from /proc
    (this child's parent), since a forked child always has one thread."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    torch = sys.modules.get("torch")
    report = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "forked_at": time.monotonic(),
        "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
        "cuda_mappings": cuda_mappings(maps),
        "torch_loaded": torch is not None,
        "transformers_loaded": "transformers.models.vibevoice.modeling_vibevoice" in sys.modules,
        "zygote_threads": thread_count(os.getppid()),
        "modules": len(sys.modules),
        "import_s": _import_s("workers.zygote.preload") + _import_s("workers.zygote.model"),
    }
    results.send(report)
    results.close()


def _import_s(name: str) -> float:
    """What a preloaded module's imports cost the zygote (0 when not preloaded)."""
    return getattr(sys.modules.get(name), "IMPORT_S", 0.0)


HEAVY = ("torch", "transformers", "diffusers", "safetensors", "tokenizers", "numpy", "scipy")


def load_imports(model_path: str, results) -> None:
    """In a child forked from the zygote: load the engine as a worker does and
    report which modules that load had to import itself (the zygote should have
    imported every heavy one)."""
    before = {id(m) for m in sys.modules.values()}
    t0 = time.monotonic()
    from workers.engines.contract import EngineSpec
    from workers.engines.factory import build_engine

    build_engine(EngineSpec(engine="vibevoice", model_path=model_path)).load()
    # new module objects only: transformers also files old names as aliases of
    # modules it already has (tokenization_*_fast), which cost nothing
    new = sorted(n for n, m in list(sys.modules.items()) if id(m) not in before)
    heavy = [n for n in new if n.split(".")[0] in HEAVY]
    results.send({"load_s": time.monotonic() - t0, "new": new, "heavy": heavy})
    results.close()
