"""What the zygote (the template process workers are forked from) holds.

The parent starts the zygote with `multiprocessing`'s forkserver and names this
module (and, for the model engine, `workers.zygote_model`) in its preload list:
the zygote imports them once, at launch, and every worker forked from it
starts with those modules already in memory (copy-on-write). Nothing here may
start a thread, touch a device or run a tensor operation: a fork copies only
the calling thread, so a thread pool (OpenBLAS, OpenMP) or a CUDA context made
here would be broken in every worker.

The thread-count variables are set before numpy and torch are imported: both
size their pools when their library loads, and OpenBLAS starts its pool at
once. A worker sets its own thread count after the fork (worker_main.run).

`probe` runs in a child forked from the zygote and reports what the zygote
held at the fork: the CUDA-safety test and the benchmarks call it.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import workers.board  # noqa: E402,F401
import workers.messages  # noqa: E402,F401
import workers.worker_main  # noqa: E402,F401
from workers import sim  # noqa: E402,F401
from workers.engine import build_engine  # noqa: E402,F401

IMPORT_S = time.monotonic() - _T0  # what this module's imports cost the zygote

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


def thread_count(pid: int | str = "self") -> int:
    """Threads of a process, from /proc (a fork copies only the calling one)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def probe(results) -> None:
    """Run in a child just forked from the zygote: report what it inherited.

    Reads its own state before importing anything new, so the report is the
    zygote's state at the fork (the parent reads the zygote's own thread count
    from /proc, since a forked child always has one thread)."""
    import sys

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
        "transformers_loaded": "transformers.models.vibevoice" in sys.modules,
        "modules": len(sys.modules),
        "import_s": IMPORT_S + _model_import_s(),
    }
    results.send(report)
    results.close()


def _model_import_s() -> float:
    import sys

    model = sys.modules.get("workers.zygote_model")
    return getattr(model, "IMPORT_S", 0.0)
