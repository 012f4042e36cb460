"""A zygote preload module that maps a file named like the CUDA driver, as a library
that loads the driver at import would (imported only in a test's zygote).

The mapping is real: the zygote's /proc/<pid>/maps shows a `libcuda.so` path, which
is what the parent's check after the warm-up looks for."""

from __future__ import annotations

import mmap
import os
import tempfile

_folder = tempfile.mkdtemp(prefix="vvp-fake-driver-")
_path = os.path.join(_folder, "libcuda.so.1")
with open(_path, "wb") as _f:
    _f.write(b"\0" * mmap.PAGESIZE)
_file = open(_path, "rb")  # noqa: SIM115 (kept open with its mapping for the zygote's life)
MAPPED = mmap.mmap(_file.fileno(), mmap.PAGESIZE, prot=mmap.PROT_READ)
os.unlink(_path)  # the mapping keeps the file; nothing is left on disk
os.rmdir(_folder)
