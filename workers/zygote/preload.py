"""What the zygote (the template process workers are forked from) holds.

The parent starts the zygote with `multiprocessing`'s forkserver and names this
module (and, for the model engine, `workers.zygote.model`) in its preload list:
the zygote imports them once, at launch, and every worker forked from it
starts with those modules already in memory (copy-on-write). Nothing here may
start a thread, touch a device or run a tensor operation: a fork copies only
the calling thread, so a thread pool (OpenBLAS, OpenMP) or a CUDA context made
here would be broken in every worker.

The thread-count variables are set before numpy and torch are imported: both
size their pools when their library loads, and OpenBLAS starts its pool at
once, so it gets one thread whatever the environment says (numpy's own BLAS
calls are small here; torch has its own pool). A worker sets torch's thread
count after the fork (workers.host.worker.run).

PYTORCH_NVML_BASED_CUDA_CHECK=1 makes torch.cuda.is_available() and device_count()
ask NVML instead of the CUDA runtime: asking the runtime loads the driver and
marks every later fork as unable to use CUDA ("Cannot re-initialize CUDA in forked
subprocess"). On an H200 (2026-12-04) the zygote was found with the driver mapped
after its imports and every forked GPU worker failed to boot; the parent also
checks the zygote's memory map after its warm-up and spawns workers instead when
the driver is there (vibevoice_pool/pool/zygote.py).

What a child forked from it inherited is checked by workers/zygote/probe.py.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()
os.environ["OPENBLAS_NUM_THREADS"] = "1"  # OpenBLAS starts its pool when it loads
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # these size pools started later
    os.environ.setdefault(_var, "1")
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # a device query must not load CUDA

import workers.host.worker  # noqa: E402,F401
import workers.wire.board  # noqa: E402,F401
import workers.wire.messages  # noqa: E402,F401
from workers.engines import sim  # noqa: E402,F401
from workers.engines.factory import build_engine  # noqa: E402,F401

IMPORT_S = time.monotonic() - _T0  # what this module's imports cost the zygote
