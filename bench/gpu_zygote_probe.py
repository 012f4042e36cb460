"""Can a worker forked from the zygote use CUDA? Run on a GPU host, from the repo root.

Imports the zygote's preload (workers/zygote/model.py, which sets the zygote's
variables first), prints which CUDA files are mapped and whether torch initialised
CUDA, then forks a child that runs CUDA work and imports the diffusion scheduler as
load() does. Prints one JSON line per stage.

    PYTHONPATH=. python3 bench/gpu_zygote_probe.py

Seen on an H200 (2026-12-04, torch 2.11.0+cu130, transformers 5.17): libcuda.so
mapped, no /dev/nvidia* file, CUDA not initialised, and the forked child's CUDA
work ran (first call 0.53 s). docs/PERFORMANCE.md, section 6.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

SCHEDULER = "diffusers.schedulers.scheduling_dpmsolver_multistep"  # what load() imports


def maps() -> list[str]:
    from workers.zygote.probe import cuda_mappings

    with open("/proc/self/maps") as f:
        return cuda_mappings(f.read())


def child(w: int) -> None:
    """In the forked child: CUDA work, then the scheduler as load() imports it."""
    import torch

    try:
        t = time.monotonic()
        ok = torch.ones(4, device="cuda").sum().item() == 4.0
        msg = {"child_cuda_ok": ok, "child_cuda_init_s": round(time.monotonic() - t, 3)}
        importlib.import_module(SCHEDULER)
        msg["child_diffusers_ok"] = True
    except Exception as e:  # noqa: BLE001 - the report is the point
        msg = {"child_cuda_ok": False, "error": f"{type(e).__name__}: {e}"}
    os.write(w, json.dumps(msg).encode())
    os._exit(0)


def main() -> int:
    t0 = time.monotonic()
    m = importlib.import_module("workers.zygote.model")  # the zygote's preload
    import torch

    print(
        json.dumps(
            {
                "import_s": round(time.monotonic() - t0, 2),
                "missing": m.missing,
                "torch": torch.__version__,
                "cuda_build": torch.version.cuda,
                "diffusers_preloaded": "diffusers" in sys.modules,
                "maps_after_zygote_imports": maps(),
                "cuda_initialized": torch.cuda.is_initialized(),
            }
        ),
        flush=True,
    )
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(w)
    os.close(w)
    os.waitpid(pid, 0)
    print(os.read(r, 65536).decode(), flush=True)
    importlib.import_module(SCHEDULER)
    print(json.dumps({"maps_after_diffusers_import": maps()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
