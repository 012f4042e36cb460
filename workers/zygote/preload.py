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

What a child forked from it inherited is checked by workers/zygote/probe.py.
"""

from __future__ import annotations

import os
import time

_T0 = time.monotonic()
os.environ["OPENBLAS_NUM_THREADS"] = "1"  # OpenBLAS starts its pool when it loads
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # these size pools started later
    os.environ.setdefault(_var, "1")

import workers.host.worker  # noqa: E402,F401
import workers.wire.board  # noqa: E402,F401
import workers.wire.messages  # noqa: E402,F401
from workers.engines import sim  # noqa: E402,F401
from workers.engines.factory import build_engine  # noqa: E402,F401

IMPORT_S = time.monotonic() - _T0  # what this module's imports cost the zygote
