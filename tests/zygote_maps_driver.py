"""A zygote preload module that maps a file named like a GPU device file, as a library
that initialises the CUDA driver at import would (imported only in a test's zygote).
With FAKE_DRIVER_FILE=libcuda.so.1 it maps a file named like the driver library
instead: loaded, not initialised.

The mapping is real: the zygote's /proc/<pid>/maps shows the path, which is what
the parent's check after the warm-up reads."""

from __future__ import annotations

import mmap
import os
import tempfile

_folder = tempfile.mkdtemp(prefix="vvp-fake-driver-")
_name = os.environ.get("FAKE_DRIVER_FILE", "dev/nvidiactl")
_path = os.path.join(_folder, _name)
os.makedirs(os.path.dirname(_path), exist_ok=True)
with open(_path, "wb") as _f:
    _f.write(b"\0" * mmap.PAGESIZE)
_file = open(_path, "rb")  # noqa: SIM115 (kept open with its mapping for the zygote's life)
MAPPED = mmap.mmap(_file.fileno(), mmap.PAGESIZE, prot=mmap.PROT_READ)
os.unlink(_path)  # the mapping keeps the file; nothing is left on disk
for _dir in (os.path.dirname(_path), _folder):
    if os.path.isdir(_dir):
        os.rmdir(_dir)
